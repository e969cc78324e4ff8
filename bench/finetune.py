"""Fine-tuning recipes side by side on the real CUB-200-2011 subset, bundled ImageNet EfficientNet-Lite0, 224 px.

Every row runs a shipped config through the CLI in its own process (``python -m tl_lightning fit --config ...
[overrides]``: fit, then test of the checkpoint the config names) and reads its ``metrics.json``:

* the linear probe: ``configs/feature_extraction/cub200.yaml`` as shipped (frozen features, the recipe chosen on
  val: an L-BFGS logistic probe on this subset, Kornblith et al. 2019), the best off-the-shelf recipe;
* ``configs/finetune/cub200.yaml`` as shipped (the README command);
* the same config with the unfreeze strategy (and, for LP-FT and uniform-rate fine-tuning, the rates) overridden:
  ``freeze`` (head only, the backbone runs every step), ``freeze_unfreeze``, ``gradual`` (ULMFiT), LP-FT (Kumar
  et al. 2022: L-BFGS probe, then every group at one small rate), and full fine-tuning with one uniform rate and
  with discriminative rates (1/2.6 per stage).

Every fine-tuning row shares the shipped config's resolution (the backbone's own 224 px), augmentation, epochs,
optimizer and schedule. A row is kept by ``--resume`` while its command, config file and code
(``bench/provenance.py``: the ``tl_lightning`` tree and the torch version) are unchanged; a killed run resumes there.

    python -m bench.finetune            # writes bench/results/finetune.{json,md,png}
    python -m bench.finetune --resume   # keeps the finished rows whose command, config and code are unchanged
    python -m bench.finetune --quick    # 64 px, 2 epochs, 5 training images per class: a smoke run
    python -m bench.finetune --table    # only rewrite the table and plot from finetune.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
from pathlib import Path

from bench.common import REPO, RESULTS, SHARED, run
from tl_lightning.atomic import write_text
from bench.provenance import code_version, file_sha, same_code

DATA = SHARED / "CUB_200_2011_subset10" / "CUB_200_2011"
FT_CONFIG = "configs/finetune/cub200.yaml"
FE_CONFIG = "configs/feature_extraction/cub200.yaml"
RUNS = REPO / "runs" / "bench_finetune"
UNIFORM_LR = 3e-4  # one rate for every group: a usual full fine-tuning rate for AdamW
QUICK = ["--trainer.max_epochs=2", "--model.scheduler.init_args.T_max=2", "--data.image_size=64",
         "--data.samples_per_class=5"]


def quick_overrides(config: str) -> list[str]:
    """``QUICK`` for a row's config: the feature-extraction config has no scheduler to shorten."""
    return [o for o in QUICK if config == FT_CONFIG or not o.startswith("--model.scheduler")]


def strategy(class_name: str, **init_args) -> str:
    return "--model.unfreeze=" + json.dumps({"class_path": f"tl_lightning.callbacks.unfreeze.{class_name}",
                                             "init_args": init_args})


def rows(epochs: int) -> list[tuple[str, str, list[str]]]:
    """(row name, config, CLI overrides)."""
    staged = max(1, epochs // 4)
    return [
        ("linear probe: shipped feature-extraction config (auto)", FE_CONFIG, []),
        ("shipped fine-tuning config (milestones, README command)", FT_CONFIG, []),
        ("freeze (head only)", FT_CONFIG, ["--model.unfreeze=freeze"]),
        (f"freeze_unfreeze (all at epoch {staged}), discr. lr", FT_CONFIG,
         [strategy("FreezeUnfreeze", unfreeze_at_epoch=staged)]),
        ("gradual (1 stage/epoch from epoch 1), discr. lr", FT_CONFIG, ["--model.unfreeze=gradual"]),
        (f"LP-FT (L-BFGS probe, then all at {UNIFORM_LR:g})", FT_CONFIG,
         ["--model.unfreeze=lp_ft", f"--model.lr={UNIFORM_LR:g}", "--model.lr_decay=1.0"]),
        (f"full fine-tuning, uniform lr {UNIFORM_LR:g}", FT_CONFIG,
         ["--model.unfreeze=no_freeze", f"--model.lr={UNIFORM_LR:g}", "--model.lr_decay=1.0"]),
        ("full fine-tuning, discr. lr (1/2.6 per stage)", FT_CONFIG, ["--model.unfreeze=no_freeze"]),
    ]


def fe_image_size() -> int:
    import yaml

    return yaml.safe_load((REPO / FE_CONFIG).read_text())["data"]["init_args"].get("image_size") or 224


def shipped_epochs() -> int:
    import yaml

    return int(yaml.safe_load((REPO / FT_CONFIG).read_text())["trainer"]["max_epochs"])


def run_row(name: str, config: str, overrides: list[str], run_dir: Path) -> dict:
    """One CLI fit (+ test) in a fresh process, with a cold feature cache; the result row from its metrics."""
    shutil.rmtree(run_dir, ignore_errors=True)
    print(f"=== {name}\n    fit --config {config} {' '.join(overrides)}", flush=True)
    m = run([config], overrides, run_dir, log=run_dir / "bench.log", env={"TL_LIGHTNING_CACHE": str(run_dir / "cache")})
    return {"name": name, "command": command(config, overrides, run_dir), "test_acc": m["metrics"]["test/acc"],
            "best_val_acc": m.get("best_score"), "wall_s": m["bench"]["wall_s"], "cli_wall_s": m["wall_time_s"],
            "peak_pss_mb": m["bench"]["peak_pss_mb"], "recipe": m.get("summary", {}).get("recipe"),
            "probe_train_acc": m.get("probe_train_acc"), "tested": m.get("test_checkpoint")}


def command(config: str, overrides: list[str], run_dir: Path) -> list[str]:
    """The row's command line after ``python -m``, as recorded (``--resume`` compares it)."""
    return ["tl_lightning", "fit", "--config", config, *overrides,
            f"--trainer.default_root_dir={run_dir.relative_to(REPO)}"]


def table(measured: list[dict], quick: bool, epochs: int) -> str:
    probe = next((r for r in measured if r["name"].startswith("linear probe")), None)
    tuned = [r for r in measured if r is not probe and not r["name"].startswith("freeze (")]
    best = max(tuned, key=lambda r: r["test_acc"], default=None)
    size = "64 px, 2 epochs, 5 training images per class (--quick)" if quick else \
        f"224 px (the backbone's own input size), {epochs} epochs, all training images"
    lines = [
        f"CUB-200-2011 subset in ../shared/data (10 classes, official test split of 243 images; one test image = "
        f"0.41 points), bundled ImageNet EfficientNet-Lite0, {size}. Fine-tuning rows: `{FT_CONFIG}` through the "
        f"CLI with the overrides shown (augmentation, AdamW, cosine schedule, validation = 10% of train, seed 0); "
        f"the linear probe: `{FE_CONFIG}` as shipped (frozen features read at {fe_image_size()} px, validation = "
        f"20% of train, refit on train+val). One process "
        f"per row, one after the other. Machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU. Wall time "
        "= the whole `fit` command (start-up, training, test). The shipped fine-tuning config tests its last "
        "checkpoint (`test_checkpoint: last`, the end of the cosine schedule); best val acc is the score of the "
        "epoch a best-*.ckpt would have kept.",
        "",
        "| recipe | test acc (%) | best val acc (%) | wall time (s) | vs. linear probe (points) | peak PSS (MB) | "
        "overrides |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in measured:
        gain = "-" if probe is None or r is probe else f"{100 * (r['test_acc'] - probe['test_acc']):+.1f}"
        val = "-" if r["best_val_acc"] is None else f"{100 * r['best_val_acc']:.1f}"
        mark = " **(best)**" if r is best else ""
        overrides = " ".join(f"`{o}`" for o in r["command"][4:] if o not in QUICK and "default_root_dir" not in o)
        lines.append(f"| {r['name']}{mark} | {100 * r['test_acc']:.1f} | {val} | {r['wall_s']:.0f} | {gain} | "
                     f"{r['peak_pss_mb'] or '-'} | {overrides or 'none'} |")
    return "\n".join(lines) + "\n"


def plot(measured: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for r in measured:
        ax.scatter(r["wall_s"], 100 * r["test_acc"], s=40)
        ax.annotate(r["name"].split(" (")[0].split(":")[0].split(",")[0] + (" discr." if "discr" in r["name"] else ""),
                    (r["wall_s"], 100 * r["test_acc"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Fine-tuning recipes on the CUB subset (EfficientNet-Lite0)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="64 px, 2 epochs, 5 training images per class")
    p.add_argument("--resume", action="store_true",
                   help="keep the finished rows whose command, config and code are unchanged")
    p.add_argument("--only", nargs="*", default=None, help="run only the rows whose name contains one of these")
    p.add_argument("--table", action="store_true", help="only rewrite the table and plot from the measured rows")
    args = p.parse_args(argv)
    out_json = RESULTS / f"finetune{'_quick' if args.quick else ''}.json"
    if args.table:
        measured = json.loads(out_json.read_text())
        return report(measured["rows"], args.quick, measured["epochs"], out_json)
    if not DATA.is_dir():
        raise SystemExit(f"error: the CUB subset is not at '{DATA}'; the shipped configs read "
                         "../shared/data/CUB_200_2011_subset10.")
    runs = RUNS.with_name(RUNS.name + ("_quick" if args.quick else ""))
    kept = {r["name"]: r for r in json.loads(out_json.read_text())["rows"]} \
        if args.resume and out_json.exists() else {}
    if not args.resume:
        shutil.rmtree(runs, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    epochs = 2 if args.quick else shipped_epochs()
    code = code_version()  # a row measured with other library code or another torch is run again
    done = []
    for i, (name, config, overrides) in enumerate(rows(epochs)):
        run_dir = runs / f"{i}"
        overrides = [*overrides, *(quick_overrides(config) if args.quick else [])]
        old, sha = kept.get(name), file_sha(config)
        if (old is not None and old["command"] == command(config, overrides, run_dir)
                and old.get("config_sha") == sha
                and same_code(old.get("code"), code)):
            done.append(old)
            continue
        if args.only is not None and not any(o in name for o in args.only):
            continue
        done.append({**run_row(name, config, overrides, run_dir), "config_sha": sha, "code": code})
        report(done, args.quick, epochs, out_json)
    report(done, args.quick, epochs, out_json)


def report(done: list[dict], quick: bool, epochs: int, out_json: Path) -> None:
    suffix = "_quick" if quick else ""
    text = table(done, quick, epochs)
    write_text(str(out_json), json.dumps({"rows": done, "epochs": epochs}, indent=1))
    write_text(str(RESULTS / f"finetune{suffix}.md"), text)
    plot(done, RESULTS / f"finetune{suffix}.png")
    print(text, flush=True)


if __name__ == "__main__":
    main()
