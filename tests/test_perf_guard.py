"""Regression guard (issue 8): a training step does one backbone forward per batch (none on cached features) and
no host-device synchronisation (``.item()``, ``float(t)``, ``.cpu()``...). Untimed: it counts the work itself."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from tl_lightning.callbacks.step_probe import StepProbe, SyncCounter
from tl_lightning.data import DigitsDataModule
from tl_lightning.methods import FeatureExtraction, FineTune

STEPS = 3


def digits(augment: bool, **kw) -> DigitsDataModule:
    return DigitsDataModule(batch_size=16, image_size=32, samples_per_class=6, num_workers=0, augment=augment,
                            val_fraction=0.1, test_fraction=0.1, seed=0, **kw)


def probe_fit(model: L.LightningModule, dm: DigitsDataModule) -> list[dict]:
    """Fit ``STEPS`` training batches in a real Trainer and return the probe's per-batch records."""
    probe = StepProbe()
    trainer = L.Trainer(max_epochs=1, limit_train_batches=STEPS, limit_val_batches=1, num_sanity_val_steps=0,
                        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[probe])
    trainer.fit(model, datamodule=dm)
    assert len(probe.steps) == STEPS
    return probe.steps


def finetune(**kw) -> FineTune:
    return FineTune(backbone="digit_cnn", weights="none", unfreeze="no_freeze", num_classes=10, **kw)


def feature_extraction(tmp_path, cache: bool) -> FeatureExtraction:
    return FeatureExtraction(backbone="digit_cnn", weights="none", embedding="penultimate", num_classes=10,
                             cache=cache, cache_dir=str(tmp_path / "features"))


def test_sync_counter_sees_every_host_conversion():
    t = torch.arange(4.0)
    with SyncCounter() as counter:
        t.sum().item(), float(t.max()), int(t.min()), t.cpu(), t.tolist(), bool(t.any())
        t * 2 + 1  # device-side work is not a sync
    assert counter.calls == {"item": 1, "__float__": 1, "__int__": 1, "cpu": 1, "tolist": 1, "__bool__": 1}


def logs_after_the_first_step(steps: list[dict]) -> list[int]:
    """``self.log`` calls of each step after the epoch's first (epoch values are handed over in the first)."""
    assert steps[0]["logs"] > 0
    return [s["logs"] for s in steps[1:]]


def test_finetune_step_one_forward_and_no_sync():
    model = finetune()
    steps = probe_fit(model, digits(augment=True))
    assert [s["forwards"] for s in steps] == [1] * STEPS
    assert [dict(s["syncs"]) for s in steps] == [{}] * STEPS
    # the rates and the unfrozen group count are handed over at the epoch's first batch and when they change:
    # constant here, so no ``self.log`` call after the first step (they were ten calls a step on Lite0)
    assert steps[0]["logs"] >= len(model.current_lrs()) + 1
    assert logs_after_the_first_step(steps) == [0] * (STEPS - 1)


@pytest.mark.parametrize("interval", ["epoch", "step"])
def test_finetune_logged_rates_are_the_current_ones_at_every_step(tmp_path, interval):
    """Every logged step row holds the rate the step trained at, whether the scheduler moves it per epoch or per
    step, though the rates are handed to ``self.log`` only when they change (and at each epoch's first batch)."""
    import csv
    from functools import partial

    from lightning.pytorch.loggers import CSVLogger

    model = finetune(lr=0.1, scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
                     scheduler_interval=interval)
    seen: list[float] = []

    class Rates(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.extend(g["lr"] for g in trainer.optimizers[0].param_groups if g["name"] == "head")

    probe = StepProbe()
    trainer = L.Trainer(max_epochs=2, limit_train_batches=STEPS, limit_val_batches=0, num_sanity_val_steps=0,
                        accelerator="cpu", devices=1, logger=CSVLogger(tmp_path), log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[probe, Rates()])
    trainer.fit(model, datamodule=digits(augment=False))
    rows = [r for r in csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))) if r.get("lr/head")]
    assert [int(r["step"]) for r in rows] == list(range(2 * STEPS))
    assert [float(r["lr/head"]) for r in rows] == pytest.approx(seen)
    expected = [0.1 * 0.5 ** (i // STEPS if interval == "epoch" else i) for i in range(2 * STEPS)]
    assert seen == pytest.approx(expected)  # the rate moved as the scheduler says
    calls = [s["logs"] > len(model.current_lrs()) for s in probe.steps]  # the rates were handed over
    assert calls == ([True] * (2 * STEPS) if interval == "step" else [True, False, False] * 2)


@pytest.mark.parametrize("augment, forwards", [(False, 0), (True, 1)])
def test_feature_extraction_step_forwards_and_no_sync(tmp_path, augment, forwards):
    """Fixed inputs: cached features are served (no backbone in the step); augmented ones: one forward a batch."""
    served = FeatureExtraction.served_features(weights="none", cache_dir=str(tmp_path / "features"))
    steps = probe_fit(feature_extraction(tmp_path, cache=True),
                      digits(augment=augment, backbone="digit_cnn", serve_features=served))
    assert [s["forwards"] for s in steps] == [forwards] * STEPS
    assert [dict(s["syncs"]) for s in steps] == [{}] * STEPS
    assert logs_after_the_first_step(steps) == [0] * (STEPS - 1)


def test_domain_adaptation_step_two_forwards_and_no_per_step_logging(tmp_path):
    """One forward per domain (per-domain BatchNorm statistics), no host sync, no ``self.log`` after the first
    step (the epoch values stay exact: ``test_epoch_logging.py``)."""
    from tl_lightning.data import DomainPairDataModule
    from tl_lightning.methods import DomainAdaptation

    dm = DomainPairDataModule(
        source={"class_path": "tl_lightning.data.DigitsDataModule", "init_args": {"seed": 0}},
        target={"class_path": "tl_lightning.data.digits.BlendedDigitsDataModule", "init_args": {"seed": 1}},
        labelled_per_class=2, backbone="digit_cnn", batch_size=16, num_workers=0)
    # SGD: Adam reads its step counters (CPU tensors by design, never a device sync) with .item() in its step,
    # which runs inside a manually optimised training_step
    model = DomainAdaptation(backbone="digit_cnn", domain_batchnorm=True, confusion="gradient_reversal",
                             soft_label_weight=0.0, source_pretrain_epochs=0, num_classes=10,
                             optimizer=lambda params: torch.optim.SGD(params, lr=0.01))
    probe = StepProbe(backbone=model.features)
    trainer = L.Trainer(max_steps=2 * STEPS, limit_val_batches=0, num_sanity_val_steps=0, accelerator="cpu",
                        devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[probe], default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)  # two optimizers: two steps a batch
    assert len(probe.steps) == STEPS
    assert [s["forwards"] for s in probe.steps] == [2] * STEPS
    assert [dict(s["syncs"]) for s in probe.steps] == [{}] * STEPS
    assert logs_after_the_first_step(probe.steps) == [0] * (STEPS - 1)


def test_icarl_step_one_forward_of_the_network_and_no_per_step_logging(tmp_path):
    from tl_lightning.data.incremental import ClassIncrementalDataModule
    from tl_lightning.methods import ICaRL

    dm = ClassIncrementalDataModule(DigitsDataModule(num_workers=0, samples_per_class=20, batch_size=16),
                                    classes_per_task=5, eval_samples_per_class=4, backbone="digit_cnn")
    model = ICaRL(backbone="digit_cnn", weights="none", epochs_per_task=1, memory_budget=10,
                  num_classes=dm.num_classes, class_names=dm.class_names)
    probe = StepProbe(backbone=model.net.backbone)
    trainer = L.Trainer(limit_train_batches=STEPS, limit_val_batches=0, num_sanity_val_steps=0, accelerator="cpu",
                        devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[probe], default_root_dir=tmp_path,
                        reload_dataloaders_every_n_epochs=1)
    trainer.fit(model, datamodule=dm)  # two tasks of one epoch each
    first, second = probe.steps[:STEPS], probe.steps[STEPS:]
    assert len(second) == STEPS
    # the previous model (a frozen copy, distilled from in the second task) is not the network counted here
    assert model.previous_model is not None
    assert [s["forwards"] for s in probe.steps] == [1] * 2 * STEPS
    assert [dict(s["syncs"]) for s in probe.steps] == [{}] * 2 * STEPS
    assert logs_after_the_first_step(first) == logs_after_the_first_step(second) == [0] * (STEPS - 1)


class WastefulFineTune(FineTune):
    """A step that runs the backbone twice and reads the loss on the host: what the guard must catch."""

    def training_step(self, batch, batch_idx):
        self.backbone(batch[0])
        loss = super().training_step(batch, batch_idx)
        self.print_loss = loss.item()
        return loss


def test_guard_catches_extra_forward_and_sync():
    steps = probe_fit(WastefulFineTune(backbone="digit_cnn", weights="none", unfreeze="no_freeze", num_classes=10),
                      digits(augment=True))
    assert [s["forwards"] for s in steps] == [2] * STEPS
    assert all(s["syncs"]["item"] == 1 for s in steps)


@pytest.mark.parametrize("setting", [True, "auto"])
def test_speed_switches_channels_last(tmp_path, setting):
    """``channels_last`` (forced, or ``auto`` on a convnet, the default) puts the backbone's conv weights and the
    image batches in NHWC; training still works."""
    model = finetune(channels_last=setting)
    seen = []

    class Layout(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(batch[0].is_contiguous(memory_format=torch.channels_last))

    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, accelerator="cpu", devices=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Layout()])
    trainer.fit(model, datamodule=digits(augment=True))
    assert seen == [True, True]
    assert model.backbone.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_speed_switch_compile_compiles_the_backbone_in_place():
    model = finetune(compile=True)
    keys = set(model.state_dict())
    model.configure_model()
    assert getattr(model.backbone, "_compiled_call_impl", None) is not None
    assert set(model.state_dict()) == keys  # checkpoints keep their parameter names
    assert not getattr(finetune().backbone, "_compiled_call_impl", None)


def test_channels_last_auto_is_on_for_convnets_and_off_for_transformers(tmp_path):
    import timm

    from tl_lightning.feature_cache import extract_features
    from tl_lightning.backbones import is_convnet

    assert is_convnet(timm.create_model("tf_efficientnet_lite0", pretrained=False))
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=0)
    assert not is_convnet(vit)  # its patch embedding is a 16x16 convolution, but it has attention blocks
    assert FineTune(backbone="digit_cnn", weights="none", num_classes=10).channels_last == "auto"
    convnet, off = finetune(), finetune(channels_last=False)
    for model in (convnet, off):
        model.configure_model()
    assert convnet.uses_channels_last and not off.uses_channels_last
    assert convnet.backbone.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert off.backbone.conv1[0].weight.is_contiguous()
    # feature extraction feeds the extractor's own layout (NHWC images for an NHWC network)
    seen = []
    convnet.backbone.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32),
                                                                        torch.zeros(4)), batch_size=2)
    extract_features(convnet.backbone, loader, torch.device("cpu"))
    assert seen == [True, True]


def test_compile_advice_only_when_a_long_eager_fit_repays_the_warm_up(tmp_path):
    from tl_lightning.callbacks.compile_advice import SPEEDUP, WARMUP_S, CompileAdvice, worth_compiling

    assert not worth_compiling(0.1, 100)  # 10 s of training left: the warm-up alone costs more
    assert worth_compiling(0.1, 100_000)  # hours left
    assert not worth_compiling(0.1, float("inf")) and not worth_compiling(0.1, 0)
    break_even = 2 * WARMUP_S / (1 - 1 / SPEEDUP)  # batches of 1 s: the saving must be twice the warm-up
    assert not worth_compiling(1.0, break_even - 1) and worth_compiling(1.0, break_even + 1)

    class StopAfterProbe(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            trainer.should_stop = trainer.should_stop or batch_idx >= 2

    advice = {}
    for compiled in (False, True):
        callback = CompileAdvice(probe_batches=2)
        model = finetune()
        model.compile_backbone = compiled  # only the flag: the advice never compiles anything itself
        # millions of batches planned: any step time makes the remaining eager fit longer than the warm-up
        L.Trainer(max_epochs=10 ** 7, limit_train_batches=3, limit_val_batches=0, accelerator="cpu", logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  callbacks=[callback, StopAfterProbe()], default_root_dir=tmp_path).fit(model, digits(False))
        advice[compiled] = callback.advice
    assert advice[True] is None
    assert advice[False] and "--model.init_args.compile=true" in advice[False]


class _CountedImages(torch.utils.data.Dataset):
    """40 tiny images; counts every fetch in a counter shared with the loader's worker processes."""

    def __init__(self):
        import multiprocessing

        self.fetches = multiprocessing.get_context("fork").Value("i", 0)

    def __len__(self) -> int:
        return 40

    def __getitem__(self, index: int):
        with self.fetches.get_lock():
            self.fetches.value += 1
        return torch.full((3, 8, 8), float(index)), index % 4


@pytest.mark.parametrize("persistent", [True, False])
def test_extraction_decodes_every_image_once_with_loader_workers(persistent):
    """The extraction loop starts the loader once: its workers' prefetched batches are used, not discarded by a
    second ``iter()`` (as tqdm.auto's wrapper did), so each image is decoded exactly once."""
    from torch.utils.data import DataLoader

    from tl_lightning.feature_cache import extract_features

    images = _CountedImages()
    loader = DataLoader(images, batch_size=8, num_workers=1, persistent_workers=persistent,
                        multiprocessing_context="fork")
    out = extract_features(torch.nn.Flatten(), loader, torch.device("cpu"))
    assert images.fetches.value == 40
    assert torch.equal(out["features"][:, 0], torch.arange(40, dtype=torch.float32))  # every image, in order
