"""Off-the-shelf recipes on the CUB subset (10 classes, official split), frozen bundled EfficientNet-Lite0
at the config's resolution (288 px: FixRes).

Every row runs the shipped ``configs/feature_extraction/cub200.yaml`` through the CLI in its own process
(``python -m tl_lightning fit --config ... [overrides]``: fit, then test of the best checkpoint) and reads
``metrics.json``. Accuracy rows: ``recipe: auto`` (the shipped default); the linear head by AdamW (the previous
default) and by SGD; every named recipe (penultimate or full-network embedding, with or without L2, logistic or
SVM, each with its sweep on val and the refit on train+val); the full-network embedding over each read-out
(``all``, ``every_block``, ``every_conv``); ``auto`` with one view instead of the shipped two (image
and mirror, ``tta_views: 2``); the read-out resolution (224, 256, 320
px against the shipped 288). They share one feature cache, so each
read-out is extracted once; each row records how many cache entries it extracted. Then the cost of ``auto``,
side by side in four consecutive processes: ``auto`` and the best fixed recipe, each on a fresh (cold) cache,
then each again on its now warm cache.

    python -m bench.offtheshelf            # writes bench/results/offtheshelf.{json,md}
    python -m bench.offtheshelf --resume   # keeps the rows measured with this code and config, and the caches
    python -m bench.offtheshelf --resume --only linear --part a   # a subset of rows (name substrings), in a
                                           # second process beside another part; --table merges the parts
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil

from bench.common import REPO, RESULTS, run
from bench.provenance import code_version, file_sha, same_code

CONFIG = "configs/feature_extraction/cub200.yaml"
RUNS = REPO / "runs" / "bench_offtheshelf"
FIXED = "--model.recipe=null"
SGD = '--model.optimizer={"class_path": "torch.optim.SGD", "init_args": {"momentum": 0.9}}'

# (row name, cache: "warm" (shared), or a fresh folder's name, CLI overrides)
ROWS = [
    ("auto (shipped config)", "warm", []),
    ("linear head, AdamW, 40 epochs (previous default)", "warm", [FIXED]),
    ("linear head, SGD, 40 epochs", "warm", [FIXED, SGD, "--model.lr=0.05"]),
    ("linear head, AdamW, L2-norm", "warm", [FIXED, "--model.l2_normalize=true"]),
    *[(f"recipe {name}", "warm", [f"--model.recipe={name}"]) for name in (
        "penultimate+logistic", "penultimate+svm", "penultimate+l2+logistic", "penultimate+l2+svm",
        "fne+logistic", "fne+svm", "fne+l2+logistic", "fne+l2+svm")],
    ("FNE over `all` (feature_info levels) + logistic", "warm",
     [FIXED, "--model.embedding=fne", "--model.layers=all", "--model.head=logistic"]),
    ("FNE over `every_block` + logistic", "warm",
     [FIXED, "--model.embedding=fne", "--model.layers=every_block", "--model.head=logistic"]),
    ("FNE over `every_conv` + linear head, AdamW", "warm", [FIXED, "--model.embedding=fne"]),
    ("auto, tta_views=1 (one view, the previous default)", "warm", ["--model.tta_views=1"]),
    # the read-out resolution (FixRes: the shipped configs read at 288 px); each size is its own cache entry
    ("resolution: auto at 224 px (the backbone's own size, the previous default)", "warm",
     ["--data.image_size=224"]),
    *[(f"resolution: penultimate+logistic at {px} px", "warm", ["--model.recipe=penultimate+logistic",
                                                            f"--data.image_size={px}"]) for px in (224, 256, 320)],
]
#: the cost of auto: (row name, cache folder, use the best fixed recipe), run back to back after ``ROWS``
TIMING = [
    ("cost: auto, cold cache", "timing_auto", False),
    ("cost: best fixed recipe, cold cache", "timing_best", True),
    ("cost: auto, warm cache", "timing_auto", False),
    ("cost: best fixed recipe, warm cache", "timing_best", True),
]


def cache_entries(cache: str) -> int:
    folder = RUNS / cache / "features"
    return len(list(folder.glob("*.pt"))) if folder.is_dir() else 0


def run_row(name: str, cache: str, overrides: list[str], provenance: dict) -> dict:
    """One CLI fit (+ test) in a fresh process; the result row from its ``metrics.json``."""
    run_dir = RUNS / "runs" / name.replace(" ", "_").replace("/", "_").replace("`", "")
    if run_dir.exists():
        shutil.rmtree(run_dir)
    entries = cache_entries(cache)
    log = run_dir.parent / f"{run_dir.name}.log"
    log.unlink(missing_ok=True)
    m = run([CONFIG], overrides, run_dir, log=log, env={"TL_LIGHTNING_CACHE": str(RUNS / cache)})
    extracted = cache_entries(cache) - entries
    fit = m.get("head_fit", {})
    return {"name": name, "cache": cache, "overrides": overrides, "test_acc": m["metrics"]["test/acc"],
            "wall_s": m["bench"]["wall_s"], "peak_pss_mb": m["bench"]["peak_pss_mb"],
            "extracted": extracted, "cli_wall_s": m["wall_time_s"], "recipe": m.get("summary", {}).get("recipe"),
            "head_fit": {k: v for k, v in fit.items() if not k.endswith("_grid") and k != "val_scores"},
            "recipe_selection": m.get("recipe_selection"), **provenance}


def still_valid(row: dict, provenance: dict) -> bool:
    """``--resume`` keeps a row only while the library code, torch and the shipped config are the ones it ran."""
    return same_code(row.get("code"), provenance["code"]) and row.get("config_sha") == provenance["config_sha"]


def image_size() -> int:
    """The shipped config's input size (``data.image_size``; the backbone's own 224 px when null)."""
    import yaml

    return yaml.safe_load((REPO / CONFIG).read_text())["data"]["init_args"].get("image_size") or 224


def table(rows: list[dict]) -> str:
    best = max((r for r in rows if r["name"].startswith("recipe ")), key=lambda r: r["test_acc"], default=None)
    lines = [
        f"Off-the-shelf recipes on the CUB-200-2011 subset in ../shared/data (10 classes, official split: 300 "
        f"train images, 20% of them carved out for validation, 243 test images; one test image = 0.41 points), "
        f"frozen bundled ImageNet EfficientNet-Lite0 at {image_size()} px, `{CONFIG}` through the CLI with the overrides "
        f"shown, one process per row. Machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with "
        "other jobs, no GPU. Wall time = the whole `fit` command (start-up, extraction on a cold cache, head "
        "fit, test).",
        "",
        "| row | test acc (%) | wall time (s) | peak PSS (MB) | chosen / fitted | feature cache |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        fit = r["head_fit"]
        chosen = r["recipe"] or ("linear (SGD/AdamW)" if not fit else fit.get("head", ""))
        strength = fit.get("reg", fit.get("C"))
        if strength is not None:
            chosen += f", {'reg' if 'reg' in fit else 'C'} = {strength:.3g}"
        mark = " **(best fixed)**" if best is not None and r is best else ""
        cache = (f"cold: extracted {r['extracted']} (split, read-out, view) entries" if r["extracted"]
                 else "warm: every entry cached")
        pss = r.get("peak_pss_mb")
        lines.append(f"| {r['name']}{mark} | {100 * r['test_acc']:.1f} | {r['wall_s']:.0f} | "
                     f"{'-' if pss is None else pss} | {chosen} | {cache} |")
    cost = {r["name"]: r for r in rows if r["name"].startswith("cost: ")}
    if len(cost) == len(TIMING):
        wall = {name: cost[name]["wall_s"] for name, _, _ in TIMING}
        cold_auto, cold_best, warm_auto, warm_best = (wall[name] for name, _, _ in TIMING)
        lines += ["", f"The cost of `auto`, four consecutive processes: cold cache {cold_auto:.0f} s against "
                      f"{cold_best:.0f} s for the best fixed recipe alone ({cold_auto / cold_best:.2f}x); warm cache "
                      f"{warm_auto:.0f} s against {warm_best:.0f} s ({warm_auto / warm_best:.2f}x)."]
    auto = next((r for r in rows if r["recipe_selection"]), None)
    if auto:
        sel = auto["recipe_selection"]
        lines += ["", f"`auto`'s validation scores ({sel['metric']}, {len(sel['candidates'])} candidates, "
                      f"selection {sel['seconds']:.1f} s in the first row, which extracted both read-outs; "
                      f"chosen: `{sel['chosen']}`):", "",
                  "| candidate | val score | strength | feature dim |", "|---|---|---|---|"]
        for c in sel["candidates"]:
            strength = c.get("reg", c.get("C"))
            lines.append(f"| {c['recipe']} | {100 * c['val_score']:.1f} | "
                         f"{'reg' if 'reg' in c else 'C'} = {strength:.3g} | {c['feature_dim']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resume", action="store_true",
                   help="keep the finished rows measured with this code and config, and the caches")
    p.add_argument("--table", action="store_true", help="only rewrite offtheshelf.md from the measured rows")
    p.add_argument("--only", nargs="*", default=None, help="run only the rows whose name contains one of these")
    p.add_argument("--part", default="", help="write this process's rows to offtheshelf<part>.json")
    args = p.parse_args(argv)
    if args.table:
        return write_table(list(measured().values()))
    data = REPO / "../shared/data/CUB_200_2011_subset10/CUB_200_2011"
    if not data.is_dir():
        raise SystemExit(f"CUB subset not found at {data.resolve()} (the config reads ../shared/data).")
    out_json = RESULTS / f"offtheshelf{args.part}.json"
    provenance = {"code": code_version(), "config_sha": file_sha(CONFIG)}  # recorded with every row
    earlier = measured() if args.resume else {}
    done = {n: r for n, r in earlier.items() if still_valid(r, provenance)}
    if len(done) < len(earlier):
        print(f"{len(earlier) - len(done)} measured row(s) ran other code or another config: measured again")
    if not args.resume and RUNS.exists():
        shutil.rmtree(RUNS)
    RUNS.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)

    mine = {r["name"]: r for r in json.loads(out_json.read_text()) if still_valid(r, provenance)} \
        if args.resume and out_json.exists() else {}

    def record(row: dict) -> None:  # each part's file holds the rows that part measured
        done[row["name"]] = mine[row["name"]] = row
        tmp = out_json.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(list(mine.values()), indent=1))
        os.replace(tmp, out_json)
        print(f"{row['name']:55s} {100 * row['test_acc']:5.1f}%  {row['wall_s']:6.1f} s  {row['recipe']}", flush=True)

    (RUNS / "warm").mkdir(exist_ok=True)
    for name, cache, overrides in ROWS:
        if args.only is not None and not any(o in name for o in args.only):
            continue
        if name not in done:
            record(run_row(name, cache, overrides, provenance))
    timing = [t for t in TIMING if args.only is None or any(o in t[0] for o in args.only)]
    if timing and not all(name in done for name, _, _ in timing):  # the four side by side, never half resumed
        best = max((r for r in done.values() if r["name"].startswith("recipe ")), key=lambda r: r["test_acc"])
        for folder in {cache for _, cache, _ in timing}:
            shutil.rmtree(RUNS / folder, ignore_errors=True)
        for name, cache, fixed in timing:
            row = run_row(name, cache, best["overrides"] if fixed else [], provenance)
            if fixed:
                row["recipe"] = best["name"].removeprefix("recipe ")
            record(row)
    write_table(list(done.values()))


def measured() -> dict:
    """Every row measured so far, from ``offtheshelf*.json`` (one file per part)."""
    rows = {}
    for path in sorted(RESULTS.glob("offtheshelf*.json")):
        rows.update({r["name"]: r for r in json.loads(path.read_text())})
    return rows


def write_table(rows: list[dict]) -> None:
    """``offtheshelf.md`` from the rows measured so far, in the order of ``ROWS``."""
    by_name = {r["name"]: r for r in rows}
    text = table([by_name[n] for n in [n for n, _, _ in ROWS + TIMING] if n in by_name])
    tmp = RESULTS / "offtheshelf.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, RESULTS / "offtheshelf.md")
    print(text)


if __name__ == "__main__":
    main()
