"""Class-incremental benchmark: iCaRL (NME and network outputs) vs fine-tuning without memory (lower bound) vs
joint training (upper bound), on Split-MNIST (real MNIST from ../shared/data) and the real 10-class CUB-200
subset as 5 tasks of 2 classes, over 3 seeds (each seed draws the class order).

Every run is the real CLI (``python -m tl_lightning fit``, a process of its own, one thread) on the configs in
``configs/incremental/``, with overrides:

* Split-MNIST: ``digit_cnn`` from scratch (paper preset), a training subset of ``--mnist-per-class`` images per
  digit, ``--mnist-eval-per-class`` test images per digit, K = 200 and K = 2000.
* CUB: frozen bundled EfficientNet-Lite0 (features cached once), 256-d neck, transfer preset, K = 200 (the
  subset has only 270 training images, so K = 2000 would keep everything).

Writes ``bench/results/incremental.md`` (table) and ``bench/results/incremental.png`` (accuracy vs classes
seen, mean over seeds).

    python -m bench.incremental [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import REPO, RESULTS, SHARED, mean_std, run

QUIET = ("--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false",
         "--test_after_fit=false", "--data.num_workers=0")

METHODS = {
    # name: (overrides, which classifiers to report)
    "iCaRL K=200": (("--model.memory_budget=200",), ("nme", "cnn")),
    "iCaRL K=2000": (("--model.memory_budget=2000",), ("nme", "cnn")),
    "fine-tuning (no memory)": (("--model.memory_budget=0", "--model.loss=ce"), ("cnn",)),
    "joint (upper bound)": (("--model.memory_budget=0", "--model.loss=ce", "--data.joint=true"), ("cnn",)),
}


def datasets(args) -> dict:
    """name -> (config, overrides, methods)."""
    mnist = ("configs/incremental/split_mnist.yaml", (
        f"--data.dataset.init_args.data_dir={SHARED / 'MNIST'}",
        f"--data.dataset.init_args.samples_per_class={args.mnist_per_class}",
        f"--data.eval_samples_per_class={args.mnist_eval_per_class}",
        f"--model.epochs_per_task={args.mnist_epochs}", f"--model.scheduler.init_args.T_max={args.mnist_epochs}",
        "--data.class_order=null",
    ), list(METHODS))
    cub = ("configs/incremental/cub200.yaml", (
        f"--data.dataset.init_args.data_dir={SHARED / 'CUB_200_2011_subset10'}",
        f"--model.epochs_per_task={args.cub_epochs}",
    ), [m for m in METHODS if m != "iCaRL K=2000"])
    return {"Split-MNIST": mnist, "CUB-200 (10 classes)": cub}


def run_one(config: str, overrides: tuple, method: str, seed: int, run_dir: str, log: Path) -> dict:
    m = run([config], [*METHODS[method][0], *overrides, *QUIET, f"--seed_everything={seed}",
                       f"--data.class_order_seed={seed}"], Path(run_dir), log=log, threads=1)
    report = json.loads((Path(run_dir) / "incremental.json").read_text())
    return {**report, **m["bench"]}


def peak_pss(runs: list[dict]) -> str:
    """The largest peak PSS of the runs (the bench process and its workers; runs measured before it was recorded
    have none)."""
    peaks = [r["peak_pss_mb"] for r in runs if r.get("peak_pss_mb")]
    return str(max(peaks)) if peaks else "-"


def write_table(results: dict, args, seconds: float) -> str:
    lines = [
        "# Class-incremental learning: iCaRL vs fine-tuning vs joint training",
        "",
        "Mean ± sample std (ddof=1) over the seeds run (*runs*; each seed draws the class order). Accuracy on all classes seen;",
        "*avg inc.* = average incremental accuracy (mean over the 5 steps), *last* = after the last task,",
        "*forgetting* = mean over tasks 1-4 of best earlier accuracy minus final accuracy (lower is better).",
        f"Split-MNIST: real MNIST, {args.mnist_per_class} training and {args.mnist_eval_per_class} test images per "
        f"digit, `digit_cnn` from scratch, {args.mnist_epochs} epochs per task, 5 tasks x 2 digits.",
        f"CUB: the real 10-class subset (270 train / 30 val / 243 test), frozen bundled EfficientNet-Lite0 at 224 px "
        f"(cached features) + 256-d neck, transfer preset (softmax CE + KD), {args.cub_epochs} epochs per task, "
        "5 tasks x 2 classes.",
        "",
        "| data | method | classifier | avg inc. acc (%) | last acc (%) | forgetting (%) | runs | s/run | "
        "peak PSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for data, methods in results.items():
        for method, runs in methods.items():
            if not runs:
                continue
            for clf in METHODS[method][1]:
                s = [r[clf] for r in runs]
                lines.append(
                    f"| {data} | {method} | {clf.upper()} | {mean_std([x['average_incremental_accuracy'] for x in s])}"
                    f" | {mean_std([x['last_accuracy'] for x in s])} | {mean_std([x['forgetting'] for x in s])}"
                    f" | {len(runs)} | {np.mean([r['wall_s'] for r in runs]):.0f} | {peak_pss(runs)} |")
    lines += ["", f"Total wall time {seconds / 60:.1f} min on a shared 2-core CPU (nice'd, 1 torch thread).",
              "![accuracy vs classes seen](incremental.png)", ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, (data, methods) in zip(axes[0], results.items()):
        for method, runs in methods.items():
            if not runs:
                continue
            seen = runs[0]["classes_seen"]
            for clf in METHODS[method][1]:
                acc = np.array([r[clf]["seen_accuracy"] for r in runs], dtype=float)
                ax.errorbar(seen, 100 * acc.mean(0), yerr=100 * acc.std(0, ddof=1 if len(acc) > 1 else 0), marker="o", capsize=3,
                            linestyle="-" if clf == "nme" or "iCaRL" not in method else "--",
                            label=f"{method} {clf.upper()}")
        ax.set_title(data)
        ax.set_xlabel("classes seen")
        ax.set_ylabel("accuracy on seen classes (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, tiny subsets, few epochs (a smoke run)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--mnist-per-class", type=int, default=250)
    parser.add_argument("--mnist-eval-per-class", type=int, default=100)
    parser.add_argument("--mnist-epochs", type=int, default=2)
    parser.add_argument("--cub-epochs", type=int, default=10)
    parser.add_argument("--budget-min", type=float, default=22.0,
                        help="minutes; runs that would start later are skipped")
    parser.add_argument("--only", choices=["mnist", "cub"], default=None)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--merge", action="store_true",
                        help="add these runs to the results of an earlier run (bench/results/incremental.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.mnist_per_class, args.mnist_eval_per_class = 1, 60, 30
        args.mnist_epochs, args.cub_epochs = 1, 3
    os.environ.setdefault("WANDB_MODE", "offline")
    for folder in (SHARED / "MNIST", SHARED / "CUB_200_2011_subset10"):
        if not folder.exists():
            raise SystemExit(f"error: {folder} not found; the benchmark reads the real data in ../shared/data.")
    RESULTS.mkdir(parents=True, exist_ok=True)
    os.chdir(REPO)
    started = time.perf_counter()
    log = RESULTS / "incremental.log"
    log.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        plan = {d: v for d, v in datasets(args).items() if not args.only or args.only in d.lower()}
        results = {d: {m: [] for m in v[2]} for d, v in datasets(args).items()}
        name = "incremental_quick" if args.quick else "incremental"
        if args.merge and (RESULTS / f"{name}.json").exists():
            results = json.loads((RESULTS / f"{name}.json").read_text())
        for seed in range(args.first_seed, args.seeds):  # seed-major: a time cut still leaves every data set with whole seeds
            for data, (config, overrides, methods) in plan.items():
                for method in methods:
                    if args.merge and len(results[data][method]) >= args.seeds:
                        continue  # merging fills each row up to --seeds runs
                    if time.perf_counter() - started > 60 * args.budget_min:
                        print(f"time budget reached: skipping {data} / {method} / seed {seed}", flush=True)
                        continue
                    # the whole method name: "iCaRL K=200" and "iCaRL K=2000" cut to 8 characters were one folder,
                    # which the CLI refuses to overwrite
                    slug = "".join(c if c.isalnum() else "_" for c in f"{data}_{method}_{seed}")
                    run_dir = os.path.join(tmp, slug)
                    report = run_one(config, overrides, method, seed, run_dir, log)
                    results[data][method].append(report)
                    clfs = METHODS[method][1]
                    print(f"{data} | {method} | seed {seed} | " + ", ".join(
                        f"{c.upper()} avg {100 * report[c]['average_incremental_accuracy']:.1f} last "
                        f"{100 * report[c]['last_accuracy']:.1f}" for c in clfs) + f" | {report['wall_s']:.0f} s",
                        flush=True)
    seconds = time.perf_counter() - started
    if args.merge and (RESULTS / f"{name}.seconds").exists():
        seconds += float((RESULTS / f"{name}.seconds").read_text())
    (RESULTS / f"{name}.seconds").write_text(f"{seconds:.1f}")
    table = write_table(results, args, seconds)
    (RESULTS / f"{name}.md").write_text(table.replace("(incremental.png)", f"({name}.png)"))
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=1))
    plot(results, RESULTS / f"{name}.png")
    print(table)


if __name__ == "__main__":
    main()
