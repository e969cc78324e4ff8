"""Performance of tl_lightning (issue 8): every figure a ratio of two runs measured side by side in one run.

Sections (``--only`` picks some):

* ``overhead``: FineTune steps/s through the real CLI stack (Trainer, progress bar, logger, the CLI's callbacks)
  vs a hand-written PyTorch loop with the same timm model, data loader, AdamW, batch size and thread count,
  interleaved over rounds. Target: time ratio <= 1.05.
* ``cache``: N epochs of FeatureExtraction with the feature cache (cold: extraction included) vs the backbone
  run every step. Target: speedup >= 0.8 N.
* ``extraction``: images/s of a cold feature extraction from JPEG files (the real CUB subset, generated
  Flowers-like 500x375 JPEGs) vs the raw forward of the same backbone on in-memory tensors. Target: >= 0.9.
* ``pipeline``: train-loader images/s of each DataModule (default workers) vs the backbone's training
  images/s at the same image size. Target: loader/backbone >= 1 (the loader is not the bottleneck).
* ``workers``: loader images/s over 2 epochs with ``num_workers`` 0 / the default / persistent or not.
* ``herding``: iCaRL herding of 6,000 1280-d features for a 2,000-exemplar budget, ``herding_order`` vs the
  textbook loop that re-sums the chosen exemplars every step.
* ``ddp``: FineTune images/s of 2 CPU processes (gloo, via the CLI) vs 1 process with the same cores.
* ``switches``: FineTune steps/s of the default (``channels_last: auto``, NHWC for this convnet), of
  ``--trainer.precision=bf16-mixed`` with and without NHWC, vs NCHW (``--model.channels_last=false``), and of
  ``--model.compile=true`` vs the default, interleaved.

Writes ``bench/results/perf.md``, ``perf.json``, ``perf.png`` (every ratio) and ``perf_pipeline.png``. The
sections live in ``perf_finetune.py`` (overhead's FineTune row, cache, ddp, switches), ``overhead.py`` and
``overhead_head.py`` (the other methods' overhead rows), ``extraction.py`` and ``perf_data.py`` (pipeline,
workers, herding); ``perf_common.py`` holds the sizes, rows and timers they share. This file runs and reports.

    python -m bench                      # everything: 11 minutes on 2 busy CPU cores
    python -m bench --quick              # smaller sizes, a few minutes
    python -m bench --only overhead,cache
    python -m bench --device cuda        # on a GPU machine: overhead, ddp (all visible GPUs) and switches
                                         # (bf16-mixed, channels_last, compile) -> bench/results/perf_cuda.md

On ``--device cuda`` the sizes are a GPU's (224 px, batch 64) and every timestamp waits for the device
(``torch.cuda.synchronize``), in the plain loop and in ``StepTimer`` alike.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Optional

import lightning as L
import torch


from bench.perf_common import CUDA, CUDA_QUICK, CUDA_SECTIONS, FULL, QUICK, RESULTS, SECTIONS, Row, Size
from bench.perf_data import bench_herding, bench_pipeline, bench_workers
from bench.perf_finetune import bench_cache, bench_ddp, bench_overhead, bench_switches


# ----- report -----------------------------------------------------------------------------------------------
def bench_extraction(size: Size) -> list[Row]:
    from bench.extraction import bench_extraction as run

    return run(size.cache_image_size, size.batch_size, max(2, size.rounds - 1))


BENCHES = {"overhead": bench_overhead, "cache": bench_cache, "extraction": bench_extraction,
           "pipeline": bench_pipeline, "workers": bench_workers,
           "herding": bench_herding, "ddp": bench_ddp, "switches": bench_switches}


def fmt(v: float) -> str:
    if v != v:
        return "-"
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


def write_report(rows: list[Row], size: Size, quick: bool, seconds: float, tag: str,
                 measured: Optional[list[str]] = None) -> Path:
    """``measured``: the sections this run measured when the others' rows are kept from the previous report."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    ran = (f"sections {', '.join(measured)} measured in this run ({seconds / 60:.1f} min), the other rows kept "
           "from the previous report" if measured else f"{seconds / 60:.1f} min in all")
    lines = [f"# Performance ({'--quick' if quick else 'full'} run)", "",
             f"{os.cpu_count()} CPU cores (shared), torch {torch.__version__}, lightning {L.__version__}, "
             f"{torch.get_num_threads()} threads; {ran}. Each ratio compares two runs made side by side in one "
             "run (interleaved rounds, median).", "",
             "| section | measurement | measured | reference | unit | ratio | target | met | note |",
             "|---|---|---:|---:|---|---:|---|---|---|"]
    for r in rows:
        met = "" if r.ok is None else ("yes" if r.ok else "**no**")
        lines.append(f"| {r.section} | {r.name} | {fmt(r.a)} | {fmt(r.b)} | {r.unit} | {fmt(r.ratio)} | "
                     f"{r.target} | {met} | {r.note} |")
    path = RESULTS / f"perf{tag}.md"
    path.write_text("\n".join(lines) + "\n")
    (RESULTS / f"perf{tag}.json").write_text(json.dumps({"size": size.__dict__, "rows": [r.__dict__ for r in rows]},
                                                        indent=1, default=str))
    plot(rows, tag)
    return path


def plot(rows: list[Row], tag: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.ratio == r.ratio]
    if not shown:
        return
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(shown) + 1.2))
    colors = ["tab:green" if r.ok else "tab:red" if r.ok is False else "tab:blue" for r in shown]
    ax.barh(range(len(shown)), [r.ratio for r in shown], color=colors)
    ax.set_yticks(range(len(shown)), [f"[{r.section}] {r.name[:70]}" for r in shown], fontsize=7)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("ratio (log scale; green: target met, red: missed, blue: no target)")
    for i, r in enumerate(shown):
        ax.text(r.ratio, i, f" {r.ratio:.3g}", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"perf{tag}.png", dpi=120)
    plt.close(fig)
    pipe = [r for r in shown if r.section == "pipeline"]
    if pipe:
        fig, ax = plt.subplots(figsize=(9, 0.5 * len(pipe) + 1.2))
        ys = torch.arange(len(pipe)).float()
        ax.barh(ys - 0.2, [r.a for r in pipe], height=0.4, label="train loader")
        ax.barh(ys + 0.2, [r.b for r in pipe], height=0.4, label="backbone training")
        ax.set_yticks(ys.tolist(), [r.name.split(":")[0] for r in pipe], fontsize=8)
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_xlabel("images/s")
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / f"perf{tag}_pipeline.png", dpi=120)
        plt.close(fig)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a few minutes)")
    parser.add_argument("--only", default="", help=f"comma-separated sections of {','.join(SECTIONS)}")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: the GPU table (overhead, ddp, switches), written to perf_cuda.md")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the in-process runs (default 1: steadier timings on a shared machine; "
                             "0 keeps torch's default)")
    args = parser.parse_args(argv)
    sections = CUDA_SECTIONS if args.device == "cuda" else SECTIONS
    only = [s for s in args.only.split(",") if s] or list(sections)
    unknown = set(only) - set(sections)
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)} for --device {args.device}; choose from "
                     f"{', '.join(sections)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible here; run it on a GPU machine")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        size = CUDA_QUICK if args.quick else CUDA
    else:
        size = QUICK if args.quick else FULL
    start = time.perf_counter()
    rows: list[Row] = []
    tag = ("_cuda" if args.device == "cuda" else "") + ("_quick" if args.quick else "")
    kept = previous_rows(tag, exclude=only)  # --only re-measures some sections and keeps the others' rows
    for name in only:
        print(f"== {name}", flush=True)
        t = time.perf_counter()
        rows += BENCHES[name](size)
        print(f"   {time.perf_counter() - t:.0f} s", flush=True)
        merged = sorted(kept + rows, key=lambda r: SECTIONS.index(r.section))
        path = write_report(merged, size, args.quick, time.perf_counter() - start, tag,  # after every section
                            measured=only if kept else None)
    print(path.read_text())


def previous_rows(tag: str, exclude: list[str]) -> list[Row]:
    """Rows of the sections not in ``exclude`` from the last report with this tag (none if there is none)."""
    path = RESULTS / f"perf{tag}.json"
    if not path.exists():
        return []
    return [Row(**r) for r in json.loads(path.read_text())["rows"] if r["section"] not in exclude]


if __name__ == "__main__":
    main()
