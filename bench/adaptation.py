"""Benchmark: MNIST -> MNIST-M domain adaptation (Tzeng et al. 2015 confusion + soft labels, DANN, baselines),
run through the CLI with the shipped configs, the way a user runs them.

    python -m bench.adaptation [--quick] [--seeds 0 1 2] [--jobs 2] [--resume]

Every row is ``python -m tl_lightning fit --config configs/adaptation/mnist_to_mnistm.yaml [--config <overlay>]
[overrides]`` with ``--seed_everything`` and the pair's ``seed`` set to the run's seed (initialisation, batch
order and the k labelled target samples), then the CLI's test of the selected checkpoint. Data: the config's
``../shared/data`` (MNIST's official files; MNIST-M's train split, from which the config carves the test split,
20%, and a validation split, 10%, stratified with seed 0 for every run).

Model selection: semi-supervised rows (k > 0) keep the checkpoint with the best ``val/target_acc``; unsupervised
rows (k = 0) the one DEV chooses by the one-standard-error rule (``val/dev_score``: the latest epoch whose DEV risk
is within one standard error of the lowest; source validation labels and unlabelled target images only). For the unsupervised rows the bench also keeps the checkpoint an oracle would choose
(``val/target_acc``) and tests it, so the table shows the label-free choice beside the oracle's.

Each run has its own folder under ``--workdir`` with the command it ran (``bench_command.json``) and the
configuration it resolved to (the CLI's ``config.yaml``); ``--resume`` keeps a finished run whose resolved
configuration equals the row's now (``--print_config``) and whose code is the same (``bench/provenance.py``: the
``tl_lightning`` tree and the torch version), so neither an edited config file nor a library change is served
stale. Writes ``bench/results/adaptation.{md,json,png}`` (``adaptation_quick.*`` with ``--quick``: one seed, a
few batches, a smoke run).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml

from bench.common import REPO, RESULTS, cli, mean_std
from bench.provenance import code_version, same_code
from tl_lightning.data.base import default_cache_dir

CONFIG = "configs/adaptation/mnist_to_mnistm.yaml"
ORACLE = "oracle"  # folder of the checkpoint chosen with target labels, beside a label-free run's own


@dataclass
class Row:
    name: str
    overlays: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    labelled: str = "10"  # labelled target samples per class, as the table shows it
    published: Optional[float] = None  # Ganin & Lempitsky 2015, MNIST -> MNIST-M
    runs: list = field(default_factory=list)

    @property
    def label_free(self) -> bool:
        return self.labelled == "0"

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() else "_" for c in self.name.lower()).strip("_")


def rows() -> list[Row]:
    # as the README says: no soft labels, so no source stage, and the 20 adaptation epochs alone
    k0 = ["--data.init_args.labelled_per_class=0", "--model.init_args.soft_label_weight=0", "--trainer.max_epochs=20"]
    uniform = ["--model.init_args.confusion=uniform", "--model.init_args.lambda_schedule=false"]
    return [
        Row("source-only", ["configs/adaptation/source_only.yaml"], labelled="0", published=57.5),
        Row("DANN, published network", ["configs/adaptation/dann_published.yaml"], labelled="0", published=81.5),
        Row("DANN, digit_cnn + per-domain BatchNorm", ["configs/adaptation/dann_batchnorm.yaml"], labelled="0"),
        Row("confusion only", overrides=k0, labelled="0"),
        Row("confusion only, uniform target (Tzeng et al.'s alternation)", overrides=k0 + uniform, labelled="0"),
        *[Row(f"confusion + soft labels, k={k}", overrides=[f"--data.init_args.labelled_per_class={k}"],
              labelled=str(k)) for k in (1, 3, 10)],
        Row("train-on-target (all labels)", ["configs/adaptation/target_only.yaml"], labelled="all"),
    ]


QUICK = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=5", "--trainer.limit_val_batches=3",
         "--trainer.limit_test_batches=3"]


def fit_command(row: Row, seed: int, run_dir: Path, quick: bool) -> list[str]:
    cmd = [sys.executable, "-m", "tl_lightning", "fit", "--config", CONFIG]
    for overlay in row.overlays:
        cmd += ["--config", overlay]
    cmd += [*row.overrides, f"--seed_everything={seed}", f"--data.init_args.seed={seed}",
            f"--trainer.default_root_dir={run_dir}", "--trainer.enable_progress_bar=false"]
    if row.label_free:  # the oracle's checkpoint, kept beside the label-free choice
        cmd += ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                "--trainer.callbacks.monitor=val/target_acc", "--trainer.callbacks.mode=max",
                f"--trainer.callbacks.dirpath={run_dir / ORACLE}", f"--trainer.callbacks.filename={ORACLE}"]
    if quick:  # the k rows have a source stage in the run: one epoch of it (and one of adaptation) in a smoke run
        staged = not row.overlays and row.labelled not in ("0", "all")
        cmd += QUICK + (["--model.init_args.source_pretrain_epochs=1", "--trainer.max_epochs=2"] if staged else [])
    return cmd


def test_command(fit: list[str], ckpt: Path, out_dir: Path) -> list[str]:
    """The CLI's ``test`` of ``ckpt``, with the fit's configuration, in a folder of its own."""
    args = [a for a in fit[4:] if not a.startswith(("--trainer.callbacks", "--trainer.default_root_dir",
                                                    "--trainer.max_epochs", "--trainer.limit_train"))]
    return [*fit[:3], "test", *args, f"--ckpt_path={ckpt}", f"--trainer.default_root_dir={out_dir}"]


def test_label_free(fit: list[str], run_dir: Path, log: Path, threads: int) -> dict:
    """A label-free row's two checkpoints, each tested on its own by path: the run's own choice (DEV, the one
    ``best-*.ckpt`` of ``checkpoints/``) and the oracle's (``val/target_acc``)."""
    own = sorted((run_dir / "checkpoints").glob("best-*.ckpt"))
    if len(own) != 1:
        raise SystemExit(f"{run_dir / 'checkpoints'} holds {len(own)} best-*.ckpt files, not one; run it again "
                         "without --resume")
    out = {}
    for name, ckpt in (("selected", own[0]), (ORACLE, run_dir / ORACLE / (ORACLE + ".ckpt"))):
        cli(test_command(fit, ckpt, run_dir / f"{name}_test")[3:], log, threads=threads)
        out[name] = json.loads((run_dir / f"{name}_test" / "metrics.json").read_text())["metrics"]
    return {"target_acc": out["selected"]["test/target_acc"], "source_acc": out["selected"]["test/source_acc"],
            "domain_acc": out["selected"].get("test/domain_acc"), "oracle_target_acc": out[ORACLE]["test/target_acc"],
            "tested": {"selected": own[0].name, ORACLE: ORACLE + ".ckpt"}}


def run_dir_of(row: Row, seed: int, args) -> Path:
    return Path(args.workdir) / row.slug / f"seed{seed}"


def resolved_config(cmd: list[str]) -> dict:
    """The configuration a CLI command resolves to (``--print_config``: every config file and override applied)."""
    proc = subprocess.run([*cmd, "--print_config"], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} --print_config failed:\n{proc.stderr[-2000:]}")
    return yaml.safe_load(proc.stdout)


def finished(row: Row, seed: int, args) -> Optional[dict]:
    """The result of an earlier run that finished with the configuration this row resolves to now.

    Compared on the resolved configuration the run saved (``config.yaml``), not on the command line: an edited
    config file under an unchanged command is a new run, and an override that restates a value is not."""
    run_dir = run_dir_of(row, seed, args)
    if not (run_dir / "bench_command.json").exists() or not (run_dir / "config.yaml").exists():
        return None
    result = json.loads((run_dir / "bench_result.json").read_text())
    if not same_code(result.get("code"), args.code):  # checked first: no --print_config process for a stale run
        print(f"seed {seed} {row.name}: measured with other code ({result.get('code')}, now {args.code}); "
              "not kept", flush=True)
        return None
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    if saved != resolved_config(fit_command(row, seed, run_dir, args.quick)):
        print(f"seed {seed} {row.name}: configuration changed since the finished run (not kept)", flush=True)
        return None
    if row.label_free and "tested" not in result:  # recorded before each checkpoint was tested by its path
        result.update(test_label_free(fit_command(row, seed, run_dir, args.quick), run_dir,
                                      run_dir / "bench.log", args.threads))
        (run_dir / "bench_result.json").write_text(json.dumps(result))
    return result


def run_one(row: Row, seed: int, args) -> dict:
    """One (row, seed): fit + test through the CLI, plus the oracle's test for a label-free row; its result."""
    run_dir = run_dir_of(row, seed, args)
    fit = fit_command(row, seed, run_dir, args.quick)
    recorded = run_dir / "bench_command.json"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    log = run_dir / "bench.log"
    measured = cli(fit[3:], log, threads=args.threads)
    fit_s = measured["wall_s"]
    m = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    result = {"seed": seed, "target_acc": m["test/target_acc"], "source_acc": m["test/source_acc"],
              "domain_acc": m.get("test/domain_acc"), "wall_s": fit_s,
              "peak_pss_mb": measured["peak_pss_mb"], "code": args.code}
    if row.label_free:
        result.update(test_label_free(fit, run_dir, log, args.threads))
    (run_dir / "bench_result.json").write_text(json.dumps(result))
    recorded.write_text(json.dumps(fit[1:]))  # last: a run killed before this line runs again
    print(f"seed {seed} {row.name}: MNIST-M {100 * result['target_acc']:.1f}%"
          + (f" (oracle {100 * result['oracle_target_acc']:.1f}%)" if row.label_free else "")
          + f", {fit_s:.0f} s", flush=True)
    return result


def write_results(all_rows: list[Row], args, wall_s: float) -> Path:
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / ("adaptation_quick" if args.quick else "adaptation")
    seeds = sorted({r["seed"] for row in all_rows for r in row.runs})
    lines = [
        "# Domain adaptation: MNIST → MNIST-M", "",
        f"Every row runs `python -m tl_lightning fit --config {CONFIG}` with the overlay or overrides shown, "
        f"seeds {', '.join(map(str, seeds))}, through the CLI exactly as the README says; mean ± std over the "
        "seeds. MNIST-M test accuracy is that of the checkpoint the run selects: by `val/target_acc` when labelled "
        "target samples exist (k > 0), else by the label-free DEV risk (You et al. 2019; source validation labels "
        "and unlabelled target images) with the one-standard-error rule (`val/dev_score`: the latest epoch whose "
        "`val/dev_risk` is within one standard error of the lowest). For the k = 0 rows, \"oracle\" is the checkpoint "
        "chosen with the target validation labels, which real unsupervised adaptation does not have. The test "
        "split (5,000 images) and the validation split are carved out of MNIST-M's train split, the same for "
        "every run.", "",
        "| method | run | labelled target / class | MNIST-M test acc (%) | oracle selection (%) | MNIST test acc (%) "
        "| domain-classifier acc, test (%) | published (%) | wall time / run (s) | peak PSS / run (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in all_rows:
        how = " ".join([*(f"`--config {o}`" for o in row.overlays), *(f"`{o}`" for o in row.overrides)]) or "-"
        wall = np.mean([r["wall_s"] for r in row.runs]) if row.runs else float("nan")
        peaks = [r["peak_pss_mb"] for r in row.runs if r.get("peak_pss_mb") is not None]
        peak = f"{max(peaks)}" if peaks else "-"  # the largest over the seeds
        oracle = mean_std(r.get("oracle_target_acc") for r in row.runs) if row.label_free else "-"
        lines.append(f"| {row.name} | {how} | {row.labelled} | {mean_std(r['target_acc'] for r in row.runs)} | "
                     f"{oracle} | {mean_std(r['source_acc'] for r in row.runs)} | "
                     f"{mean_std(r.get('domain_acc') for r in row.runs)} | {row.published or '-'} | {wall:.0f} | {peak} |")
    lines += ["", f"Wall time of this invocation {wall_s / 60:.1f} min, {args.jobs} runs at a time with "
              f"{args.threads} thread(s) each, on {os.cpu_count()} CPU cores ({platform.machine()}, shared), "
              f"torch {torch.__version__}; every run measured with the code of `tl_lightning` tree "
              f"{args.code['tl_lightning'][:12]} (`bench/provenance.py`). Published: Ganin & Lempitsky 2015 "
              "(full MNIST, their schedule). The "
              "domain-classifier accuracy is the method's own domain classifier on the test images of both "
              "domains, balanced over the two (50% = confused); the baselines train theirs as an idle probe. Peak "
              "PSS: the fit's processes together (main process and data-loader workers; shared pages counted "
              "once), sampled every 0.5 s (`bench/memory.py`), the largest over the seeds.", ""]
    (stem.with_suffix(".md")).write_text("\n".join(lines))
    (stem.with_suffix(".json")).write_text(json.dumps(
        {"config": CONFIG, "wall_s": wall_s, "rows": {row.name: {"overlays": row.overlays, "overrides": row.overrides,
                                                                  "runs": row.runs} for row in all_rows}},
        indent=2))
    plot(all_rows, stem.with_suffix(".png"))
    return stem.with_suffix(".md")


def plot(all_rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = [100 * np.array([r["target_acc"] for r in row.runs]) for row in all_rows]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar(range(len(acc)), [a.mean() if len(a) else 0 for a in acc],
           yerr=[a.std(ddof=1) if len(a) > 1 else 0 for a in acc], capsize=4, color="tab:blue")
    ax.axhline(81.5, color="gray", linestyle="--", label="published DANN 81.5%")
    ax.set_xticks(range(len(acc)), [row.name for row in all_rows], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("MNIST-M test accuracy (%)")
    ax.set_title("MNIST → MNIST-M, shipped configs through the CLI")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def selected(name: str, wanted: Optional[list[str]], names: list[str]) -> bool:
    """``--rows``: a full row name selects that row alone ("..., k=1" is not "..., k=10"); any other string
    selects every row whose name contains it."""
    return wanted is None or any(w == name or (w not in names and w in name) for w in wanted)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, a few batches per run (a smoke run)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", default=None,
                        help="run only these rows: a full row name, or a part of names")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--workdir", default=os.path.join(default_cache_dir(), "bench_adaptation_cli"),
                        help="one folder per run (kept for --resume)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the finished runs whose resolved configuration and code are unchanged (all rows), "
                             "run the rest")
    args = parser.parse_args(argv)
    args.code = code_version()  # a finished run is kept only while the library code and torch are the same
    if args.quick:
        args.seeds = args.seeds[:1]
    all_rows = rows()
    tasks = []
    for seed in args.seeds:  # every row's finished runs are kept (--resume); the selected rows' others run
        for row in all_rows:
            done = finished(row, seed, args) if args.resume else None
            if done is not None:
                row.runs.append(done)
            elif selected(row.name, args.rows, [r.name for r in all_rows]):
                tasks.append((row, seed))
    started = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:  # each task is one CLI process (or two) at a time
        for (row, _), result in zip(tasks, pool.map(lambda t: run_one(*t, args), tasks)):
            row.runs.append(result)
            write_results([r for r in all_rows if r.runs], args, time.perf_counter() - started)
    all_rows = [row for row in all_rows if row.runs]
    for row in all_rows:
        row.runs.sort(key=lambda r: r["seed"])
    path = write_results(all_rows, args, time.perf_counter() - started)
    print(path.read_text())


if __name__ == "__main__":
    main()
