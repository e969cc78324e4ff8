"""Domain adaptation (Tzeng et al. 2015 + DANN): losses, the source/target pair, optimizer ownership, the CLI."""
from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch

from helpers import FAST, read_metrics, run_cli
from tl_lightning.data.digits import BlendedDigitsDataModule, DigitsDataModule, blend_digits, load_digit_images
from tl_lightning.data.domains import ByteImages, DomainPairDataModule
from tl_lightning.errors import TLError
from tl_lightning.losses import (GradientReversal, class_soft_labels, confusion_loss, dann_lambda, grad_reverse,
                                 soft_label_loss)
from tl_lightning.methods.adaptation import DomainAdaptation
from tl_lightning.methods.domain_statistics import add_target_statistics, target_statistics
from tl_lightning.methods.source_stage import load_source_model

CONFIG = "configs/adaptation/digits_offline.yaml"


# ----- losses ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("domains", [2, 3, 5])
def test_confusion_loss_is_log_d_for_uniform_predictions(domains):
    logits = torch.full((4, domains), 1.7)  # equal logits = uniform domain prediction
    assert confusion_loss(logits).item() == pytest.approx(math.log(domains), abs=1e-6)
    confident = torch.tensor([[8.0] + [0.0] * (domains - 1)])
    assert confusion_loss(confident).item() > math.log(domains) + 1  # a sure domain guess is penalised


def test_confusion_loss_gradient_pushes_towards_uniform():
    logits = torch.tensor([[2.0, -1.0]], requires_grad=True)
    confusion_loss(logits).backward()
    assert logits.grad[0, 0] > 0 > logits.grad[0, 1]  # descent lowers the confident logit, raises the other


def test_soft_labels_match_a_hand_computed_case():
    # class 0: softmax([ln 3, 0]) = [.75, .25] and softmax([0, 0]) = [.5, .5] -> mean [.625, .375]
    # class 1: softmax([0, ln 4]) = [.2, .8]
    logits = torch.tensor([[math.log(3), 0.0], [0.0, 0.0], [0.0, math.log(4)]])
    labels = torch.tensor([0, 0, 1])
    soft = class_soft_labels(logits, labels, num_classes=2, temperature=1.0)
    assert torch.allclose(soft, torch.tensor([[0.625, 0.375], [0.2, 0.8]]), atol=1e-6)
    # temperature divides the logits: at tau = 2, logits [2 ln 3, 0] give [.75, .25]
    soft_t = class_soft_labels(torch.tensor([[2 * math.log(3), 0.0]]), torch.tensor([0]), 1, temperature=2.0)
    assert torch.allclose(soft_t, torch.tensor([[0.75, 0.25]]), atol=1e-6)


def test_soft_labels_are_distributions_and_need_every_class():
    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(50, 4, generator=gen) * 3, torch.arange(50) % 4
    soft = class_soft_labels(logits, labels, 4, temperature=2.0)
    assert (soft >= 0).all() and torch.allclose(soft.sum(1), torch.ones(4))
    assert soft.diagonal().ne(soft[0, 0]).any()  # rows differ: they are per-class, not one global mean
    with pytest.raises(TLError, match="class 3"):
        class_soft_labels(logits[:3], torch.tensor([0, 1, 2]), 4)


def test_soft_label_loss_is_cross_entropy_at_temperature():
    logits = torch.tensor([[1.0, 3.0, -2.0]])
    target = torch.tensor([[0.2, 0.7, 0.1]])
    expected = -(target * torch.log_softmax(logits / 2.0, -1)).sum()
    assert soft_label_loss(logits, target, 2.0).item() == pytest.approx(expected.item())
    one_hot = torch.tensor([[0.0, 1.0, 0.0]])
    assert soft_label_loss(logits, one_hot).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, torch.tensor([1])).item())


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0, 2.5])
def test_gradient_reversal_flips_sign_and_scales_by_lambda(lam):
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(3, 4)
    y = grad_reverse(x, lam)
    assert torch.equal(y, x)  # identity forward
    (y * w).sum().backward()
    assert torch.allclose(x.grad, -lam * w)
    layer = GradientReversal(lam)
    x.grad = None
    (layer(x) * w).sum().backward()
    assert torch.allclose(x.grad, -lam * w)


def test_dann_lambda_schedule():
    assert dann_lambda(0.0) == 0.0
    assert dann_lambda(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert dann_lambda(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    values = [dann_lambda(p) for p in np.linspace(0, 1, 11)]
    assert all(a < b for a, b in zip(values, values[1:])) and values[-1] < 1


# ----- data --------------------------------------------------------------------------------------------------
def test_blended_digits_are_abs_difference_with_photo_patches():
    digits, labels = load_digit_images()
    flat = np.zeros((2, 8, 8), dtype=np.uint8)  # a black digit leaves the photo patch itself
    photo = np.arange(40 * 50 * 3, dtype=np.uint8).reshape(40, 50, 3)
    blended = blend_digits(flat, [photo], seed=0)
    assert blended.shape == (2, 32, 32, 3)
    assert any((blended[0] == photo[y:y + 32, x:x + 32]).all() for y in range(9) for x in range(19))
    white = np.full((1, 8, 8), 255, dtype=np.uint8)  # a white digit inverts it
    assert any((blend_digits(white, [photo], 0)[0] == 255 - photo[y:y + 32, x:x + 32]).all()
               for y in range(9) for x in range(19))
    dm = BlendedDigitsDataModule(backbone="digit_cnn", num_workers=0)
    dm.setup()
    source = dm.build_split("train")
    assert len(source) == len(labels) and np.array_equal(source.targets, labels)
    img = np.asarray(source.load(0))
    assert img.shape == (32, 32, 3) and img.std() > 10  # textured colour, not a plain digit
    assert dm.num_classes == 10


def _pair(k, source_per_class=None, **kwargs) -> DomainPairDataModule:
    kwargs.setdefault("num_workers", 0)
    return DomainPairDataModule(
        source={"class_path": "tl_lightning.data.DigitsDataModule",
                "init_args": {"seed": 0, "samples_per_class": source_per_class}},
        target={"class_path": "tl_lightning.data.digits.BlendedDigitsDataModule", "init_args": {"seed": 1}},
        labelled_per_class=k, backbone="digit_cnn", **kwargs)


def test_pair_splits_labelled_and_unlabelled_target_with_seed():
    dm = _pair(3, batch_size=32, seed=5)
    dm.setup()
    assert isinstance(dm.source, DigitsDataModule) and dm.source.backbone == dm.target.backbone == "digit_cnn"
    assert (dm.num_classes, dm.multilabel, dm.class_names[:2]) == (10, False, ["0", "1"])
    labelled = dm.splits["target_labelled"]
    assert np.array_equal(np.bincount(labelled.targets), np.full(10, 3))
    target_train = dm.target.split_dataset("train")
    unlabelled = dm.splits["target_unlabelled"]
    assert len(labelled) + len(unlabelled) == len(target_train)
    assert not set(labelled.indices) & set(unlabelled.samples.indices)
    assert isinstance(unlabelled[0], torch.Tensor)  # labels dropped
    same, other = _pair(3, seed=5), _pair(3, seed=6)
    same.setup(), other.setup()
    assert np.array_equal(same.splits["target_labelled"].indices, labelled.indices)
    assert not np.array_equal(other.splits["target_labelled"].indices, labelled.indices)
    # batches: source, labelled target (all 30 fit in one batch), unlabelled target; epoch = longest stream
    batch = next(iter(dm.train_dataloader()))
    batch = batch[0] if isinstance(batch, tuple) else batch
    assert set(batch) == {"source", "target_labelled", "target_unlabelled"}
    assert batch["source"][0].shape == (32, 3, 32, 32) and batch["target_labelled"][0].shape[0] == 30
    assert dm.steps_per_epoch() == math.ceil(max(len(dm.splits["source_train"]), len(unlabelled)) / 32)
    for pair, steps in ((dm, dm.steps_per_epoch()), (_pair(0, batch_size=32, epoch=7), 7)):
        loader = pair.train_dataloader()
        assert sum(1 for _ in loader) == len(loader) == steps
    assert [len(loader.dataset) for loader in dm.val_dataloader()] == [
        len(dm.target.split_dataset("val")), len(dm.source.split_dataset("val"))]


def test_pair_in_memory_serves_the_same_samples_from_uint8_storage():
    lazy, memory = _pair(2, seed=3), _pair(2, seed=3, in_memory=True)
    lazy.setup(), memory.setup()
    for name in ("source_train", "target_labelled"):
        for i in range(len(lazy.splits[name])):  # bit for bit, every sample
            x_lazy, y_lazy = lazy.splits[name][i]
            x_mem, y_mem = memory.splits[name][i]
            assert x_mem.dtype == torch.float32 and torch.equal(x_lazy, x_mem) and y_lazy == y_mem
    assert torch.equal(lazy.splits["target_unlabelled"][7], memory.splits["target_unlabelled"][7])
    stored = memory.splits["source_train"]  # one byte per pixel value, not four
    assert isinstance(stored, ByteImages) and stored.images.dtype == torch.uint8
    assert stored.images.shape == (len(stored), 3, 32, 32)
    # nothing to decode: no loader workers by default for what is held in memory, the asked number otherwise
    for pair, expected in ((_pair(2, seed=3, in_memory=True, num_workers=None), 0),
                           (_pair(2, seed=3, in_memory=True, num_workers=2), 2)):
        pair.setup()
        assert {loader.num_workers for loader in pair.val_dataloader()} == {expected}
        assert {loader.num_workers for loader in pair.train_dataloader().iterables.values()} == {expected}
    lazy_default = _pair(2, seed=3, num_workers=None)
    lazy_default.setup()
    assert lazy_default.val_dataloader()[0].num_workers == lazy_default.num_workers
    assert len(memory.val_dataloader()[0].dataset) == len(lazy.target.split_dataset("val"))


def test_pair_unsupervised_and_all_labelled():
    unsup = _pair(0)
    unsup.setup()
    assert "target_labelled" not in unsup.splits and not unsup.has_labelled_target
    full = _pair(None)
    full.setup()
    assert len(full.splits["target_labelled"]) == len(full.target.split_dataset("train"))
    with pytest.raises(TLError, match="labelled_per_class"):
        _pair(-1)
    with pytest.raises(TLError, match="epoch"):
        _pair(0, epoch="forever")


# ----- optimizer ownership with real gradients -----------------------------------------------------------------
class OwnershipProbe(L.Callback):
    """Hooks every optimizer's step: records owned params' grads before it and which params moved after it."""

    def __init__(self):
        self.records = []

    def on_train_start(self, trainer, pl_module):
        names = {p: n for n, p in pl_module.named_parameters()}
        for opt in trainer.optimizers:
            owned = {names[p] for g in opt.param_groups for p in g["params"]}
            state = {}

            def pre(optimizer, args, kwargs, owned=owned, state=state):
                state["before"] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
                state["grads"] = {n: (None if p.grad is None else p.grad.abs().sum().item())
                                  for n, p in pl_module.named_parameters() if n in owned}

            def post(optimizer, args, kwargs, owned=owned, state=state, group=opt.param_groups[0]["name"]):
                moved = {n for n, p in pl_module.named_parameters() if not torch.equal(p, state["before"][n])}
                self.records.append({"group": group, "owned": owned, "grads": state["grads"], "moved": moved})

            opt.register_step_pre_hook(pre)
            opt.register_step_post_hook(post)


@pytest.mark.parametrize("confusion", ["uniform", "gradient_reversal"])
def test_each_optimizer_changes_only_its_parameters(confusion, tmp_path):
    L.seed_everything(0)
    dm = _pair(2, source_per_class=3, batch_size=16, epoch=2)  # 2 steps per epoch: the source stage is epoch 0
    dm.setup()
    model = DomainAdaptation(backbone="digit_cnn", confusion=confusion, soft_label_weight=0.5,
                             source_pretrain_epochs=1, lambda_schedule=False,
                             confusion_weight=0.5, num_classes=dm.num_classes)
    probe = OwnershipProbe()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[probe], default_root_dir=tmp_path)
    trainer.fit(model, dm)
    groups = [r["group"] for r in probe.records]
    assert groups.count("domain") == 2 and groups.count("model") == 2 + 2  # 2 source-stage + 2 adaptation steps
    assert groups[:2] == ["model", "model"]  # the source stage steps the network alone
    all_params = {n for n, _ in model.named_parameters()}
    domain_params = {n for n in all_params if n.startswith("domain_classifier.")}
    for r in probe.records:
        assert r["owned"] == (domain_params if r["group"] == "domain" else all_params - domain_params)
        zero = [n for n, g in r["grads"].items() if not g]
        assert not zero, f"{r['group']} step: owned parameters without gradient: {zero}"
        assert r["moved"] <= r["owned"], f"{r['group']} step moved parameters it does not own"
        assert r["moved"] == r["owned"]


def test_source_stage_soft_labels_and_checkpoint_teacher(tmp_path):
    L.seed_everything(0)
    dm = _pair(1, source_per_class=40, batch_size=64, epoch=3)
    kwargs = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                  num_sanity_val_steps=0, limit_val_batches=1, limit_test_batches=1)
    source = DomainAdaptation(backbone="digit_cnn", mode="source_only", lr=3e-3)
    trainer = L.Trainer(max_epochs=2, default_root_dir=tmp_path, **kwargs)
    trainer.fit(source, dm)
    ckpt = tmp_path / "source.ckpt"
    trainer.save_checkpoint(ckpt)
    assert trainer.callback_metrics["train/source_acc"] > 0.3

    adapt = DomainAdaptation(backbone="digit_cnn", soft_label_weight=1.0, temperature=2.0,
                             source_checkpoint=str(ckpt), init_from_source=False)
    L.Trainer(max_epochs=1, default_root_dir=tmp_path, **kwargs).fit(adapt, dm)
    soft = adapt.soft_labels
    assert torch.allclose(soft.sum(1), torch.ones(10), atol=1e-5) and (soft >= 0).all()
    assert soft.argmax(1).eq(torch.arange(10)).float().mean() >= 0.5  # a trained teacher: mostly the true class
    assert not torch.allclose(soft, torch.full_like(soft, 0.1))
    with pytest.raises(TLError, match="cannot read source_checkpoint"):
        load_source_model(str(tmp_path / "missing.ckpt"), adapt.features, adapt.classifier)
    other = DomainAdaptation(backbone="digit_cnn", num_classes=3)
    with pytest.raises(TLError, match="other shapes"):
        load_source_model(str(ckpt), other.features, other.classifier)
    with pytest.raises(TLError, match="source-trained model"):
        L.Trainer(max_epochs=1, default_root_dir=tmp_path, **kwargs).fit(
            DomainAdaptation(backbone="digit_cnn", soft_label_weight=1.0), dm)


# ----- the CLI on the offline config ----------------------------------------------------------------------
def test_offline_config_short_fit_via_cli(tmp_path):
    run_dir = tmp_path / "run"
    run_cli("fit", "--config", CONFIG, *FAST, f"--trainer.default_root_dir={run_dir}", "--trainer.max_epochs=2",
            "--model.init_args.source_pretrain_epochs=1", "--data.init_args.epoch=4",
            "--data.init_args.num_workers=0", "--data.init_args.source.init_args.samples_per_class=20",
            "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1")
    m = read_metrics(run_dir)
    metrics = m["metrics"]
    for key in ("train/loss", "train/loss_cls", "train/loss_domain", "train/loss_conf", "train/loss_soft",
                "train/source_acc", "train/target_acc", "train/domain_acc", "val/target_acc", "val/source_acc",
                "val/domain_acc", "test/target_acc", "test/source_acc", "test/domain_acc"):
        assert key in metrics, key
        assert math.isfinite(metrics[key])
    assert 0 <= metrics["test/target_acc"] <= 1 and 0 <= metrics["train/domain_acc"] <= 1
    soft = np.array(m["soft_labels"])
    assert soft.shape == (10, 10) and np.allclose(soft.sum(1), 1, atol=1e-5)
    assert m["data_sizes"]["target_labelled"] == 30 and m["data_sizes"]["steps_per_epoch"] == 4
    assert len(m["source_pretrain_loss"]) == 1
    assert (run_dir / "checkpoints" / "last.ckpt").exists()


def test_cli_rejects_soft_labels_without_labelled_target(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli("fit", "--config", CONFIG, *FAST, f"--trainer.default_root_dir={tmp_path}",
                "--data.init_args.labelled_per_class=0", "--trainer.max_epochs=1")
    assert e.value.code == 2
    assert "labelled target" in capsys.readouterr().err


def test_lr_annealing_follows_ganin_schedule(tmp_path):
    """μ_p = μ_0 / (1 + 10p)^0.75 per step, for both optimizers: μ_0 at the start, μ_0 · 11^-0.75 at the end."""
    L.seed_everything(0)
    dm = _pair(0, source_per_class=3, batch_size=8, epoch=3)
    model = DomainAdaptation(backbone="digit_cnn_dann", confusion="gradient_reversal", lr_annealing=True,
                             lr=0.01, num_classes=10)
    seen = []

    class RecordLR(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append([opt.param_groups[0]["lr"] for opt in trainer.optimizers])

    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[RecordLR()], default_root_dir=tmp_path)
    trainer.fit(model, dm)
    total = 6  # 2 epochs x 3 steps
    expected = [0.01 * (1 + 10 * step / total) ** -0.75 for step in range(total + 1)]
    assert [model_lr for model_lr, _ in seen] == pytest.approx(expected[:total])
    assert all(model_lr == domain_lr for model_lr, domain_lr in seen)
    final = [opt.param_groups[0]["lr"] for opt in trainer.optimizers]
    assert final == pytest.approx([0.01 * 11 ** -0.75] * 2)


# ----- per-domain BatchNorm statistics (AdaBN / domain-specific BN) ---------------------------------------------
def test_target_statistics_swap_in_and_back():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    assert add_target_statistics(net) == 1
    bn = net[1]
    source_mean = bn.running_mean.clone()
    net.train()
    with target_statistics(net):
        net(torch.randn(8, 3, 6, 6) + 5.0)  # updates the target's statistics only
    assert torch.equal(bn.running_mean, source_mean) and int(bn.num_batches_tracked) == 0
    assert int(bn.target_num_batches_tracked) == 1 and not torch.equal(bn.target_running_mean, source_mean)
    net(torch.randn(8, 3, 6, 6))
    assert int(bn.num_batches_tracked) == 1 and int(bn.target_num_batches_tracked) == 1
    with pytest.raises(ValueError), target_statistics(net):  # restored after an error as well
        raise ValueError
    assert int(bn.num_batches_tracked) == 1
    assert "1.target_running_mean" in net.state_dict()


def test_domain_batchnorm_keeps_one_statistics_set_per_domain(tmp_path):
    L.seed_everything(0)
    dm = _pair(0, source_per_class=3, batch_size=8, epoch=2)
    model = DomainAdaptation(backbone="digit_cnn", confusion="gradient_reversal", domain_batchnorm=True,
                             num_classes=10)
    bn = model.features.conv1[1]
    # DANN steps two optimizers per batch: 4 steps = 2 batches
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, limit_test_batches=1, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    assert int(bn.num_batches_tracked) == 2 and int(bn.target_num_batches_tracked) == 2  # one forward per domain
    assert not torch.allclose(bn.running_mean, bn.target_running_mean)  # blended digits are another domain
    # evaluation: each domain with its own statistics; predictions (forward) are the target's
    model.eval()
    x = next(iter(dm.test_dataloader()[0]))[0]
    with torch.no_grad():
        target_logits, source_logits = model(x), model(x, 0)
        with target_statistics(model.features):
            by_hand = model.classifier(model.features(x))
    assert torch.allclose(target_logits, by_hand) and not torch.allclose(target_logits, source_logits)
    with pytest.raises(TLError, match="has none"):
        DomainAdaptation(backbone="digit_cnn_dann", domain_batchnorm=True)


def test_domain_batchnorm_warm_starts_from_a_plain_source_checkpoint(tmp_path):
    """A source_only checkpoint without target statistics: the target starts from the source's statistics."""
    L.seed_everything(0)
    dm = _pair(0, source_per_class=3, batch_size=8, epoch=2)
    kwargs = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path)
    source = DomainAdaptation(backbone="digit_cnn", mode="source_only", num_classes=10)
    trainer = L.Trainer(max_steps=2, **kwargs)
    trainer.fit(source, dm)
    trainer.save_checkpoint(tmp_path / "source.ckpt")
    adapt = DomainAdaptation(backbone="digit_cnn", confusion="gradient_reversal", domain_batchnorm=True,
                             source_checkpoint=str(tmp_path / "source.ckpt"), num_classes=10)
    seen = {}

    class AtStart(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            bn = pl_module.features.conv1[1]
            seen.setdefault("target", bn.target_running_mean.clone())

    L.Trainer(max_steps=1, callbacks=[AtStart()], **kwargs).fit(adapt, dm)
    assert torch.allclose(seen["target"], source.features.conv1[1].running_mean)


def test_self_teacher_reads_the_source_with_source_statistics_and_seeds_the_target_after_pretraining(tmp_path):
    """Soft labels from the model itself (no source_checkpoint) under domain_batchnorm: the teacher must normalise
    source images with the source statistics it was pre-trained with, and the target statistics must start from
    those pre-trained statistics, not from BatchNorm's defaults (running mean 0, never updated)."""
    L.seed_everything(0)
    dm = _pair(3, source_per_class=5, batch_size=16, epoch=1)
    model = DomainAdaptation(backbone="digit_cnn", confusion="uniform", domain_batchnorm=True, num_classes=10,
                             soft_label_weight=0.1, source_pretrain_epochs=2, temperature=2.0)
    seen = {}

    class BeforeTheFirstAdaptationStep(L.Callback):  # epoch 2's first batch: after the source stage's end
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch != 2 or "stats" in seen:
                return
            bn = pl_module.features.conv1[1]
            seen["stats"] = [t.clone() for t in (bn.running_mean, bn.target_running_mean,
                                                 bn.num_batches_tracked, bn.target_num_batches_tracked)]
            pl_module.eval()
            logits, targets = [], []
            with torch.no_grad():
                for x, y in dm.source_loader():
                    logits.append(pl_module(x, 0))  # domain 0: the source, with the source statistics
                    targets.append(y)
            pl_module.train()
            seen["expected"] = class_soft_labels(torch.cat(logits), torch.cat(targets), 10, 2.0)
            seen["soft_labels"] = pl_module.soft_labels.clone()

    L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path,
              callbacks=[BeforeTheFirstAdaptationStep()]).fit(model, dm)
    source_mean, target_mean, source_seen, target_seen = seen["stats"]
    assert int(source_seen) > 0 and source_mean.abs().sum() > 0, "the source stage must have run"
    assert int(target_seen) == int(source_seen) and torch.equal(target_mean, source_mean)
    assert torch.allclose(seen["soft_labels"], seen["expected"], atol=1e-5)


def test_a_separate_teacher_is_pretrained_while_the_network_starts_from_its_initial_weights(tmp_path):
    """init_from_source: false with source_pretrain_epochs: the pre-training epochs train a copy (the soft labels'
    teacher) and leave the adapted network, its BatchNorm statistics included, exactly at its initial state."""
    L.seed_everything(0)
    dm = _pair(3, source_per_class=5, batch_size=5, epoch=10)
    model = DomainAdaptation(backbone="digit_cnn", confusion="gradient_reversal", domain_batchnorm=True,
                             num_classes=10, soft_label_weight=0.1, source_pretrain_epochs=4, temperature=2.0,
                             init_from_source=False, lr=0.003)
    initial = {k: v.clone() for k, v in model.state_dict().items()
               if not k.startswith(("soft_labels", "source_", "teacher."))}
    teacher_initial = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    seen = {}

    class BeforeTheFirstAdaptationStep(L.Callback):  # epoch 4's first batch: after the source stage's end
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch != 4 or "state" in seen:
                return
            seen["state"] = {k: v.clone() for k, v in pl_module.state_dict().items() if k in initial}
            seen["soft_labels"] = pl_module.soft_labels.clone()

    L.Trainer(max_epochs=5, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path,
              callbacks=[BeforeTheFirstAdaptationStep()]).fit(model, dm)
    changed = [k for k, v in seen["state"].items() if not torch.equal(v, initial[k])]
    assert not changed, f"the source stage moved the adapted network: {changed[:3]}"
    assert not any(torch.equal(v, teacher_initial[k]) for k, v in model.teacher.state_dict().items()
                   if k.endswith("weight")), "the source stage must train the teacher"
    assert len(model.pretrain_history) == 4 and model.pretrain_history[-1] < model.pretrain_history[0]
    # the soft labels come from the trained teacher, not from the (untrained) network: each class's own
    # probability is higher than the untrained network gives it
    model.eval()
    with torch.no_grad():
        batches = [(model(x, 0), y) for x, y in dm.source_loader()]
    untrained = class_soft_labels(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]), 10, 2.0)
    assert seen["soft_labels"].diagonal().mean() > untrained.diagonal().mean() + 0.01
    # without soft labels there is nothing to teach: no source stage at all
    no_soft = DomainAdaptation(backbone="digit_cnn", domain_batchnorm=True, num_classes=10, soft_label_weight=0.0,
                               source_pretrain_epochs=4, init_from_source=False)
    L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
              default_root_dir=tmp_path).fit(no_soft, dm)
    assert no_soft.pretrain_history == []


def test_dann_batchnorm_overlay_fits_on_the_offline_pair(tmp_path):
    """configs/adaptation/dann_batchnorm.yaml layered on a pair config: unsupervised DANN, digit_cnn, two sets of
    BatchNorm statistics in the checkpoint."""
    run_dir = tmp_path / "run"
    run_cli("fit", "--config", CONFIG, "--config", "configs/adaptation/dann_batchnorm.yaml", *FAST,
            f"--trainer.default_root_dir={run_dir}", "--trainer.max_epochs=1", "--data.init_args.epoch=3",
            "--data.init_args.num_workers=0", "--data.init_args.source.init_args.samples_per_class=20",
            "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1")
    m = read_metrics(run_dir)
    assert m["confusion"] == "gradient_reversal" and m["data_sizes"].get("target_labelled", 0) == 0
    assert math.isfinite(m["metrics"]["test/target_acc"]) and "train/loss_soft" not in m["metrics"]
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    source, target = state["features.conv1.1.running_mean"], state["features.conv1.1.target_running_mean"]
    assert int(state["features.conv1.1.target_num_batches_tracked"]) == 3 and not torch.allclose(source, target)
