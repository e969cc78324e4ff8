"""Per-method overhead: a method's training step through the CLI's Trainer and callbacks vs a plain PyTorch loop
that does the same work (same module, data loader, batch size, optimizers and thread count), interleaved.

``bench/perf.py``'s ``overhead`` section calls :func:`bench_head_overhead` and
:func:`bench_adaptation_overhead` beside its FineTune row.

* FeatureExtraction: a linear head trained over epochs on cached features (the feature cache filled first, so
  both sides read the same tensors); the plain loop calls the module's own forward with AdamW.
* DomainAdaptation: the BatchNorm digit CNN with per-domain statistics, DANN's reversed gradient, two optimizers
  stepped in one manual step, DANN's per-step learning-rate annealing and λ_p ramp, k = 3 labelled targets per
  class, on the offline digit pair held in memory. The plain loop calls the same module's ``trunk``,
  ``classifier`` and ``domain_classifier`` and the same loss functions, with no Trainer, logging or callbacks.
"""
from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from typing import Callable

import lightning as L
import torch

ADAPTATION_CONFIG = "configs/adaptation/digits_offline.yaml"


def adaptation_args(root: str, steps: int, batch_size: int) -> list[str]:
    """The offline pair config, switched to the per-domain BatchNorm DANN step the MNIST-M configs train."""
    return ["--config", ADAPTATION_CONFIG, "--model.init_args.backbone=digit_cnn",
            "--model.init_args.domain_batchnorm=true", "--model.init_args.confusion=gradient_reversal",
            "--model.init_args.confusion_weight=1.0", "--model.init_args.lr_annealing=true",
            "--model.init_args.soft_label_weight=0", "--model.init_args.source_pretrain_epochs=0",
            "--model.init_args.channels_last=false", f"--data.init_args.batch_size={batch_size}",
            "--data.init_args.in_memory=true", "--data.init_args.num_workers=0", f"--data.init_args.epoch={steps}",
            "--trainer.max_epochs=1", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
            "--trainer.accelerator=cpu", f"--trainer.default_root_dir={root}", "--seed_everything=0"]


def cli_steps_per_s(make_args: Callable[[str], list[str]], warmup: int) -> float:
    """Steps/s of a fit through the CLI's Trainer and callbacks (``run=False``, then ``fit`` with a StepTimer);
    ``make_args(root)`` gives the arguments for a temporary run folder."""
    from bench.perf import StepTimer
    from tl_lightning.cli import run_cli

    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = run_cli(make_args(root), run=False)
        timer = StepTimer(warmup)
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return timer.steps_per_s


def tl_adaptation_steps_per_s(steps: int, warmup: int, batch_size: int) -> float:
    return cli_steps_per_s(lambda root: adaptation_args(root, steps, batch_size), warmup)


def plain_adaptation_steps_per_s(steps: int, warmup: int, batch_size: int) -> float:
    """The same step in plain PyTorch: the same module's parts and losses, the same loaders and optimizers."""
    from torch.optim.lr_scheduler import LambdaLR

    from tl_lightning.cli import run_cli
    from tl_lightning.losses import dann_lambda, domain_loss, grad_reverse
    from tl_lightning.methods.adaptation import SOURCE, TARGET

    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = run_cli(adaptation_args(root, steps, batch_size), run=False)  # the same module and DataModule
    model, dm = cli.model, cli.datamodule
    L.seed_everything(0, verbose=False)
    dm.setup("fit")
    model.train()
    model_opt = torch.optim.AdamW(model.model_parameters(), lr=model.lr, weight_decay=model.weight_decay)
    domain_opt = torch.optim.AdamW(model.domain_classifier.parameters(), lr=model.lr, weight_decay=model.weight_decay)
    anneal = [LambdaLR(o, lambda s: (1 + 10 * min(s / steps, 1.0)) ** -0.75) for o in (model_opt, domain_opt)]
    streams = {name: iter(loader) for name, loader in dm.train_dataloader().iterables.items()}
    ends: list[float] = []
    for step in range(steps):
        (x_s, y_s), (x_l, y_l), x_u = (next(streams[k]) for k in ("source", "target_labelled", "target_unlabelled"))
        parts = [model.trunk(x_s, SOURCE), model.trunk(torch.cat([x_l, x_u]), TARGET)]
        features, label_features = (torch.cat(pair) for pair in zip(*parts))
        n_s, n_l = len(x_s), len(x_l)
        logits = model.classifier(label_features[: n_s + n_l])
        loss_cls = model.loss(logits, torch.cat([y_s, y_l]))
        domains = torch.cat([torch.full((n_s,), SOURCE), torch.full((len(features) - n_s,), TARGET)])
        weight = model.confusion_weight * dann_lambda(step / steps)
        loss = loss_cls + domain_loss(model.domain_classifier(grad_reverse(features, weight)), domains)
        model_opt.zero_grad()
        domain_opt.zero_grad()
        loss.backward()
        model_opt.step()
        domain_opt.step()
        for scheduler in anneal:
            scheduler.step()
        ends.append(time.perf_counter())
    timed = ends[warmup - 1:]
    return (len(timed) - 1) / (timed[-1] - timed[0])


def head_args(root: str, cache_dir: str, epochs: int, batch_size: int) -> list[str]:
    """FeatureExtraction with a linear head trained over epochs on cached EfficientNet-Lite0 features (digits)."""
    return ["--model=tl_lightning.methods.FeatureExtraction", "--model.backbone=tf_efficientnet_lite0",
            "--model.weights=bundled", "--model.embedding=pooled", f"--model.cache_dir={cache_dir}",
            "--data=tl_lightning.data.DigitsDataModule", "--data.image_size=32", f"--data.batch_size={batch_size}",
            "--data.num_workers=0", "--data.val_fraction=0.1", "--data.test_fraction=0.1",
            f"--trainer.max_epochs={epochs}", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
            "--trainer.accelerator=cpu", f"--trainer.default_root_dir={root}", "--seed_everything=0"]


def tl_head_steps_per_s(cache_dir: str, epochs: int, warmup: int, batch_size: int) -> float:
    return cli_steps_per_s(lambda root: head_args(root, cache_dir, epochs, batch_size), warmup)


def plain_head_steps_per_s(cache_dir: str, epochs: int, warmup: int, batch_size: int) -> float:
    """The same head epochs in plain PyTorch: the module's own forward on the same cached features, AdamW."""
    from torch.utils.data import DataLoader, TensorDataset

    from tl_lightning.cli import run_cli

    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = run_cli(head_args(root, cache_dir, epochs, batch_size), run=False)
    model, dm = cli.model, cli.datamodule
    L.seed_everything(0, verbose=False)
    dm.setup("fit")
    feats = model.split_features("train", dm)  # from the warm cache
    loader = DataLoader(TensorDataset(feats["features"], feats["targets"]), batch_size=batch_size, shuffle=True)
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=model.lr, weight_decay=model.weight_decay)
    model.train()
    ends: list[float] = []
    for _ in range(epochs):
        for x, y in loader:
            loss = model.loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ends.append(time.perf_counter())
    timed = ends[warmup - 1:]
    return (len(timed) - 1) / (timed[-1] - timed[0])


def bench_head_overhead(rounds: int = 5, epochs: int = 5, warmup: int = 5, batch_size: int = 32):
    from bench.perf import Row

    with tempfile.TemporaryDirectory() as cache_dir:
        tl_head_steps_per_s(cache_dir, 1, 1, batch_size)  # fills the feature cache: both sides read it warm
        tl, plain, ratio, per_round = side_by_side({
            "plain PyTorch": lambda: plain_head_steps_per_s(cache_dir, epochs, warmup, batch_size),
            "tl_lightning": lambda: tl_head_steps_per_s(cache_dir, epochs, warmup, batch_size)}, rounds)
    return [Row("overhead", f"FeatureExtraction head epochs on cached features, tl_lightning / plain PyTorch "
                f"(linear head on 1280-d tf_efficientnet_lite0 features, batch {batch_size}, {epochs} epochs, "
                f"{torch.get_num_threads()} threads)", tl, plain, "steps/s", ratio, "<= 1.05",
                f"median of {rounds} rounds: {per_round}", ratio <= 1.05)]


def side_by_side(runs: dict[str, Callable[[], float]], rounds: int) -> tuple[float, float, float, str]:
    """(tl steps/s, plain steps/s, median time ratio tl/plain, per-round ratios) from interleaved rounds."""
    from bench.perf import interleaved

    res = interleaved(runs, rounds)
    per_round = [p / t for p, t in zip(res["plain PyTorch"], res["tl_lightning"])]
    return (statistics.median(res["tl_lightning"]), statistics.median(res["plain PyTorch"]),
            statistics.median(per_round), ", ".join(f"{r:.3f}" for r in per_round))


def bench_adaptation_overhead(rounds: int = 5, steps: int = 40, warmup: int = 5, batch_size: int = 64):
    from bench.perf import Row

    tl, plain, ratio, per_round = side_by_side({
        "plain PyTorch": lambda: plain_adaptation_steps_per_s(steps, warmup, batch_size),
        "tl_lightning": lambda: tl_adaptation_steps_per_s(steps, warmup, batch_size)}, rounds)
    spread = per_round.split(", ")
    return [Row("overhead", f"DomainAdaptation step time, tl_lightning / plain PyTorch (digit_cnn, per-domain "
                f"BatchNorm, reversed gradient, 2 optimizers, batch {batch_size} + {batch_size} + 30, "
                f"{torch.get_num_threads()} threads)", tl, plain, "steps/s", ratio, "<= 1.05",
                f"median of {len(spread)} rounds: {per_round}", ratio <= 1.05)]
