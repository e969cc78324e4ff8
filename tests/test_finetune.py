"""FineTune and the staged-unfreezing strategies: frozen tensors, per-group learning rates, BatchNorm, resume, DDP.

Real components throughout: the bundled ImageNet EfficientNet-Lite0 at 32 px on scikit-learn's digits, fitted
by a real Lightning Trainer. A recording callback snapshots the weights after every epoch.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from fault_helpers import cli
from helpers import FAST, REPO, read_metrics, run_cli
from tl_lightning.backbones import create_backbone, layer_groups
from tl_lightning.callbacks.results import BestCheckpoint
from tl_lightning.callbacks.unfreeze import LPFT, FreezeUnfreeze, Gradual, Milestones, make_strategy
from tl_lightning.data import DigitsDataModule
from tl_lightning.errors import TLError
from tl_lightning.methods import FineTune

LR = 0.01
DECAY = 0.5
GROUPS = ["stem", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4", "blocks.5", "blocks.6", "head"]
SMALL_DATA = ("--data.image_size=32", "--data.samples_per_class=3", "--data.batch_size=16",
              "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1")


def make_model(unfreeze, **kwargs) -> FineTune:
    kwargs.setdefault("lr", LR)
    kwargs.setdefault("lr_decay", DECAY)
    # SGD with momentum and weight decay: a frozen tensor must not move through either
    kwargs.setdefault("optimizer", lambda params: torch.optim.SGD(params, momentum=0.9, weight_decay=1e-2))
    return FineTune(backbone="tf_efficientnet_lite0", weights="bundled", unfreeze=unfreeze, num_classes=10, **kwargs)


def make_data() -> DigitsDataModule:
    return DigitsDataModule(batch_size=16, image_size=32, samples_per_class=3, num_workers=0, val_fraction=0.05,
                            test_fraction=0.05, seed=0)


def make_trainer(epochs: int, callbacks=(), root=None) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=root is not None, num_sanity_val_steps=0,
                     limit_val_batches=1, callbacks=list(callbacks), default_root_dir=root)


def backbone_state(model: FineTune) -> dict[str, dict[str, torch.Tensor]]:
    """Per layer group: its parameters and its BatchNorm buffers (running statistics), cloned."""
    state = {n: t.detach().clone() for n, t in model.state_dict().items()}
    out = {}
    for group, params in model.groups.items():
        prefixes = {p.rsplit(".", 1)[0] + "." for p in params}
        out[group] = {n: t for n, t in state.items() if any(n.startswith(pre) for pre in prefixes)}
    return out


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Recorder(L.Callback):
    """Snapshots of every group after each epoch, learning rates and BatchNorm modes during each epoch."""

    def __init__(self):
        self.initial = None
        self.after_epoch: list[dict] = []
        self.lrs: list[dict] = []
        self.optimizer_lrs: list[dict] = []
        self.bn_training: list[dict] = []
        self.requires_grad: list[dict] = []
        self.num_param_groups: list[int] = []

    def on_fit_start(self, trainer, pl_module):
        self.initial = backbone_state(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx:
            return
        optimizer = trainer.optimizers[0]
        self.lrs.append(pl_module.current_lrs())
        self.optimizer_lrs.append({g["name"]: g["lr"] for g in optimizer.param_groups})
        self.num_param_groups.append(len(optimizer.param_groups))
        modes = {}
        for name, group in pl_module._bn_groups:
            modes.setdefault(group, set()).add(pl_module.get_submodule(name).training)
        self.bn_training.append(modes)
        params = dict(pl_module.named_parameters())
        self.requires_grad.append({g: {params[n].requires_grad for n in names}
                                   for g, names in pl_module.groups.items()})

    def on_train_epoch_end(self, trainer, pl_module):
        self.after_epoch.append(backbone_state(pl_module))


def fit(unfreeze, epochs: int, **kwargs) -> tuple[FineTune, Recorder]:
    L.seed_everything(0)
    model, recorder = make_model(unfreeze, **kwargs), Recorder()
    make_trainer(epochs, [recorder]).fit(model, datamodule=make_data())
    return model, recorder


def changed_groups(before: dict, after: dict) -> list[str]:
    return [g for g in GROUPS if not equal(before[g], after[g])]


def discriminative_lr(group: str) -> float:
    return LR * DECAY ** (len(GROUPS) - 1 - GROUPS.index(group))


# ----- layer groups and learning rates ----------------------------------------------------------------------
def test_layer_groups_follow_timm_group_matcher():
    model = create_backbone("tf_efficientnet_lite0", "none")
    coarse = layer_groups(model, coarse=True)
    assert list(coarse) == GROUPS[:-1]
    assert "conv_head.weight" in coarse["blocks.6"]  # timm merges the final conv into the last stage
    fine = layer_groups(model)
    assert len(fine) == 17 and list(fine)[:3] == ["stem", "blocks.0.0", "blocks.1.0"]
    assert sum(len(v) for v in coarse.values()) == sum(len(v) for v in fine.values())


def test_group_learning_rates_decay_from_the_head_or_are_explicit():
    model = make_model("no_freeze")
    assert model.group_names == GROUPS
    assert model.group_lr == pytest.approx({g: discriminative_lr(g) for g in GROUPS})
    explicit = make_model("no_freeze", group_lrs={"blocks.6": 1e-3, "blocks.*": 1e-4, "head": 0.1})
    assert explicit.group_lr["head"] == 0.1 and explicit.group_lr["blocks.6"] == 1e-3
    assert explicit.group_lr["blocks.0"] == 1e-4 and explicit.group_lr["stem"] == pytest.approx(LR * DECAY ** 8)
    optimizer = explicit.configure_optimizers()
    assert [g["name"] for g in optimizer.param_groups] == GROUPS
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(explicit.parameters()))
    with pytest.raises(TLError, match="match no layer group"):
        make_model("no_freeze", group_lrs={"layer4": 1e-3})


def test_strategies_by_name_and_schedule():
    names = GROUPS[:-1]
    assert make_strategy("freeze").trainable_groups(5, names) == []
    assert make_strategy("no_freeze").trainable_groups(0, names) == names
    assert FreezeUnfreeze(2).trainable_groups(1, names) == [] and FreezeUnfreeze(2).trainable_groups(2, names) == names
    assert Milestones((1, 3), top_groups=2).trainable_groups(2, names) == ["blocks.5", "blocks.6"]
    assert Gradual(1).trainable_groups(3, names) == ["blocks.4", "blocks.5", "blocks.6"]
    assert make_strategy({"class_path": "tl_lightning.callbacks.unfreeze.Gradual",
                          "init_args": {"start_epoch": 2}}).config()["init_args"] == {"start_epoch": 2,
                                                                                       "groups_per_epoch": 1}
    with pytest.raises(TLError, match="unknown unfreeze strategy"):
        make_strategy("thaw")


# ----- phases -------------------------------------------------------------------------------------------------
def test_freeze_unfreeze_keeps_backbone_bit_identical_then_trains_it():
    # a StepLR halving every epoch: the scheduler covers the frozen groups too, from the first epoch on
    scheduler = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # noqa: E731
    model, rec = fit(FreezeUnfreeze(unfreeze_at_epoch=2), epochs=3, scheduler=scheduler)
    for epoch in (0, 1):  # before the unfreeze epoch: every backbone tensor, BatchNorm statistics included
        assert changed_groups(rec.initial, rec.after_epoch[epoch]) == ["head"]
        assert rec.lrs[epoch] == pytest.approx({g: (LR * 0.5 ** epoch if g == "head" else 0.0) for g in GROUPS})
        assert all(modes == {False} for modes in rec.bn_training[epoch].values())  # frozen BN in eval mode
        assert all(rec.requires_grad[epoch][g] == {g == "head"} for g in GROUPS)
    assert changed_groups(rec.after_epoch[1], rec.after_epoch[2]) == GROUPS
    assert rec.lrs[2] == pytest.approx({g: discriminative_lr(g) * 0.25 for g in GROUPS})
    assert all(modes == {True} for modes in rec.bn_training[2].values())
    # the optimizer's rates follow the schedule only, never the phase (no hidden division); all groups from the start
    for epoch, lrs in enumerate(rec.optimizer_lrs):
        assert lrs == pytest.approx({g: discriminative_lr(g) * 0.5 ** epoch for g in GROUPS})
    assert rec.num_param_groups == [len(GROUPS)] * 3


@pytest.mark.parametrize("unfreeze, trainable_per_epoch", [
    (Milestones((1, 2), top_groups=2), [["head"], ["blocks.5", "blocks.6", "head"], GROUPS]),
    (Gradual(start_epoch=1), [["head"], ["blocks.6", "head"], ["blocks.5", "blocks.6", "head"]]),
])
def test_staged_unfreezing_changes_only_unfrozen_groups(unfreeze, trainable_per_epoch):
    _, rec = fit(unfreeze, epochs=3)
    before = rec.initial
    for epoch, trainable in enumerate(trainable_per_epoch):
        after = rec.after_epoch[epoch]
        assert changed_groups(before, after) == trainable, f"epoch {epoch}"
        assert rec.lrs[epoch] == pytest.approx({g: discriminative_lr(g) if g in trainable else 0.0 for g in GROUPS})
        frozen_bn = {g: m for g, m in rec.bn_training[epoch].items() if g not in trainable}
        assert len(frozen_bn) == len(GROUPS) - len(trainable)
        assert all(modes == {False} for modes in frozen_bn.values())
        before = after


def test_train_bn_keeps_frozen_batchnorm_training():
    model, rec = fit("freeze", epochs=1, train_bn=True)
    bn_names = {m for m, _ in model._bn_groups}
    before, after = rec.initial["blocks.3"], rec.after_epoch[0]["blocks.3"]
    bn_keys = [k for k in before if k.rsplit(".", 1)[0] in bn_names]
    other = [k for k in before if k not in bn_keys]
    assert bn_keys and other
    # statistics and scales train (a shift followed by a training BatchNorm can get an exactly-zero gradient)
    assert all(not torch.equal(before[k], after[k]) for k in bn_keys if not k.endswith(".bias"))
    assert all(torch.equal(before[k], after[k]) for k in other)  # convolutions stay frozen
    assert all(modes == {True} for modes in rec.bn_training[0].values())


def test_lp_ft_fits_a_linear_probe_before_fine_tuning():
    model, rec = fit(LPFT(probe_steps=50), epochs=1)
    assert model.probe_train_acc is not None and model.probe_train_acc > 0.9
    assert rec.lrs[0] == pytest.approx({g: discriminative_lr(g) for g in GROUPS})
    assert changed_groups(rec.initial, rec.after_epoch[0]) == GROUPS


# ----- resume -------------------------------------------------------------------------------------------------
def test_resume_after_unfreeze_epoch_restores_the_phase(tmp_path):
    scheduler = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # noqa: E731
    L.seed_everything(0)
    first = make_model(FreezeUnfreeze(unfreeze_at_epoch=1), scheduler=scheduler)
    make_trainer(2, [BestCheckpoint()], root=str(tmp_path)).fit(first, datamodule=make_data())
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_file()
    saved = torch.load(last, map_location="cpu", weights_only=True)  # plain hyperparameters: loads safely
    assert saved["hyper_parameters"]["unfreeze"]["init_args"] == {"unfreeze_at_epoch": 1}

    resumed, rec = make_model(FreezeUnfreeze(unfreeze_at_epoch=1), scheduler=scheduler), Recorder()
    trainer = make_trainer(3, [BestCheckpoint(), rec], root=str(tmp_path))
    trainer.fit(resumed, datamodule=make_data(), ckpt_path=str(last))
    assert len(rec.lrs) == 1  # only epoch 2 ran
    assert all(rec.requires_grad[0][g] == {True} for g in GROUPS)  # not re-frozen
    assert all(modes == {True} for modes in rec.bn_training[0].values())
    assert rec.lrs[0] == pytest.approx({g: discriminative_lr(g) * 0.25 for g in GROUPS})
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 3
    assert changed_groups(backbone_state(first), rec.after_epoch[0]) == GROUPS


def test_cli_resume_from_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    args = ("fit", "--config", REPO / "configs/finetune/quickstart.yaml", *FAST, *SMALL_DATA,
            f"--trainer.default_root_dir={run}", "--model.unfreeze.unfreeze_at_epoch=1", "--test_after_fit=false",
            "--trainer.limit_train_batches=1")
    run_cli(*args, "--trainer.max_epochs=2")
    run_cli(*args, "--trainer.max_epochs=3", f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    history = read_metrics(run)["history"]
    assert [row["epoch"] for row in history][-1] == 2
    assert history[-1]["lr/stem"] > 0 and history[-1]["unfrozen_groups"] == len(GROUPS) - 1


def test_cli_unfreeze_by_name(tmp_path):
    run_cli("fit", "--config", REPO / "configs/finetune/quickstart.yaml", *FAST, *SMALL_DATA,
            "--model.unfreeze=gradual", "--trainer.max_epochs=2", "--trainer.limit_train_batches=1",
            f"--trainer.default_root_dir={tmp_path}")
    metrics = read_metrics(tmp_path)
    assert metrics["unfreeze"]["class_path"].endswith("Gradual")
    assert [row["unfrozen_groups"] for row in metrics["history"]] == [0, 1]
    assert "test/acc" in metrics["metrics"]


# ----- DDP ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_two_cpu_processes_freeze_unfreeze(tmp_path):
    run = tmp_path / "ddp"
    cmd = ["fit", "--config", str(REPO / "configs/finetune/quickstart.yaml"),
           "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu", "--trainer.max_epochs=2",
           "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
           "--data.num_workers=0", *SMALL_DATA, "--model.unfreeze.unfreeze_at_epoch=1",
           f"--trainer.default_root_dir={run}",
           "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
           f"--trainer.callbacks.dirpath={run / 'every_epoch'}", "--trainer.callbacks.save_top_k=-1",
           "--trainer.callbacks.filename={epoch}"]
    proc = cli(*cmd, env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = read_metrics(run)["history"]
    assert [row["lr/blocks.6"] > 0 for row in history] == [False, True]
    pretrained = create_backbone("tf_efficientnet_lite0", "bundled").state_dict()

    def backbone(path: Path) -> dict:
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        return {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}

    epoch0, epoch1 = backbone(run / "every_epoch" / "epoch=0.ckpt"), backbone(run / "every_epoch" / "epoch=1.ckpt")
    assert epoch0.keys() == pretrained.keys()
    assert all(torch.equal(epoch0[k], pretrained[k]) for k in pretrained)  # frozen under DDP: bit-identical
    assert any(not torch.equal(epoch1[k], pretrained[k]) for k in pretrained)  # trained after the unfreeze
