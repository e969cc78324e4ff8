"""FeatureExtraction's head on cached features: epochs through the CLI vs a plain PyTorch loop (and a bare
Lightning ``Trainer``) doing the same work, interleaved; ``bench/perf.py``'s ``overhead`` section calls
:func:`bench_head_overhead`.

Two cases, each filling the feature cache first so that every side reads the same tensors:

* ``shipped``: ``configs/quickstart.yaml`` as shipped (the full-network embedding of every conv layer, dropout,
  its batch size and optimiser), cut to a few epochs without validation. The target row.
* ``small``: the smallest step, a linear head on the 1280-d pooled features with batch 32, where Lightning's own
  per-step cost weighs most.

The plain loop calls the CLI-built module's own forward and loss on a shuffled loader over the same cached train
features, with AdamW on the head at the module's learning rate and weight decay.
"""
from __future__ import annotations

import tempfile
import warnings
from typing import Callable

import lightning as L
import torch

from bench.overhead import cli_timer, loop_rates, median_step_rate, plain_step, ratios, split_steady

QUICKSTART = "configs/quickstart.yaml"
_RUN = ["--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", "--trainer.accelerator=cpu",
        "--seed_everything=0"]


def shipped_args(root: str, cache_dir: str, epochs: int) -> list[str]:
    """``configs/quickstart.yaml`` (FeatureExtraction, linear head on the FNE of every conv layer) through the CLI."""
    return ["--config", QUICKSTART, f"--model.init_args.cache_dir={cache_dir}", "--data.init_args.num_workers=0",
            f"--trainer.max_epochs={epochs}", f"--trainer.default_root_dir={root}", *_RUN]


def small_args(root: str, cache_dir: str, epochs: int) -> list[str]:
    """A linear head on the 1280-d pooled EfficientNet-Lite0 features of digits at 32 px, batch 32."""
    return ["--model=tl_lightning.methods.FeatureExtraction", "--model.backbone=tf_efficientnet_lite0",
            "--model.weights=bundled", "--model.embedding=pooled", f"--model.cache_dir={cache_dir}",
            "--data=tl_lightning.data.DigitsDataModule", "--data.image_size=32", "--data.batch_size=32",
            "--data.num_workers=0", "--data.val_fraction=0.1", "--data.test_fraction=0.1",
            f"--trainer.max_epochs={epochs}", f"--trainer.default_root_dir={root}", *_RUN]


CASES: dict[str, Callable[[str, str, int], list[str]]] = {"shipped": shipped_args, "small": small_args}


def tl_head_steps_per_s(case: str, cache_dir: str, epochs: int, warmup: int) -> tuple[float, float]:
    """(overall steps/s, median-step steps/s) through the CLI."""
    timer = cli_timer(lambda root: CASES[case](root, cache_dir, epochs), warmup)
    return timer.steps_per_s, median_step_rate(timer.ends, warmup)


def head_model_and_loader(case: str, cache_dir: str, epochs: int):
    """The CLI's FeatureExtraction module and a shuffled loader (the DataModule's batch size) over its cached
    train features (warm cache)."""
    from torch.utils.data import DataLoader, TensorDataset

    from tl_lightning.cli import run_cli

    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = run_cli(CASES[case](root, cache_dir, epochs), run=False)
    model, dm = cli.model, cli.datamodule
    L.seed_everything(0, verbose=False)
    dm.setup("fit")
    feats = dm.feature_matrices("train")  # what the CLI's DataModule serves the module
    return model, DataLoader(TensorDataset(feats[model.readout], feats["targets"]), batch_size=dm.batch_size,
                             shuffle=True)


def plain_head_steps_per_s(case: str, cache_dir: str, epochs: int, warmup: int) -> tuple[float, float]:
    """The same head epochs in plain PyTorch: the module's own forward on the same cached features, AdamW."""
    model, loader = head_model_and_loader(case, cache_dir, epochs)
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=model.lr, weight_decay=model.weight_decay)
    model.train()
    ends: list[float] = []
    for _ in range(epochs):
        for x, y in loader:
            plain_step(optimizer, model.loss(model(x), y), ends)
    return loop_rates(ends, warmup)


class _BareHead(L.LightningModule):
    """The head's step alone in Lightning: no logging, no metrics, no callbacks (the loop's own floor)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx: int):
        x, y = batch
        return self.model.loss(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.head.parameters(), lr=self.model.lr, weight_decay=self.model.weight_decay)


def bare_lightning_head_steps_per_s(case: str, cache_dir: str, epochs: int, warmup: int) -> tuple[float, float]:
    """The same head epochs in a bare Lightning Trainer (no logger, checkpoints, progress bar or callbacks)."""
    from bench.perf_common import StepTimer

    model, loader = head_model_and_loader(case, cache_dir, epochs)
    timer = StepTimer(warmup)
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                            default_root_dir=root)
        trainer.fit(_BareHead(model), loader)
    return timer.steps_per_s, median_step_rate(timer.ends, warmup)


def describe(case: str, cache_dir: str, epochs: int) -> str:
    model, loader = head_model_and_loader(case, cache_dir, epochs)
    what = f"{QUICKSTART}: " if case == "shipped" else ""
    embedding = "FNE of every conv layer" if model.embedding == "fne" else "pooled features"
    return (f"{what}linear head on the {model.feature_dim}-d {embedding} of {model.backbone_name}, batch "
            f"{loader.batch_size}, {epochs} epochs, {torch.get_num_threads()} threads")


def bench_head_overhead(rounds: int = 5, epochs: int = 5, warmup: int = 5, cases=("shipped", "small")):
    from bench.perf_common import Row, interleaved

    sides = {"plain PyTorch": plain_head_steps_per_s, "bare Lightning": bare_lightning_head_steps_per_s,
             "tl_lightning": tl_head_steps_per_s}
    rows = []
    for case in cases:
        with tempfile.TemporaryDirectory() as cache_dir:
            tl_head_steps_per_s(case, cache_dir, 1, 1)  # fills the feature cache: all sides read it warm
            what = describe(case, cache_dir, epochs)
            runs, steady = split_steady({name: (lambda fn=fn: fn(case, cache_dir, epochs, warmup))
                                         for name, fn in sides.items()})
            res = interleaved(runs, rounds)
        tl, plain, ratio, per_round = ratios(res, "tl_lightning")
        _, _, bare_ratio, bare_rounds = ratios(res, "bare Lightning")
        _, _, step_ratio, _ = ratios(steady, "tl_lightning")
        _, _, bare_step_ratio, _ = ratios(steady, "bare Lightning")
        rows.append(Row("overhead", f"FeatureExtraction head epochs on cached features, tl_lightning / plain "
                        f"PyTorch ({what})", tl, plain, "steps/s", ratio, "<= 1.05",
                        f"median of {rounds} rounds: {per_round}. Steady step alone (median step time, without "
                        f"the epoch-end checkpoint): {step_ratio:.2f}. A bare Lightning Trainer (no logging, "
                        f"metrics, checkpoints or callbacks) on the same step: {bare_ratio:.2f} ({bare_rounds}), "
                        f"steady step {bare_step_ratio:.2f}", ratio <= 1.05,
                        extra={"case": case, "steady_step_ratio": step_ratio, "bare_lightning_ratio": bare_ratio,
                               "bare_lightning_steady_step_ratio": bare_step_ratio}))
        print(f"  {rows[-1].name}: {ratio:.2f}", flush=True)
    return rows
