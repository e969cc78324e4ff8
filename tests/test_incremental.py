"""Class-incremental learning (iCaRL, Rebuffi et al. 2017): herding, budget, NME, distillation targets, the
task sequence in one fit, and resuming mid-sequence. Offline: scikit-learn digits and tiny tensors."""
from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import FAST, read_metrics, run_cli
from tl_lightning.backbones import create_backbone
from tl_lightning.data import DigitsDataModule
from tl_lightning.data.backbone_features import BackboneFeatures
from tl_lightning.data.incremental import ClassIncrementalDataModule
from tl_lightning.errors import TLError
from tl_lightning.losses import distillation_loss, icarl_loss, icarl_targets
from tl_lightning.methods import ICaRL
from tl_lightning.methods.exemplars import ExemplarMemory, class_means, herding_order, nme_scores
from tl_lightning.methods.incremental_metrics import forgetting, summarize

# 6 digit classes as 3 tasks of 2, 20 training images per class, 2 epochs per task
DIGITS = (
    "--model=tl_lightning.methods.ICaRL", "--model.backbone=digit_cnn", "--model.weights=none",
    "--model.epochs_per_task=2", "--model.memory_budget=40", "--model.flip_nme=false", "--model.lr=0.003",
    "--data=tl_lightning.data.incremental.ClassIncrementalDataModule",
    "--data.dataset=tl_lightning.data.DigitsDataModule", "--data.dataset.init_args.samples_per_class=20",
    "--data.dataset.init_args.num_workers=0", "--data.dataset.init_args.batch_size=32",
    "--data.classes_per_task=2", "--data.class_order=[5,3,8,0,1,7]", "--data.eval_samples_per_class=10",
    "--trainer.reload_dataloaders_every_n_epochs=1", "--test_after_fit=false",
)


# ----- herding, budget, NME ----------------------------------------------------------------------------------
def test_herding_picks_the_hand_computed_order():
    # unit vectors; class mean mu = (0.36, 0.40). Step k picks argmin ||mu - (S + phi) / k||^2:
    # k=1: [0.5696, 0.4896, 0.2176, 1.1936, 1.0816] -> 2 (S = (0.6, 0.8))
    # k=2: [0.1936, 0.2536, -, 0.2056, 0.2896]       -> 0 (S = (1.6, 0.8)); x1 was closer to mu at k=1
    # k=3: [-, 0.0700, -, 0.3047, 0.0185]           -> 4
    # k=4: [-, 0.0746, -, 0.0306, -]                -> 3, then 1
    phi = torch.tensor([[1, 0], [0, 1], [0.6, 0.8], [0.8, -0.6], [-0.6, 0.8]])
    assert herding_order(phi, 5).tolist() == [2, 0, 4, 3, 1]
    # features are L2-normalised first: scaling a sample does not change the order
    assert herding_order(phi * torch.tensor([[3.0], [0.5], [2.0], [1.0], [7.0]]), 5).tolist() == [2, 0, 4, 3, 1]
    # a smaller m is the prefix of the same order, and m is capped by the class size
    assert herding_order(phi, 2).tolist() == [2, 0]
    assert herding_order(phi, 50).tolist() == [2, 0, 4, 3, 1]


def test_budget_is_never_exceeded_and_reduction_keeps_a_prefix():
    K = 23
    memory = ExemplarMemory(budget=K)
    assert memory.sizes([0, 1, 2]) == {0: 8, 1: 8, 2: 7}  # 23 = 3 * 7 + 2: the first two classes get one more
    rng = np.random.default_rng(0)
    full_lists = {}
    for t in range(1, 11):
        sizes = memory.sizes(list(range(t)))
        assert sum(sizes.values()) <= K and sum(sizes.values()) == K
        assert max(sizes.values()) - min(sizes.values()) <= 1
        memory.reduce(sizes)
        new = t - 1
        full_lists[new] = rng.permutation(100)[: sizes[new]]
        memory.add(new, full_lists[new])
        assert len(memory) <= K
        for c in range(t):  # every class keeps a prefix of its herding order
            kept = memory.exemplars[c]
            assert len(kept) == sizes[c]
            assert np.array_equal(kept, full_lists[c][: len(kept)])
    fixed = ExemplarMemory(budget=None, per_class=5)
    assert fixed.sizes([0, 1, 2, 3]) == {0: 5, 1: 5, 2: 5, 3: 5}
    with pytest.raises(TLError):
        ExemplarMemory(budget=None, per_class=None)


def test_nme_matches_a_hand_computed_case():
    # class 0 exemplars (2,0), (0,2) -> normalised (1,0), (0,1) -> mean (0.5,0.5) -> renormalised (1,1)/sqrt2
    # class 1 exemplar (-3,0) -> (-1,0)
    feats = torch.tensor([[2.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    means = class_means(feats, torch.tensor([0, 0, 1]), num_classes=2)
    s = 1 / math.sqrt(2)
    assert torch.allclose(means, torch.tensor([[s, s], [-1.0, 0.0]]), atol=1e-6)
    # query (-2, 1) -> (-2, 1)/sqrt5; cos to class 0 = -1/sqrt10, to class 1 = 2/sqrt5; ||a-b|| = sqrt(2 - 2 cos)
    q = torch.tensor([[-2.0, 1.0], [1.0, 0.1]])
    scores = nme_scores(q, means)
    expected0 = [-math.sqrt(2 + 2 / math.sqrt(10)), -math.sqrt(2 - 4 / math.sqrt(5))]
    assert torch.allclose(scores[0], torch.tensor(expected0), atol=1e-5)
    assert scores.argmax(1).tolist() == [1, 0]
    # flip-averaged means: the mean of both views' normalised features, renormalised
    flipped = torch.tensor([[0.0, 2.0], [2.0, 0.0], [3.0, 0.0]])
    fmeans = class_means(feats, torch.tensor([0, 0, 1]), 2, flipped=flipped)
    assert torch.allclose(fmeans[0], torch.tensor([s, s]), atol=1e-6)
    assert torch.allclose(fmeans[1], torch.tensor([0.0, 0.0]), atol=1e-6)  # (-1,0) and (1,0) cancel


# ----- losses: distillation targets from the frozen previous model ---------------------------------------------
def test_icarl_targets_distil_old_classes_and_one_hot_new_ones():
    old_logits = torch.tensor([[2.0, -1.0, 9.0], [0.0, 3.0, 9.0]])
    y = torch.tensor([2, 3])
    t = icarl_targets(y, old_logits, num_old=2, num_seen=4)
    assert torch.allclose(t[:, :2], torch.sigmoid(old_logits[:, :2]))
    assert t[:, 2:].tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_distillation_targets_come_from_the_frozen_previous_model():
    torch.manual_seed(0)
    model = ICaRL(backbone="digit_cnn", weights="none", num_classes=4, memory_budget=10)
    previous = ICaRL(backbone="digit_cnn", weights="none", num_classes=4, memory_budget=10).net.eval()
    previous.requires_grad_(False)
    model._previous = [previous]
    model.train()
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([2, 3, 2, 3, 0, 1])
    logits = model(x)[:, :4]
    loss = model.representation_loss(logits, y, x, num_old=2)
    with torch.no_grad():
        old = previous(x)[:, :2]
    target = torch.cat([torch.sigmoid(old), F.one_hot(y, 4)[:, 2:].float()], 1)
    assert torch.allclose(loss, F.binary_cross_entropy_with_logits(logits, target), atol=1e-6)
    loss.backward()
    assert all(p.grad is None for p in previous.parameters())  # frozen: no gradient reaches it
    assert not any(p is q for p in model.parameters() for q in previous.parameters())
    # another previous model gives other targets, hence another loss
    with torch.no_grad():
        for p in previous.head.parameters():
            p.add_(1.0)
    assert not torch.allclose(model.representation_loss(logits.detach(), y, x, num_old=2), loss.detach())
    # the transfer preset: softmax CE + tau^2-scaled KD against the previous model's old-class softmax
    kd_model = ICaRL(backbone="digit_cnn", weights="none", num_classes=4, preset="transfer", kd_temperature=2.0)
    kd_model._previous = [previous]
    kd = kd_model.representation_loss(logits.detach(), y, x, num_old=2)
    with torch.no_grad():
        old = previous(x)[:, :2]
    soft = F.softmax(old / 2, 1)
    kd_term = -(soft * F.log_softmax(logits.detach()[:, :2] / 2, 1)).sum(1).mean()
    manual = F.cross_entropy(logits.detach(), y) + 4 * kd_term
    assert torch.allclose(kd, manual, atol=1e-5)
    assert torch.allclose(distillation_loss(old, old, 2.0), 4 * -(soft * soft.log()).sum(1).mean(), atol=1e-5)
    assert icarl_loss(logits, y, None, 0).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(logits, F.one_hot(y, 4).float()).item(), rel=1e-6)


def test_metrics_forgetting_and_average_incremental_accuracy():
    R = [[0.9], [0.7, 0.8], [0.6, 0.5, 0.9]]
    # task 0: best earlier 0.9 -> 0.6 (0.3); task 1: best earlier 0.8 -> 0.5 (0.3)
    assert forgetting(R) == pytest.approx(0.3)
    s = summarize(R, [0.9, 0.75, 0.6])
    assert s["average_incremental_accuracy"] == pytest.approx(0.75)
    assert s["last_accuracy"] == 0.6


# ----- the wrapper DataModule ------------------------------------------------------------------------------------
def test_incremental_datamodule_tasks_memory_replay_and_errors():
    dm = ClassIncrementalDataModule(DigitsDataModule(num_workers=0, samples_per_class=20), classes_per_task=3,
                                    initial_classes=4, class_order_seed=1, backbone="digit_cnn")
    assert dm.dataset.backbone == "digit_cnn"
    assert dm.num_tasks == 3 and list(dm.task_classes(0)) == [0, 1, 2, 3] and list(dm.task_classes(2)) == [7, 8, 9]
    assert sorted(dm.class_names) == [str(i) for i in range(10)] and dm.num_classes == 10
    dm.setup()
    full = dm.full_split("train")
    original = dm.dataset.splits["train"]
    # labels are positions in the class order
    assert np.array_equal(np.asarray(dm.order)[full.targets], original.targets)
    dm.set_task(1)
    train = dm.split_dataset("train")
    assert set(train.targets.tolist()) == {4, 5, 6}
    assert set(dm.split_dataset("test").targets.tolist()) == set(range(7))  # every class seen so far
    memory = np.flatnonzero(full.targets < 4)[::5]
    dm.set_task(1, memory)
    train = dm.split_dataset("train")
    assert len(train) == (full.targets >= 4).sum() - (full.targets >= 7).sum() + len(memory)
    assert set(train.targets.tolist()) == set(range(7))
    x, y = train[len(train) - 1]
    assert x.shape == (3, 32, 32) and int(y) < 4  # the replayed exemplars come last, relabelled
    explicit = ClassIncrementalDataModule(DigitsDataModule(num_workers=0), classes_per_task=2, class_order=[9, "3"])
    assert explicit.class_names == ["9", "3"] and explicit.num_tasks == 1
    with pytest.raises(TLError, match="do not split"):
        ClassIncrementalDataModule(DigitsDataModule(), classes_per_task=4)
    with pytest.raises(TLError, match="twice"):
        ClassIncrementalDataModule(DigitsDataModule(), classes_per_task=1, class_order=[1, 1])


# ----- one fit runs every task -------------------------------------------------------------------------------------
class _TaskRecorder(L.Callback):
    def __init__(self):
        self.epochs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx:
            return
        dm = trainer.datamodule
        opt = trainer.optimizers[0]
        trained = {id(p) for g in opt.param_groups for p in g["params"]}
        previous = pl_module.previous_model
        self.epochs.append({
            "task": pl_module.task, "optimizer": opt, "steps_in_state": len(opt.state),
            "labels": set(dm.split_dataset("train").targets.tolist()),
            "memory": len(pl_module.memory), "memory_labels": set(pl_module.memory.exemplars),
            "previous_trained": previous is not None and any(id(p) in trained for p in previous.parameters()),
            "previous_in_state_dict": any(k.startswith("_previous") for k in pl_module.state_dict()),
        })


def test_one_fit_runs_every_task_with_fresh_optimizers_and_replay(tmp_path):
    torch.manual_seed(0)
    dm = ClassIncrementalDataModule(DigitsDataModule(num_workers=0, samples_per_class=20, batch_size=32),
                                    classes_per_task=2, class_order=[5, 3, 8, 0, 1, 7], eval_samples_per_class=10,
                                    backbone="digit_cnn")
    model = ICaRL(backbone="digit_cnn", weights="none", epochs_per_task=2, memory_budget=12, flip_nme=True,
                  num_classes=dm.num_classes, class_names=dm.class_names)
    recorder = _TaskRecorder()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder],
                        default_root_dir=str(tmp_path), reload_dataloaders_every_n_epochs=1)
    trainer.fit(model, datamodule=dm)
    assert trainer.current_epoch == 6  # max_epochs unset: the schedule stops the fit after 3 tasks x 2 epochs
    e = recorder.epochs
    assert [r["task"] for r in e] == [0, 0, 1, 1, 2, 2]
    assert e[0]["labels"] == {0, 1} and e[2]["labels"] == {0, 1, 2, 3} and e[4]["labels"] == set(range(6))
    assert e[2]["memory_labels"] == {0, 1} and e[4]["memory_labels"] == {0, 1, 2, 3}
    assert all(r["memory"] <= 12 for r in e) and len(model.memory) <= 12
    # a fresh optimizer state (empty) at each task start, kept within a task
    assert [r["steps_in_state"] == 0 for r in e] == [True, False, True, False, True, False]
    assert not any(r["previous_trained"] or r["previous_in_state_dict"] for r in e)
    # both classifiers evaluated after every task; the report files are written
    res = model.results()["incremental"]
    assert [len(r) for r in res["nme"]["accuracy_matrix"]] == [1, 2, 3]
    assert [len(r) for r in res["cnn"]["accuracy_matrix"]] == [1, 2, 3]
    assert all(0 <= a <= 1 for a in res["nme"]["seen_accuracy"] + res["cnn"]["seen_accuracy"])
    assert res["nme"]["last_accuracy"] > 1 / 6  # better than chance on 6 classes
    for name in ("incremental.json", "incremental_accuracy.png", "accuracy_matrix.png"):
        assert (tmp_path / name).stat().st_size > 0


# ----- CLI, checkpoint and resume mid-sequence ----------------------------------------------------------------------
def test_cli_fit_stops_mid_sequence_and_resumes_in_the_same_task(tmp_path):
    run = tmp_path / "run"
    run_cli("fit", *DIGITS, *FAST, f"--trainer.default_root_dir={run}", "--trainer.max_epochs=3")
    last = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    state = ckpt["icarl"]
    assert state["finished"] == 1 and sorted(state["memory"]["exemplars"]) == [0, 1]  # stopped inside task 2
    assert state["class_order"] == ["5", "3", "8", "0", "1", "7"]
    assert len(state["rows"]["cnn"]) == 1 and state["previous_model"] is not None
    assert state["optimizer_task"] == 1 and ckpt["ClassIncrementalDataModule"]["task"] == 1

    # testing the checkpoint serves the task it was in (the DataModule's checkpointed state): the 4 classes seen
    labels = set()

    class TestLabels(L.Callback):
        def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            labels.update(batch[1].tolist())

    dm = ClassIncrementalDataModule(DigitsDataModule(num_workers=0, samples_per_class=20, batch_size=32),
                                    classes_per_task=2, class_order=[5, 3, 8, 0, 1, 7], eval_samples_per_class=10,
                                    backbone="digit_cnn")
    model = ICaRL(backbone="digit_cnn", weights="none", epochs_per_task=2, num_classes=dm.num_classes)
    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
              callbacks=[TestLabels()], default_root_dir=str(tmp_path)).test(model, datamodule=dm, ckpt_path=last)
    assert labels == {0, 1, 2, 3} and model.task == 1

    # resume up to the end of task 2: that checkpoint is written after the task's end (memory of 4 classes)
    run_cli("fit", *DIGITS, *FAST, f"--trainer.default_root_dir={run}", f"--ckpt_path={last}",
            "--trainer.max_epochs=4")
    boundary = torch.load(last, map_location="cpu", weights_only=False)
    assert boundary["icarl"]["finished"] == 2 and boundary["icarl"]["optimizer_task"] == 1  # task 3 not started
    assert boundary["ClassIncrementalDataModule"]["task"] == 2  # the data side serves task 3 next
    assert sorted(boundary["icarl"]["memory"]["exemplars"]) == [0, 1, 2, 3]

    run_cli("fit", *DIGITS, *FAST, f"--trainer.default_root_dir={run}", f"--ckpt_path={last}")
    metrics = read_metrics(run)
    inc = metrics["incremental"]
    assert inc["tasks_finished"] == 3 and inc["classes_seen"] == [2, 4, 6]
    assert metrics["epochs"] == 6
    # no metric ranks the epochs (accuracy falls as classes arrive): the best checkpoint is last.ckpt itself,
    # and no second copy of the same state is written every epoch
    assert metrics["best_checkpoint"] == str(last)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    # task 1's evaluation and exemplars come from the checkpoint: the same numbers, the memory a prefix of it
    assert inc["cnn"]["accuracy_matrix"][0] == state["rows"]["cnn"][0]
    end = torch.load(last, map_location="cpu", weights_only=False)
    # task 3 started with a fresh optimizer: its step count is task 3's steps only, not tasks 1-3's
    adam_steps = {int(s["step"]) for s in end["optimizer_states"][0]["state"].values()}
    assert adam_steps == {end["global_step"] - boundary["global_step"]}
    final = end["icarl"]["memory"]["exemplars"]
    for c in (0, 1):
        saved = state["memory"]["exemplars"][c]
        assert len(final[c]) < len(saved) and final[c] == saved[: len(final[c])]
    assert sum(len(v) for v in final.values()) <= 40
    assert (run / "accuracy_matrix.png").exists() and (run / "incremental_accuracy.png").exists()

    # a run killed after task 2's last epoch but before its end-of-task step (the iCaRL state still says task 2
    # is in progress) does that step first on resume: the same weights give the same exemplars and accuracies
    pre_end = dict(boundary, icarl=state, ClassIncrementalDataModule=ckpt["ClassIncrementalDataModule"])
    torch.save(pre_end, tmp_path / "pre_end.ckpt")
    other = tmp_path / "caught_up"
    run_cli("fit", *DIGITS, *FAST, f"--trainer.default_root_dir={other}", f"--ckpt_path={tmp_path / 'pre_end.ckpt'}")
    caught = torch.load(other / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert caught["icarl"]["rows"]["cnn"][1] == boundary["icarl"]["rows"]["cnn"][1]
    assert caught["icarl"]["rows"]["nme"][1] == boundary["icarl"]["rows"]["nme"][1]
    for c in (2, 3):
        herded = boundary["icarl"]["memory"]["exemplars"][c]
        kept = caught["icarl"]["memory"]["exemplars"][c]
        assert kept == herded[: len(kept)]
    adam_steps = {int(s["step"]) for s in caught["optimizer_states"][0]["state"].values()}
    assert adam_steps == {caught["global_step"] - boundary["global_step"]}


def test_cli_rejects_a_plain_datamodule(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        run_cli("fit", "--model=tl_lightning.methods.ICaRL", "--model.backbone=digit_cnn",
                "--model.weights=none", "--data=tl_lightning.data.DigitsDataModule", *FAST,
                f"--trainer.default_root_dir={tmp_path}")
    assert err.value.code == 2
    assert "class-incremental DataModule" in capsys.readouterr().err


def _digit_weights(path, seed: int) -> str:
    torch.manual_seed(seed)
    torch.save(create_backbone("digit_cnn", "none", num_classes=0).state_dict(), path)
    return str(path)


def _served_features_dm(weights: str, cache) -> ClassIncrementalDataModule:
    return ClassIncrementalDataModule(DigitsDataModule(num_workers=0, samples_per_class=15, batch_size=32,
                                                       cache_dir=str(cache)),
                                      classes_per_task=2, class_order=[0, 1, 2, 3], backbone="digit_cnn",
                                      serve_features={"weights": weights})


def _trainer(tmp_path, callbacks=()) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
                     default_root_dir=str(tmp_path), reload_dataloaders_every_n_epochs=1)


def test_transfer_preset_with_a_frozen_backbone_on_served_features(tmp_path):
    # the CUB/Flowers configs freeze the bundled Lite0; here a saved digit CNN keeps the test fast on a CPU
    weights = _digit_weights(tmp_path / "digit_cnn.pt", seed=1)
    dm = _served_features_dm(weights, tmp_path / "cache")
    images = dm.dataset.split_dataset("val", deterministic=True)
    rng = torch.get_rng_state()
    features = BackboneFeatures("digit_cnn", weights, str(tmp_path / "other_cache"))  # builds a model: draws weights
    features.split("val", images, dm.dataset.make_loader)  # extracts: iterates a loader
    assert torch.equal(rng, torch.get_rng_state())  # the run's random stream is left where it was
    model = ICaRL(backbone="digit_cnn", weights=weights, freeze_backbone=True, neck_dim=32, preset="transfer",
                  epochs_per_task=2, memory_budget=10, num_classes=dm.num_classes)
    assert model.loss_name == "kd" and not model.flip_nme
    before = {k: v.clone() for k, v in model.net.backbone.state_dict().items()}
    inputs = []

    class Inputs(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            inputs.append(tuple(batch[0].shape[1:]))

    _trainer(tmp_path, [Inputs()]).fit(model, datamodule=dm)
    assert set(inputs) == {(model.net.backbone.num_features,)}  # training read the data side's features
    assert list((tmp_path / "cache" / "features").glob("*.pt"))
    # the served features are the model's own backbone features of the deterministic images
    images, test = dm.dataset.split_dataset("test", deterministic=True), dm.full_split("test")
    x = torch.stack([images[int(i)][0] for i in test.indices[:8]])  # rows are the wrapped split's samples
    served = torch.stack([test[k][0] for k in range(8)])
    with torch.no_grad():
        assert torch.allclose(served, model.net.backbone.eval()(x), atol=1e-5)
    assert [test[k][1] for k in range(8)] == [dm.order.index(images[int(i)][1]) for i in test.indices[:8]]
    after = model.net.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # frozen, BatchNorm statistics included
    res = model.results()["incremental"]
    assert len(res["nme"]["accuracy_matrix"]) == 2 and len(res["cnn"]["seen_accuracy"]) == 2


def test_served_features_must_match_the_models_frozen_backbone(tmp_path):
    served = _digit_weights(tmp_path / "a.pt", seed=1)
    other = _digit_weights(tmp_path / "b.pt", seed=2)
    dm = _served_features_dm(served, tmp_path / "cache")
    model = ICaRL(backbone="digit_cnn", weights=other, freeze_backbone=True, preset="transfer",
                  epochs_per_task=1, num_classes=dm.num_classes)
    with pytest.raises(TLError, match="other weights than the model's backbone"):
        _trainer(tmp_path).fit(model, datamodule=dm)
    trainable = ICaRL(backbone="digit_cnn", weights=served, freeze_backbone=False, preset="transfer",
                      epochs_per_task=1, num_classes=dm.num_classes)
    with pytest.raises(TLError, match="freeze_backbone=true"):
        _trainer(tmp_path).fit(trainable, datamodule=_served_features_dm(served, tmp_path / "cache"))
    with pytest.raises(TLError, match="weights 'none' would extract features with a random backbone"):
        _served_features_dm("none", tmp_path / "cache").setup()
    # an augmented data set is served as images; a request for read-outs (FeatureExtraction's) is refused
    assert ClassIncrementalDataModule(DigitsDataModule(augment=True), serve_features={"weights": served},
                                      classes_per_task=2).feature_weights is None
    with pytest.raises(TLError, match="serves pooled features only"):
        ClassIncrementalDataModule(DigitsDataModule(), serve_features={"weights": served, "readouts": ["x"]})


def test_icarl_asks_for_served_features_only_for_a_frozen_pretrained_backbone_without_flips():
    assert ICaRL.served_features(weights="bundled", freeze_backbone=True, preset="transfer") == {"weights": "bundled"}
    assert ICaRL.served_features(weights="bundled", freeze_backbone=False, preset="transfer") is None
    assert ICaRL.served_features(weights="bundled", freeze_backbone=True, preset="paper") is None  # flipped NME
    assert ICaRL.served_features(weights="bundled", freeze_backbone=True, preset="paper", flip_nme=False)
    assert ICaRL.served_features(weights="none", freeze_backbone=True, preset="transfer") is None


def test_the_task_schedule_needs_loaders_rebuilt_every_epoch(tmp_path):
    dm = ClassIncrementalDataModule(DigitsDataModule(num_workers=0, samples_per_class=5), classes_per_task=2,
                                    class_order=[0, 1], backbone="digit_cnn")
    model = ICaRL(backbone="digit_cnn", weights="none", epochs_per_task=1, num_classes=dm.num_classes)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=str(tmp_path))
    with pytest.raises(TLError, match="reload_dataloaders_every_n_epochs=1"):
        trainer.fit(model, datamodule=dm)


def test_compile_advice_counts_the_task_sequence_not_lightnings_default_thousand_epochs(tmp_path):
    """ICaRL leaves ``max_epochs`` unset (Lightning plans 1,000 epochs) and stops after its last task: the compile
    tip must project the sequence's own batches, or it tells a 5-second fit it has minutes left."""
    from tl_lightning.callbacks.compile_advice import CompileAdvice

    dm = ClassIncrementalDataModule(DigitsDataModule(num_workers=0, samples_per_class=20, batch_size=8),
                                    classes_per_task=2, class_order=[5, 3, 8, 0, 1, 7], eval_samples_per_class=10,
                                    backbone="digit_cnn")
    model = ICaRL(backbone="digit_cnn", weights="none", epochs_per_task=2, memory_budget=40, flip_nme=False,
                  num_classes=dm.num_classes)
    advice = CompileAdvice(probe_batches=2)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        reload_dataloaders_every_n_epochs=1, callbacks=[advice], default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=dm)
    assert trainer.max_epochs == 1000 and trainer.current_epoch == 6  # Lightning planned 1,000; 3 tasks x 2 ran
    dm.set_task(0)
    per_epoch = len(dm.train_dataloader())  # the first task's batches (the probe ran in it)
    assert per_epoch == 5 and advice.left == 6 * per_epoch - 3  # the probe ended at the third batch


def test_cli_plans_the_task_sequence_as_max_epochs_when_the_config_leaves_it_unset(tmp_path):
    """The progress bar and the planned batches count tasks x epochs_per_task (3 x 2 here), not Lightning's
    default 1,000 epochs; a max_epochs the config gives is kept (it stops mid-sequence, as documented)."""
    from tl_lightning.cli import run_cli as build

    planned = build([*DIGITS, *FAST, f"--trainer.default_root_dir={tmp_path / 'a'}"], run=False)
    assert planned.trainer.max_epochs == 6 and planned.datamodule.num_tasks == 3
    assert planned.trainer.estimated_stepping_batches < 6 * 100  # was 1,000 epochs' worth
    given = build([*DIGITS, *FAST, f"--trainer.default_root_dir={tmp_path / 'b'}", "--trainer.max_epochs=3"],
                  run=False)
    assert given.trainer.max_epochs == 3
