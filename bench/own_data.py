"""Bring-your-own-data benchmark on real photos: the CUB-200-2011 subset (10 classes, 543 JPEGs) read as a
user's own data, once as an image folder and once through a CSV.

1. Cost of the data report's up-front image check, side by side in one run: a full decode of every file (what
   one epoch of reading costs), the report's reduced-size decode in threads (first run), and the cached check
   (second run over unchanged files).
2. End to end through the CLI, frozen EfficientNet-Lite0 + linear head (FeatureExtraction):
   ``ImageFolderDataModule`` on ``images/<class>/`` (random stratified 70/10/20 split) and ``CSVDataModule``
   on a CSV of path, label and the official train/test split (val carved from train); then ``predict`` on a
   folder of held-out test photos writes ``predictions.csv``.

    python -m bench.own_data [--quick] [--data ../shared/data/CUB_200_2011_subset10/CUB_200_2011]

Writes ``bench/results/own_data.md`` and ``bench/results/own_data_check.png``.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import cli, run
from tl_lightning.data.base import open_image
from tl_lightning.data.files import list_images
from tl_lightning.data.report import find_unreadable

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "CUB_200_2011_subset10" / "CUB_200_2011"


def time_check(paths: list[str]) -> list[tuple[str, float]]:
    """Seconds for: full decode (sequential), report check (cold, threads), report check (cached)."""
    t = time.perf_counter()
    for p in paths:
        open_image(p)
    full = time.perf_counter() - t
    cache = tempfile.mkdtemp(prefix="tl_check_")
    try:
        t = time.perf_counter()
        bad_cold = find_unreadable(paths, cache)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        bad_warm = find_unreadable(paths, cache)
        warm = time.perf_counter() - t
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    assert bad_cold == bad_warm == {}, bad_cold
    return [("full decode, sequential (one epoch of reading)", full),
            ("report check, 1/8-scale decode in threads (first run)", cold),
            ("report check, cached (unchanged files)", warm)]


def write_csv(cub: Path, out: Path) -> Path:
    """A user's CSV of the CUB subset: path (relative to the images folder), class name, official split."""
    def table(name):
        return dict(line.split() for line in (cub / name).read_text().splitlines() if line.strip())
    images, is_train = table("images.txt"), table("train_test_split.txt")
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        for image_id, rel in images.items():
            writer.writerow([rel, rel.split("/")[0], "train" if is_train[image_id] == "1" else "test"])
    return out


def fit(name: str, work: Path, data_args: list[str], quick: bool) -> dict:
    """The image-folder config with ``data_args``, through the CLI in a process of its own."""
    run_dir = work / name
    metrics = run(["configs/feature_extraction/image_folder.yaml"],
                  [*data_args, "--trainer.enable_progress_bar=false", "--trainer.logger=false",
                   "--trainer.enable_model_summary=false", f"--trainer.max_epochs={10 if quick else 30}",
                   f"--data.image_size={128 if quick else 224}"], run_dir, log=work / f"{name}.log")
    return {**metrics, **metrics["bench"], "run": run_dir}


def plot(rows: list[tuple[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 2.6))
    ax.barh([r[0] for r in rows][::-1], [r[1] for r in rows][::-1], color=["#8c8", "#6a6", "#c66"])
    ax.set_xlabel("seconds for the 543 CUB JPEGs")
    ax.set_title("cost of the data report's image check")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="128 px and 10 epochs instead of 224 px and 30")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="the CUB_200_2011 folder (official layout)")
    args = ap.parse_args(argv)
    cub = Path(args.data).resolve()
    if not (cub / "images").is_dir():
        raise SystemExit(f"CUB subset not found under {cub}; pass --data.")
    RESULTS.mkdir(parents=True, exist_ok=True)
    paths = list_images(str(cub / "images"))

    checks = time_check(paths)
    plot(checks, RESULTS / "own_data_check.png")

    work = Path(tempfile.mkdtemp(prefix="tl_own_data_"))
    folder = fit("image_folder", work, [f"--data.data_dir={cub / 'images'}"], args.quick)
    table = write_csv(cub, work / "cub.csv")
    csv_args = ["--data.class_path=tl_lightning.data.CSVDataModule", f"--data.csv_file={table}",
                f"--data.data_dir={cub / 'images'}", "--data.split_column=split"]
    csv_run = fit("csv", work, csv_args, args.quick)
    # "new images": every 10th photo of the official test split, classified with the CSV run's checkpoint
    new = work / "new_images"
    new.mkdir()
    with open(table) as f:
        test_rows = [r for r in csv.DictReader(f) if r["split"] == "test"][::10]
    for r in test_rows:
        shutil.copy(cub / "images" / r["path"], new / os.path.basename(r["path"]))
    truth = {os.path.basename(r["path"]): r["label"] for r in test_rows}
    # a fitted head (the config's auto recipe: logistic or SVM) never steps an optimizer, so no best-by-validation
    # checkpoint is written; its one epoch's last.ckpt holds the fitted head
    ckpt = csv_run["best_checkpoint"] or str(csv_run["run"] / "checkpoints" / "last.ckpt")
    predict_s = cli(["predict", "--config", "configs/feature_extraction/image_folder.yaml", *csv_args,
                     f"--data.image_size={128 if args.quick else 224}", f"--trainer.default_root_dir={csv_run['run']}",
                     "--trainer.enable_progress_bar=false", "--trainer.logger=false", "--ckpt_path", ckpt,
                     f"--data.predict_dir={new}"], work / "predict.log")["wall_s"]
    with open(csv_run["run"] / "predictions.csv") as f:
        predictions = list(csv.DictReader(f))
    correct = sum(truth[os.path.basename(r["file"])] == r["class"] for r in predictions)

    full = checks[0][1]
    lines = [f"# Bring your own data: CUB-200-2011 subset (10 classes, {len(paths)} JPEGs)", "",
             f"Mode: {'quick (128 px, 10 epochs)' if args.quick else 'full (224 px, 30 epochs)'}; "
             f"{os.cpu_count()} CPU cores, shared.", "",
             "## The data report's image check", "",
             "| check | seconds | images/s | vs. full decode |", "|---|---:|---:|---:|"]
    for name, s in checks:
        lines.append(f"| {name} | {s:.2f} | {len(paths) / s:,.0f} | {full / s:.1f}x faster |" if s != full else
                     f"| {name} | {s:.2f} | {len(paths) / s:,.0f} | 1.0x |")
    lines += ["", "## End to end (FeatureExtraction: frozen EfficientNet-Lite0 + linear head)", "",
              "| DataModule | split | train / val / test images | test acc | wall time (s) | peak PSS (MB) |",
              "|---|---|---|---:|---:|---:|"]
    for name, m, split in (("ImageFolderDataModule", folder, "random stratified 70/10/20"),
                           ("CSVDataModule", csv_run, "official train/test, val carved 10%")):
        n = {s: sum(v) for s, v in m["data_report"]["images_per_class"].items()}
        lines.append(f"| {name} | {split} | {n['train']} / {n['val']} / {n['test']} | "
                     f"{m['metrics']['test/acc']:.3f} | {m['wall_s']:.0f} | {m['peak_pss_mb'] or '-'} |")
    lines += ["", f"`predict` (CSV run's checkpoint) on {len(predictions)} held-out photos (every 10th of the "
              f"official test split) copied into a new folder wrote `predictions.csv` in {predict_s:.0f} s; "
              f"{correct}/{len(predictions)} predicted class names are right.", ""]
    (RESULTS / "own_data.md").write_text("\n".join(lines))
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
