"""Off-the-shelf recipes on cached features: CUB subset, frozen bundled EfficientNet-Lite0.

Rows: linear head by SGD; CNN-SVM (Razavian et al. 2014, L2-normalised features); logistic regression with
the validation sweep (Kornblith et al. 2019); the same on L2-normalised features; full-network embedding +
SVM (Garcia-Gasulla et al. 2018) - each without and with test-time augmentation (features averaged over
crops and flips, Razavian's "aug").

Phase 1 extracts every feature set once into a fresh cache (cold, timed: the part that costs). Phase 2 runs
each recipe through the real CLI (``fit`` + test of the best checkpoint) on the warm cache and reads
``metrics.json``. Writes ``bench/results/offtheshelf.md`` and ``bench/results/offtheshelf.png``.

    python -m bench.offtheshelf            # 224 px, TTA = 4 views (full + center crop, both flipped)
    python -m bench.offtheshelf --quick    # 128 px, 5 training images per class, TTA = 2 views
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DATA_DIR = REPO.parent / "shared" / "data" / "CUB_200_2011_subset10"
RUNS = REPO / "runs" / "bench_offtheshelf"

# (name, model init_args) of each recipe
RECIPES = [
    ("linear (SGD)", {"head": "linear", "lr": 0.05, "weight_decay": 1e-4,
                      "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"momentum": 0.9}}}),
    ("SVM (L2-norm)", {"head": "svm", "svm_c": 1.0, "l2_normalize": True}),
    ("logistic + sweep", {"head": "logistic"}),
    ("logistic + sweep + L2-norm", {"head": "logistic", "l2_normalize": True}),
    ("FNE + SVM", {"head": "svm", "svm_c": 1.0, "embedding": "fne"}),
]


def config_yaml(model_args: dict, args, tta_views: int, run_dir: Path) -> str:
    import yaml

    cfg = {
        "seed_everything": 0,
        "trainer": {"default_root_dir": str(run_dir), "max_epochs": args.epochs, "accelerator": "cpu", "devices": 1,
                    "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
                    "log_every_n_steps": 1},
        "model": {"class_path": "tl_lightning.methods.FeatureExtraction",
                  "init_args": {"backbone": "tf_efficientnet_lite0", "weights": "bundled", "tta_views": tta_views,
                                **model_args}},
        "data": {"class_path": "tl_lightning.data.cub200.CUB200DataModule",
                 "init_args": {"data_dir": str(args.data_dir), "batch_size": 32, "num_workers": args.workers,
                               "val_fraction": 0.2, "seed": 0, "image_size": args.image_size,
                               "samples_per_class": args.samples_per_class}},
    }
    return yaml.safe_dump(cfg, sort_keys=False)


def build(config: Path):
    from tl_lightning.cli import run_cli

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_cli(["--config", str(config)], run=False)


def extract_all(config: Path) -> dict:
    """Extraction of train/val/test for one config (views cached by an earlier config are not redone)."""
    cli = build(config)
    model, dm = cli.model, cli.datamodule
    dm.setup("fit")
    seen = []  # images that really go through the backbone (views already cached do not)
    model.extractor.register_forward_hook(lambda m, inputs, out: seen.append(len(inputs[0])))
    started = time.perf_counter()
    for split in ("train", "val", "test"):
        model.split_features(split, dm)
    seconds = time.perf_counter() - started
    images = sum(seen)
    return {"seconds": seconds, "images": images, "img_per_s": images / max(seconds, 1e-9)}


def run_recipe(config: Path, run_dir: Path) -> dict:
    from tl_lightning.cli import main

    main(["fit", "--config", str(config)])
    m = json.loads((run_dir / "metrics.json").read_text())
    return {"test_acc": m["metrics"]["test/acc"], "wall_s": m["wall_time_s"], "head_fit": m.get("head_fit", {})}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [n for n, _ in RECIPES]
    views = sorted({r["tta_views"] for r in rows})
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(views)
    for i, v in enumerate(views):
        acc = [next(r["test_acc"] for r in rows if r["name"] == n and r["tta_views"] == v) * 100 for n in names]
        ax.bar(np.arange(len(names)) + i * width, acc, width, label=f"{v} view{'s' if v > 1 else ''}")
    ax.set_xticks(np.arange(len(names)) + width * (len(views) - 1) / 2)
    ax.set_xticklabels(names, rotation=15, fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Off-the-shelf recipes, CUB subset (10 classes), frozen EfficientNet-Lite0")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--data_dir", type=Path, default=DATA_DIR)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    args.image_size = 128 if args.quick else 224
    args.samples_per_class = 5 if args.quick else None
    args.epochs = 30
    tta = 2 if args.quick else 4
    if not (args.data_dir / "CUB_200_2011").is_dir():
        raise SystemExit(f"CUB subset not found at {args.data_dir}; pass --data_dir.")
    if RUNS.exists():
        shutil.rmtree(RUNS)
    RUNS.mkdir(parents=True)
    os.environ["TL_LIGHTNING_CACHE"] = str(RUNS / "cache")  # a cold cache: phase 1 measures extraction
    RESULTS.mkdir(parents=True, exist_ok=True)

    configs = {}
    for i, (name, model_args) in enumerate(RECIPES):
        for views in (1, tta):
            run_dir = RUNS / f"{i}_{views}"
            run_dir.mkdir()
            path = run_dir / "bench_config.yaml"
            path.write_text(config_yaml(model_args, args, views, run_dir))
            configs[(name, views)] = (path, run_dir)

    # phase 1: cold extraction, once per distinct feature set (penultimate or FNE layers) x views
    extraction = {}
    for views in (1, tta):
        for feats, recipe in (("penultimate", "SVM (L2-norm)"), ("all stages (FNE)", "FNE + SVM")):
            extraction[(feats, views)] = extract_all(configs[(recipe, views)][0])
            print(f"extracted {feats}, {views} view(s): {extraction[(feats, views)]}", flush=True)

    # phase 2: every recipe on the warm cache, through the CLI
    rows = []
    for (name, views), (path, run_dir) in configs.items():
        r = run_recipe(path, run_dir)
        feats = "all stages (FNE)" if name.startswith("FNE") else "penultimate"
        extract_s = sum(extraction[(feats, v)]["seconds"] for v in {1, views})  # TTA: view 1 + the others
        rows.append({"name": name, "tta_views": views, **r, "extract_s": extract_s})
        print(f"{name:28s} views={views} acc={r['test_acc']:.4f} wall={r['wall_s']:.1f}s", flush=True)

    suffix = "_quick" if args.quick else ""
    lines = [
        f"Off-the-shelf recipes on the CUB subset (10 classes, official split, val = 20% of train), frozen "
        f"bundled EfficientNet-Lite0 at {args.image_size} px"
        + (f", {args.samples_per_class} training images per class" if args.samples_per_class else "")
        + f", CPU. TTA = {tta} views ({'full image and center crop, each also flipped' if tta == 4 else 'full image and its mirror'}).",
        "",
        "| recipe | TTA views | test acc (%) | fit + test wall time, warm cache (s) | head fit (s) | chosen reg | "
        "cold feature extraction (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        hf = r["head_fit"]
        lines.append(f"| {r['name']} | {r['tta_views']} | {100 * r['test_acc']:.1f} | {r['wall_s']:.1f} | "
                     f"{hf.get('fit_seconds', '-') if hf else 'SGD, ' + str(args.epochs) + ' epochs'} | "
                     f"{hf.get('reg', '-') if hf else '-'} | {r['extract_s']:.1f} |")
    lines += ["", "Cold extraction (all three splits; the TTA rows extract only the views not cached yet):", "",
              "| features | views | images extracted | seconds | images/s |", "|---|---|---|---|---|"]
    for (feats, views), e in extraction.items():
        lines.append(f"| {feats} | {views} | {e['images']} | {e['seconds']:.1f} | {e['img_per_s']:.1f} |")
    (RESULTS / f"offtheshelf{suffix}.md").write_text("\n".join(lines) + "\n")
    plot(rows, RESULTS / f"offtheshelf{suffix}.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
