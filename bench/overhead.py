"""Per-method overhead: a method's training step through the CLI's Trainer and callbacks vs a plain PyTorch loop
that does the same work (same module, data loader, batch size, optimizers and thread count), interleaved.

``bench/perf.py``'s ``overhead`` section calls :func:`bench_adaptation_overhead`, :func:`bench_icarl_overhead`
and ``bench/overhead_head.py``'s :func:`bench_head_overhead` (FeatureExtraction's head on cached features) beside
its FineTune row.

* ICaRL: the second task of the offline digits config (paper preset: sigmoid BCE with distillation targets
  from the frozen previous model), timed over that task's steps only; the plain loop starts where the CLI's
  second task starts (the first task fitted through the CLI, untimed: its weights, and its exemplars replayed with
  the new classes), forwards the same network and a frozen copy of it on the same task's loader and calls the same
  loss, with the module's own optimizer.
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


def layout_of(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """The module's input layout as a fit sets it up (``configure_model``: NHWC for convnets by default), so the
    plain loop runs the same kernels."""
    model.configure_model()
    if model.uses_channels_last:
        return lambda x: x.contiguous(memory_format=torch.channels_last)
    return lambda x: x


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


def plain_step(optimizer, loss: torch.Tensor, ends: list[float]) -> None:
    """One optimizer step of a plain loop on ``loss``; its end time goes to ``ends``."""
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    ends.append(time.perf_counter())


def loop_rates(ends: list[float], warmup: int) -> tuple[float, float]:
    """(overall steps/s after ``warmup`` steps, median-step steps/s) of a plain loop's step end times."""
    timed = ends[warmup - 1:]
    return (len(timed) - 1) / (timed[-1] - timed[0]), median_step_rate(ends, warmup)


def cli_steps_per_s(make_args: Callable[[str], list[str]], warmup: int) -> float:
    """Steps/s of a fit through the CLI's Trainer and callbacks (``run=False``, then ``fit`` with a StepTimer);
    ``make_args(root)`` gives the arguments for a temporary run folder."""
    return cli_timer(make_args, warmup).steps_per_s


def median_step_rate(ends: list[float], warmup: int) -> float:
    """1 / the median time between consecutive step ends after ``warmup``: the steady step, without the
    once-per-epoch work (a checkpoint, a new loader iterator) that the overall rate includes."""
    timed = ends[warmup - 1:]
    return 1.0 / statistics.median(b - a for a, b in zip(timed, timed[1:]))


def cli_timer(make_args: Callable[[str], list[str]], warmup: int):
    """The StepTimer of a fit through the CLI's Trainer and callbacks."""
    from bench.perf_common import StepTimer
    from tl_lightning.cli import run_cli

    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = run_cli(make_args(root), run=False)
        timer = StepTimer(warmup)
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return timer


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
    layout = layout_of(model)
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
        x_s, x_l, x_u = layout(x_s), layout(x_l), layout(x_u)
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


def split_steady(runs: dict[str, Callable[[], tuple[float, float]]]) -> tuple[dict, dict[str, list[float]]]:
    """Runs returning (overall, steady-step) steps/s as runs returning the overall rate, plus the dict that
    collects each run's steady-step rates."""
    steady: dict[str, list[float]] = {}

    def overall(name: str, run: Callable[[], tuple[float, float]]) -> Callable[[], float]:
        def measure() -> float:
            rate, step_rate = run()
            steady.setdefault(name, []).append(step_rate)
            return rate
        return measure

    return {name: overall(name, run) for name, run in runs.items()}, steady


def ratios(res: dict[str, list[float]], ours: str) -> tuple[float, float, float, str]:
    """(our steps/s, plain steps/s, median time ratio ours/plain, per-round ratios) of interleaved results."""
    per_round = [p / t for p, t in zip(res["plain PyTorch"], res[ours])]
    return (statistics.median(res[ours]), statistics.median(res["plain PyTorch"]),
            statistics.median(per_round), ", ".join(f"{r:.3f}" for r in per_round))


def side_by_side(runs: dict[str, Callable[[], float]], rounds: int) -> tuple[float, float, float, str]:
    """(tl steps/s, plain steps/s, median time ratio tl/plain, per-round ratios) from interleaved rounds."""
    from bench.perf_common import interleaved

    return ratios(interleaved(runs, rounds), "tl_lightning")


def bench_adaptation_overhead(rounds: int = 5, steps: int = 40, warmup: int = 5, batch_size: int = 64):
    from bench.perf_common import Row

    tl, plain, ratio, per_round = side_by_side({
        "plain PyTorch": lambda: plain_adaptation_steps_per_s(steps, warmup, batch_size),
        "tl_lightning": lambda: tl_adaptation_steps_per_s(steps, warmup, batch_size)}, rounds)
    spread = per_round.split(", ")
    return [Row("overhead", f"DomainAdaptation step time, tl_lightning / plain PyTorch (digit_cnn, per-domain "
                f"BatchNorm, reversed gradient, 2 optimizers, batch {batch_size} + {batch_size} + 30, "
                f"{torch.get_num_threads()} threads)", tl, plain, "steps/s", ratio, "<= 1.05",
                f"median of {len(spread)} rounds: {per_round}", ratio <= 1.05)]


ICARL_CONFIG = "configs/incremental/digits_offline.yaml"


def icarl_args(root: str, epochs_per_task: int) -> list[str]:
    """The offline iCaRL config cut to two tasks of 5 digits, no validation."""
    return ["--config", ICARL_CONFIG, "--data.init_args.classes_per_task=5",
            f"--model.init_args.epochs_per_task={epochs_per_task}", "--data.init_args.dataset.init_args.num_workers=0",
            "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", "--trainer.accelerator=cpu",
            f"--trainer.default_root_dir={root}", "--seed_everything=0"]


class _SecondTaskTimer(L.Callback):
    """Steps/s over the second task's training batches after ``warmup`` of them."""

    def __init__(self, first_epoch: int, warmup: int):
        self.first_epoch, self.warmup, self.ends = first_epoch, warmup, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.current_epoch >= self.first_epoch:
            self.ends.append(time.perf_counter())

    @property
    def steps_per_s(self) -> float:
        timed = self.ends[self.warmup - 1:]
        return (len(timed) - 1) / (timed[-1] - timed[0])


def tl_icarl_steps_per_s(epochs_per_task: int, warmup: int) -> tuple[float, float]:
    from tl_lightning.cli import run_cli

    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = run_cli(icarl_args(root, epochs_per_task), run=False)
        timer = _SecondTaskTimer(epochs_per_task, warmup)
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return timer.steps_per_s, median_step_rate(timer.ends, warmup)


def plain_icarl_steps_per_s(epochs_per_task: int, warmup: int) -> tuple[float, float]:
    """The second task in plain PyTorch: the same network, a frozen copy as the previous model, the same loss, on
    the same training data as the CLI's second task (its new classes plus the exemplar memory of the first).

    The first task is fitted through the CLI (untimed), so the loop starts from the weights, memory and served
    data the CLI's second task starts from; without the memory the loop would train on fewer, other batches."""
    import copy

    from tl_lightning.cli import run_cli
    from tl_lightning.losses import icarl_loss

    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = run_cli([*icarl_args(root, epochs_per_task), f"--trainer.max_epochs={epochs_per_task}",
                       "--trainer.enable_progress_bar=false"], run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)  # the first task: the DataModule now serves the second
    model, dm = cli.model, cli.datamodule
    assert model.loss_name == "bce", "the paper preset's loss is what this loop calls"
    assert dm.task == 1 and len(dm.memory_positions), "the first task's exemplars are replayed in the second"
    L.seed_everything(0, verbose=False)
    seen, old = dm.seen_classes(1), dm.task_classes(1).start
    layout = layout_of(model)
    previous = copy.deepcopy(model.net).eval().requires_grad_(False)
    optimizer = model.configure_optimizers()
    model.train()
    ends: list[float] = []
    for _ in range(epochs_per_task):
        for x, y in dm.train_dataloader():
            x = layout(x)
            logits = model.net(x)[:, :seen]
            with torch.no_grad():
                old_logits = previous(x)[:, :old]
            plain_step(optimizer, icarl_loss(logits, y, old_logits, old), ends)
    return loop_rates(ends, warmup)


def bench_icarl_overhead(rounds: int = 5, epochs_per_task: int = 3, warmup: int = 3):
    from bench.perf_common import Row, interleaved

    runs, steady = split_steady({"plain PyTorch": lambda: plain_icarl_steps_per_s(epochs_per_task, warmup),
                                 "tl_lightning": lambda: tl_icarl_steps_per_s(epochs_per_task, warmup)})
    tl, plain, ratio, per_round = ratios(interleaved(runs, rounds), "tl_lightning")
    _, _, step_ratio, _ = ratios(steady, "tl_lightning")
    return [Row("overhead", f"ICaRL step time in the second task, tl_lightning / plain PyTorch (digit_cnn, paper "
                f"preset: BCE + distillation from the frozen previous model, batch 64, {epochs_per_task} epochs, "
                f"{torch.get_num_threads()} threads)", tl, plain, "steps/s", ratio, "<= 1.05",
                f"median of {rounds} rounds: {per_round}. Steady step alone (median step time, without the "
                f"epoch-end checkpoint): {step_ratio:.2f}", ratio <= 1.05, extra={"steady_step_ratio": step_ratio})]
