"""Benchmark: MNIST -> MNIST-M domain adaptation (Tzeng et al. 2015 confusion + soft labels, DANN, baselines).

    python -m bench.adaptation [--quick] [--data-root ../shared/data] [--seeds 0 1 2] [--adapt-epochs 20]
                               [--confusion-weight 0.01] [--jobs 2] [--resume] ...

Real data from ``../shared/data``: MNIST (official idx files, all 54,000 training images after the validation
carve-out) as source, MNIST-M as target. Only MNIST-M's train split (25,000 images) is there, so its test split
(20%, 5,000 images) and a validation split are carved out of it, stratified, with seed 0 for every run; the rest
(18,000) is the target training pool. Every method reads the same splits; the seed changes initialisation, batch
order and the k labelled target samples. ``--source-train`` / ``--target-train`` / ``--test`` take
class-balanced subsets for smaller runs.

Protocol per seed: a source-only model is trained from scratch (the source-only row); every adaptation method
starts from it (``source_checkpoint``, warm start) and its soft labels come from it; train-on-target is trained
from scratch on all labelled target training samples. Reported: accuracy of the final weights on the held-out
MNIST-M test split (no model selection on target labels), mean ± std over the seeds. Each (seed, method) run is
a task for ``--jobs`` worker processes; ``--resume`` keeps the finished runs whose settings are unchanged.
Writes ``bench/results/adaptation.{md,json,png}`` (``adaptation_quick.*`` with ``--quick``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Optional

import lightning as L
import numpy as np
import torch

from tl_lightning.data.base import default_cache_dir, per_class_subset
from tl_lightning.data.domains import DomainPairDataModule
from tl_lightning.data.mnist import MNISTDataModule
from tl_lightning.data.mnistm import MNISTMDataModule
from tl_lightning.methods.adaptation import DomainAdaptation

RESULTS = os.path.join(os.path.dirname(__file__), "results")
BACKBONE, IMAGE_SIZE = "digit_cnn_dann", 32
PUBLISHED = {"source-only": 57.5, "DANN": 81.5}  # Ganin & Lempitsky 2015, MNIST -> MNIST-M
DANN_BN = dict(confusion="gradient_reversal", confusion_weight=1.0, backbone="digit_cnn", domain_batchnorm=True)


@dataclass
class Method:
    name: str
    model: dict
    labelled_per_class: Optional[int] = 0
    from_source: bool = True  # warm start + soft labels from the seed's source-only model
    published: Optional[float] = None
    runs: list = field(default_factory=list)


def methods(nu: float, confusion_weight: float) -> list[Method]:
    conf = dict(confusion="uniform", confusion_weight=confusion_weight)
    return [
        Method("source-only", dict(mode="source_only"), from_source=False, published=PUBLISHED["source-only"]),
        Method("DANN (gradient reversal)", dict(confusion="gradient_reversal", confusion_weight=1.0),
               published=PUBLISHED["DANN"]),
        Method("confusion only", conf),
        *[Method(f"confusion + soft labels, k={k}", dict(conf, soft_label_weight=nu), labelled_per_class=k)
          for k in (1, 3, 10)],
        Method("train-on-target (all labels)", dict(mode="target_only"), labelled_per_class=None, from_source=False),
        # the BatchNorm twin with per-domain statistics (AdaBN / domain-specific BN), trained from scratch
        Method("DANN, digit_cnn + per-domain BatchNorm", dict(DANN_BN), from_source=False,
               published=PUBLISHED["DANN"]),
    ]


def run_epochs(method: Method, args) -> int:
    """Epochs of a run: DANN ``--dann-epochs`` (default ``--adapt-epochs``), the other adaptation methods
    ``--adapt-epochs``, the baselines ``--epochs``."""
    if method.model.get("confusion") == "gradient_reversal":
        return getattr(args, "dann_epochs", None) or args.adapt_epochs
    return args.adapt_epochs if method.from_source else args.epochs


def balanced(samples, n: int, seed: int = 0):
    """A class-balanced subset of ``n`` samples (n/10 per digit) of a SampleSet, or all of it when n <= 0."""
    if n <= 0 or n >= len(samples):
        return samples
    return samples.subset(per_class_subset(samples.targets, n // 10, seed))


def build_domains(root: str, sizes: dict) -> tuple[MNISTDataModule, MNISTMDataModule]:
    common = dict(backbone=BACKBONE, image_size=IMAGE_SIZE, num_workers=0, seed=0)
    source = MNISTDataModule(data_dir=os.path.join(root, "MNIST"), val_fraction=0.1, **common)
    target = MNISTMDataModule(data_dir=os.path.join(root, "mnist_m"), val_fraction=0.1, test_fraction=0.2, **common)
    for dm, prefix in ((source, "source"), (target, "target")):
        dm.setup()
        for split in ("train", "val", "test"):
            dm.splits[split] = balanced(dm.splits[split], sizes[f"{prefix}_{split}"])
    return source, target


def run_one(method: Method, seed: int, source: MNISTDataModule, target: MNISTMDataModule, args,
            source_ckpt: Optional[str], workdir: str) -> dict:
    L.seed_everything(seed, verbose=False)
    backbone = method.model.get("backbone", BACKBONE)
    pair = DomainPairDataModule(source, target, labelled_per_class=method.labelled_per_class, seed=seed,
                                batch_size=args.batch_size, epoch="source" if method.model.get("mode") ==
                                "source_only" else "target", num_workers=0, backbone=backbone,
                                image_size=IMAGE_SIZE, in_memory=True)
    extra = dict(source_checkpoint=source_ckpt) if method.from_source else {}
    epochs = run_epochs(method, args)
    model = DomainAdaptation(**{**dict(backbone=BACKBONE, weights="none", lr=args.lr, weight_decay=1e-4,
                                       temperature=2.0, num_classes=10, domain_hidden_dim=args.domain_hidden,
                                       channels_last=True, lr_annealing=True), **method.model, **extra})
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=workdir)
    start = time.perf_counter()
    trainer.fit(model, pair)
    fit_s = time.perf_counter() - start
    metrics = {}
    for r in trainer.test(model, pair, verbose=False):
        metrics.update({k: float(v) for k, v in r.items()})
    train = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    out = {"seed": seed, "config": run_config(method, args), "target_acc": metrics["test/target_acc"], "source_acc": metrics["test/source_acc"],
           "domain_acc": metrics["test/domain_acc"], "train_domain_acc": train.get("train/domain_acc"),
           "fit_s": fit_s, "steps": pair.steps_per_epoch() * epochs}
    if method.model.get("mode") == "source_only":
        out["checkpoint"] = source_checkpoint(workdir, seed)
        trainer.save_checkpoint(out["checkpoint"])
    return out


def mean_std(values) -> str:
    v = 100 * np.asarray([x for x in values if x is not None], dtype=float)
    return f"{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.1f}" if len(v) else "-"


def results_stem(args) -> str:
    return os.path.join(RESULTS, "adaptation_quick" if args.quick else "adaptation")


def write_results(all_methods: list[Method], args, sizes: dict, wall_s: float) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    lines = [
        "# Domain adaptation: MNIST → MNIST-M", "",
        f"Backbone `{BACKBONE}` (Ganin & Lempitsky's MNIST network as published, no BatchNorm, trained from "
        f"scratch), {IMAGE_SIZE}x{IMAGE_SIZE} px RGB, batch {args.batch_size} per stream, AdamW lr {args.lr} "
        "annealed per step as μ_p = μ_0/(1+10p)^0.75 (Ganin & Lempitsky), domain classifier with one hidden "
        f"layer of {args.domain_hidden}, seeds {', '.join(map(str, sorted({r['seed'] for m in all_methods for r in m.runs})))}. "
        "Sizes (0 = the whole split): " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sizes.items()) + ". "
        f"Source-only: {args.epochs} epochs over MNIST from scratch; train-on-target: {args.epochs} epochs over the "
        f"MNIST-M training pool from scratch; adaptation methods: {args.adapt_epochs} epochs"
        + (f" (DANN: {args.dann_epochs})" if getattr(args, "dann_epochs", None) else "") + " over the unlabelled "
        "target pool (one source batch and one target batch per step), starting from the seed's source-only model "
        f"(soft labels at τ = 2 from it, ν = {args.nu}; confusion λ = {args.confusion_weight}, DANN λ = 1, both "
        "times λ_p). Accuracy of the final weights on the held-out MNIST-M test split (carved from MNIST-M "
"train; no model selection on target labels), mean ± std over seeds. The last row, \"DANN, digit_cnn + "
        "per-domain BatchNorm\", is DANN with `digit_cnn` (the same layers with BatchNorm) and "
        "`domain_batchnorm: true` (each domain normalised with its own batch statistics in training and its own "
        "running statistics in evaluation; AdaBN, Li et al. 2016), trained from scratch for "
        f"{getattr(args, 'dann_epochs', None) or args.adapt_epochs} epochs over the target pool.", "",
        "| method | labelled target / class | MNIST-M test acc (%) | MNIST test acc (%) | domain-classifier acc, "
        "test (%) | published (%) | fit time / run (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in all_methods:
        k = "all" if m.labelled_per_class is None else str(m.labelled_per_class)
        fit = np.mean([r["fit_s"] for r in m.runs]) if m.runs else float("nan")
        lines.append(f"| {m.name} | {k} | {mean_std(r['target_acc'] for r in m.runs)} | "
                     f"{mean_std(r['source_acc'] for r in m.runs)} | "
                     f"{mean_std(r['domain_acc'] for r in m.runs) if 'mode' not in m.model else '-'} | "
                     f"{m.published if m.published is not None else '-'} | {fit:.0f} |")
    wall_s += getattr(args, "resumed_wall_s", 0.0)
    lines += ["", f"Total wall time {wall_s / 60:.1f} min on {os.cpu_count()} CPU cores "
              f"({platform.processor() or platform.machine()}, shared), torch {torch.__version__}. Published: "
              "Ganin & Lempitsky 2015 (full MNIST, 32 px, their schedule). The domain-classifier accuracy is "
              "that of the method's own domain classifier on the test images of both domains, balanced over the "
              "two domains (50% = confused; the baselines train none).", ""]
    stem = results_stem(args)
    path = stem + ".md"
    with open(path, "w") as f:
        f.write("\n".join(lines))
    with open(stem + ".json", "w") as f:
        json.dump({"sizes": sizes, "args": vars(args), "wall_s": wall_s,
                   "methods": {m.name: m.runs for m in all_methods}}, f, indent=2)
    plot(all_methods, stem + ".png")
    return path


def plot(all_methods: list[Method], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m.name for m in all_methods]
    acc = [100 * np.array([r["target_acc"] for r in m.runs]) for m in all_methods]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar(range(len(names)), [a.mean() if len(a) else 0 for a in acc],
           yerr=[a.std(ddof=1) if len(a) > 1 else 0 for a in acc], capsize=4, color="tab:blue")
    for label, value, style in (("published source-only", PUBLISHED["source-only"], ":"),
                                ("published DANN", PUBLISHED["DANN"], "--")):
        ax.axhline(value, color="gray", linestyle=style, label=f"{label} {value}%")
    ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("MNIST-M test accuracy (%)")
    ax.set_title("MNIST → MNIST-M, digit_cnn @ 32 px")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_config(method: Method, args) -> dict:
    """What a run's result depends on besides the seed and the data sizes (``--resume`` keeps equal ones)."""
    return {**method.model, "labelled_per_class": method.labelled_per_class, "from_source": method.from_source,
            "epochs": run_epochs(method, args), "batch_size": args.batch_size,
            "lr": args.lr, "domain_hidden": getattr(args, "domain_hidden", 100)}


def resume(all_methods: list[Method], args, sizes: dict) -> None:
    """Take over the finished runs of an earlier benchmark on the same data whose method settings are unchanged
    (so changing, say, ν re-runs only the soft-label rows; a changed source-only row re-runs everything after it)."""
    path = results_stem(args) + ".json"
    if not os.path.exists(path):
        return
    with open(path) as f:
        earlier = json.load(f)
    if earlier["sizes"] != sizes:
        raise SystemExit(f"{path} was run on other data sizes; drop --resume")
    earlier_args = argparse.Namespace(**earlier["args"])
    earlier_configs = {m.name: run_config(m, earlier_args)
                       for m in methods(earlier_args.nu, earlier_args.confusion_weight)}
    stale_sources = set()  # seeds whose source-only run changed: the adaptation rows start from it
    for m in all_methods:  # source-only comes first
        wanted = run_config(m, args)
        earlier_runs = [r for r in earlier["methods"].get(m.name, []) if r["seed"] in args.seeds]
        m.runs = [r for r in earlier_runs if r.get("config", earlier_configs.get(m.name)) == wanted
                  and not (m.from_source and r["seed"] in stale_sources)]
        if m.model.get("mode") == "source_only":
            stale_sources = {r["seed"] for r in earlier_runs} - {r["seed"] for r in m.runs}
    args.resumed_wall_s = earlier.get("wall_s", 0.0)


# ----- runs in worker processes: every (seed, method) is one task; a seed's source-only run comes first ---------
_WORKER: dict = {}


def _init_worker(args, sizes: dict) -> None:
    try:  # Linux: end with the parent (a killed benchmark leaves no orphaned runs behind)
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    torch.set_num_threads(args.threads)
    _WORKER["domains"] = build_domains(args.data_root, sizes)
    _WORKER["args"] = args


def _task(method: Method, seed: int, source_ckpt: Optional[str], workdir: str) -> dict:
    source, target = _WORKER["domains"]
    return run_one(method, seed, source, target, _WORKER["args"], source_ckpt, workdir)


def source_checkpoint(workdir: str, seed: int) -> str:
    return os.path.join(workdir, f"source_seed{seed}.ckpt")


def run_all(all_methods: list[Method], args, sizes: dict, workdir: str, started: float, on_result) -> None:
    """Run every missing (seed, method) on ``args.jobs`` processes of ``args.threads`` threads each.

    Train-on-target and the source-only runs start at once; a seed's adaptation runs start when its source-only
    model (their warm start and soft-label teacher) is saved. ``on_result`` is called after every finished run.
    """
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    def missing(m: Method, seed: int) -> bool:
        return not any(r["seed"] == seed for r in m.runs)

    source_method = next(m for m in all_methods if m.model.get("mode") == "source_only")
    pending = {}
    with ProcessPoolExecutor(args.jobs, mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(args, sizes)) as pool:
        def submit(m: Method, seed: int, ckpt: Optional[str]) -> None:
            pending[pool.submit(_task, m, seed, ckpt, workdir)] = (m, seed)

        def submit_adaptation(seed: int) -> None:
            for m in all_methods:
                if m.from_source and missing(m, seed):
                    submit(m, seed, source_checkpoint(workdir, seed))

        for seed in args.seeds:
            if missing(source_method, seed) or not os.path.exists(source_checkpoint(workdir, seed)):
                submit(source_method, seed, None)
            else:
                submit_adaptation(seed)
            for m in all_methods:
                if not m.from_source and m is not source_method and missing(m, seed):
                    submit(m, seed, None)
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                m, seed = pending.pop(future)
                result = future.result()
                result.pop("checkpoint", None)
                if m is source_method:
                    submit_adaptation(seed)
                    if not missing(m, seed):  # re-run only to restore the checkpoint of a resumed seed
                        continue
                m.runs.append(result)
                print(f"[{(time.perf_counter() - started) / 60:5.1f} min] seed {seed} {m.name}: target "
                      f"{100 * result['target_acc']:.1f}%, source {100 * result['source_acc']:.1f}%, domain "
                      f"{100 * result['domain_acc']:.1f}% ({result['fit_s']:.0f} s)", flush=True)
                on_result()


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one seed, one epoch (a smoke run)")
    parser.add_argument("--data-root", default=os.path.join("..", "shared", "data"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--source-train", type=int, default=0, help="MNIST training images (0 = all 54,000)")
    parser.add_argument("--target-train", type=int, default=0, help="MNIST-M training images (0 = all 18,000)")
    parser.add_argument("--test", type=int, default=0, help="MNIST-M test images (0 = all 5,000; MNIST: 2,000)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of the from-scratch runs")
    parser.add_argument("--adapt-epochs", type=int, default=20, help="epochs (over the target) of adaptation runs")
    parser.add_argument("--dann-epochs", type=int, default=None, help="epochs of the DANN runs (default --adapt-epochs)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--nu", type=float, default=0.1, help="soft-label weight")
    parser.add_argument("--confusion-weight", type=float, default=0.01,
                        help="λ of the uniform confusion loss (a 3-epoch sweep: 0.03 and above lowered MNIST-M accuracy)")
    parser.add_argument("--domain-hidden", type=int, default=1024, help="hidden width of the domain classifier")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (runs in parallel)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--workdir", default=os.path.join(default_cache_dir(), "bench_adaptation"),
                        help="where the source-only checkpoints go (kept for --resume)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs of bench/results/adaptation.json (same settings) and run the missing ones")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.source_train, args.target_train, args.test = args.seeds[:1], 500, 500, 200
        args.epochs = args.adapt_epochs = 1
        args.dann_epochs = None
    sizes = {"source_train": args.source_train, "source_val": 500, "source_test": args.test // 2 or 2000,
             "target_train": args.target_train, "target_val": 500, "target_test": args.test}
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    source, target = build_domains(args.data_root, sizes)
    actual = {"source_train": len(source.splits["train"]), "source_test": len(source.splits["test"]),
              "target_train": len(target.splits["train"]), "target_test": len(target.splits["test"])}
    del source, target
    all_methods = methods(args.nu, args.confusion_weight)
    if args.resume:
        resume(all_methods, args, actual)
    os.makedirs(args.workdir, exist_ok=True)
    run_all(all_methods, args, sizes, args.workdir, started,
            lambda: write_results(all_methods, args, actual, time.perf_counter() - started))
    for m in all_methods:
        m.runs = sorted((r for r in m.runs if r["seed"] in args.seeds), key=lambda r: r["seed"])
    path = write_results([m for m in all_methods if m.runs], args, actual, time.perf_counter() - started)
    print(open(path).read())


if __name__ == "__main__":
    main()
