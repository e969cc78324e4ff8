"""Fine-tuning recipes side by side on the real CUB-200-2011 subset, bundled ImageNet EfficientNet-Lite0.

Rows (same epoch budget, data, image size, optimizer and cosine schedule for each):
feature extraction (linear probe on cached frozen features), ``freeze`` (head only, backbone run every step),
``freeze_unfreeze``, ``gradual`` (ULMFiT), LP-FT (Kumar et al. 2022: L-BFGS probe, then all groups at a
uniform small rate), and full fine-tuning with and without discriminative learning rates (1/2.6 per stage).
Each row runs through the real CLI (``fit`` + test of the best checkpoint) and reads ``metrics.json``.
Writes ``bench/results/finetune.md`` and ``bench/results/finetune.png``.

    python -m bench.finetune            # 64 px, 4 epochs, all 270 training images
    python -m bench.finetune --image_size 128 --epochs 6   # closer to the usual setting, when time allows
    python -m bench.finetune --quick    # 64 px, 2 epochs, 5 training images per class
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from bench.memory import PeakPSS, supported

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DATA_DIR = REPO.parent / "shared" / "data" / "CUB_200_2011_subset10"
RUNS = REPO / "runs" / "bench_finetune"

HEAD_LR = 3e-3
UNIFORM_LR = 3e-4  # one rate for every group: a usual full fine-tuning rate for AdamW
DECAY = 1 / 2.6


def recipes(epochs: int) -> list[tuple[str, str, dict]]:
    """(row name, model class, model init_args)."""
    finetune = "tl_lightning.methods.FineTune"
    staged = max(1, epochs // 3)
    return [
        ("feature extraction (linear probe)", "tl_lightning.methods.FeatureExtraction", {"lr": HEAD_LR}),
        ("freeze (head only)", finetune, {"unfreeze": "freeze", "lr": HEAD_LR}),
        (f"freeze_unfreeze (all at epoch {staged}), discr. lr", finetune,
         {"unfreeze": {"class_path": "tl_lightning.callbacks.unfreeze.FreezeUnfreeze",
                       "init_args": {"unfreeze_at_epoch": staged}}, "lr": HEAD_LR, "lr_decay": DECAY}),
        ("gradual (1 stage/epoch from epoch 1), discr. lr", finetune,
         {"unfreeze": "gradual", "lr": HEAD_LR, "lr_decay": DECAY}),
        (f"LP-FT (L-BFGS probe, then all at {UNIFORM_LR:g})", finetune,
         {"unfreeze": "lp_ft", "lr": UNIFORM_LR, "lr_decay": 1.0}),
        (f"full fine-tuning, uniform lr {UNIFORM_LR:g}", finetune,
         {"unfreeze": "no_freeze", "lr": UNIFORM_LR, "lr_decay": 1.0}),
        ("full fine-tuning, discr. lr (1/2.6 per stage)", finetune,
         {"unfreeze": "no_freeze", "lr": HEAD_LR, "lr_decay": DECAY}),
    ]


def config_yaml(model_class: str, model_args: dict, args, run_dir: Path) -> str:
    import yaml

    cfg = {
        "seed_everything": 0,
        "trainer": {"default_root_dir": str(run_dir), "max_epochs": args.epochs, "accelerator": "cpu", "devices": 1,
                    "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
                    "log_every_n_steps": 1},
        "model": {"class_path": model_class,
                  "init_args": {"backbone": "tf_efficientnet_lite0", "weights": "bundled", "weight_decay": 1e-4,
                                "optimizer": {"class_path": "torch.optim.AdamW"},
                                "scheduler": {"class_path": "torch.optim.lr_scheduler.CosineAnnealingLR",
                                              "init_args": {"T_max": args.epochs}},
                                **model_args}},
        "data": {"class_path": "tl_lightning.data.cub200.CUB200DataModule",
                 "init_args": {"data_dir": str(args.data_dir), "batch_size": 32, "num_workers": args.workers,
                               "val_fraction": 0.1, "seed": 0, "image_size": args.image_size, "augment": False,
                               "samples_per_class": args.samples_per_class}},
    }
    return yaml.safe_dump(cfg, sort_keys=False)


def run_recipe(name: str, model_class: str, model_args: dict, args, index: int) -> dict:
    from tl_lightning.cli import main

    run_dir = RUNS / f"{index}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    config = run_dir / "bench.yaml"
    config.write_text(config_yaml(model_class, model_args, args, run_dir))
    print(f"\n=== {name}", flush=True)
    with PeakPSS(os.getpid()) as pss:  # this process (the run is in-process) and its loader workers
        main(["fit", "--config", str(config)])
    row = read_row(name, run_dir)
    row["peak_pss_mb"] = round(pss.peak / 2**20) if supported() else None
    return row


def read_row(name: str, run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"name": name, "test_acc": metrics["metrics"].get("test/acc"),
            "best_val_acc": metrics.get("best_score"), "wall_s": metrics["wall_time_s"],
            "probe_train_acc": metrics.get("probe_train_acc")}


def write_table(rows: list[dict], args, path: Path) -> str:
    settings = (f"CUB-200-2011 subset ({args.data_dir.name}, 10 classes, official test split of 243 images; "
                f"validation = 10% of train), bundled EfficientNet-Lite0, {args.image_size} px, "
                f"{args.epochs} epochs for every row, batch 32, AdamW (weight decay 1e-4) with a cosine schedule, "
                f"head lr {HEAD_LR:g}, no augmentation, "
                f"{'all' if not args.samples_per_class else args.samples_per_class} training images per class, "
                f"{os.cpu_count()} CPU cores shared with other jobs (wall times are inflated by that load and "
                "only roughly comparable), seed 0. Wall time = fit + test of the best checkpoint; every row is "
                "its own CLI run, all rows measured side by side in one process.")
    lines = [f"Settings: {settings}", "",
             "| recipe | test acc | best val acc | wall time (s) | time vs. linear probe | peak PSS (MB) |",
             "|---|---|---|---|---|---|"]
    base = rows[0]["wall_s"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['test_acc']:.3f} | {r['best_val_acc']:.3f} | {r['wall_s']:.0f} | "
                     f"{r['wall_s'] / base:.1f}x | {r.get('peak_pss_mb') or '-'} |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for r in rows:
        ax.scatter(r["wall_s"], r["test_acc"], s=40)
        ax.annotate(r["name"].split(" (")[0].split(",")[0] + (" discr." if "discr" in r["name"] else ""),
                    (r["wall_s"], r["test_acc"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Fine-tuning recipes on the CUB subset (EfficientNet-Lite0)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 px, 2 epochs, 5 training images per class")
    parser.add_argument("--data_dir", type=Path, default=DATA_DIR)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--image_size", type=int, default=None)
    parser.add_argument("--samples_per_class", type=int, default=None)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--collect", action="store_true",
                        help="only rebuild the table from the rows of an earlier (possibly interrupted) run")
    args = parser.parse_args(argv)
    args.epochs = args.epochs or (2 if args.quick else 4)
    args.image_size = args.image_size or 64
    if args.quick and args.samples_per_class is None:
        args.samples_per_class = 5
    if not args.data_dir.exists():
        raise SystemExit(f"error: the CUB subset is not at '{args.data_dir}'; pass --data_dir=PATH "
                         "(the folder that holds CUB_200_2011/).")
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TL_LIGHTNING_CACHE", tempfile.mkdtemp(prefix="bench_finetune_cache_"))  # cold cache
    rows = []
    for i, (name, cls, model_args) in enumerate(recipes(args.epochs)):
        if args.collect:
            if finished_with(RUNS / f"{i}", config_yaml(cls, model_args, args, RUNS / f"{i}")):
                rows.append(read_row(name, RUNS / f"{i}"))
        else:
            rows.append(run_recipe(name, cls, model_args, args, i))
        if rows:
            missing = [n for n, _, _ in recipes(args.epochs) if n not in {r["name"] for r in rows}]
            report(rows, args, missing)


def finished_with(run_dir: Path, config: str) -> bool:
    """True when ``run_dir`` holds a finished row that ran with exactly ``config``."""
    path = run_dir / "bench.yaml"
    return (run_dir / "metrics.json").is_file() and path.is_file() and path.read_text() == config


def report(rows: list[dict], args, missing: list[str]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    text = write_table(rows, args, RESULTS / f"finetune{suffix}.md")
    if missing:
        text += f"\nNot measured in this run (stopped for time): {'; '.join(missing)}.\n"
        (RESULTS / f"finetune{suffix}.md").write_text(text)
    (RESULTS / f"finetune{suffix}.json").write_text(json.dumps({"rows": rows, "settings": vars(args)}, indent=2,
                                                                default=str))
    plot(rows, RESULTS / f"finetune{suffix}.png")
    print("\n" + text)


if __name__ == "__main__":
    main()
