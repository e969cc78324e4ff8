"""``python -m bench NAME [options]`` runs one benchmark; ``python -m bench --list`` lists them.

Each benchmark is a module of this package with a ``main(argv)``; ``python -m bench NAME --help`` shows its
options (``--quick`` everywhere: a smoke run). ``python -m bench`` with options only (``--quick``, ``--only``,
``--device``) runs ``perf``, as it always has. Shared pieces: ``bench/common.py``.
"""
from __future__ import annotations

import importlib
import sys

#: name -> module; every one writes its tables under bench/results/
BENCHMARKS = {
    "perf": "bench.perf",  # its sections (overhead.py, extraction.py, ...): python -m bench perf --only NAME
    "datasets": "bench.datasets",
    "offtheshelf": "bench.offtheshelf",
    "finetune": "bench.finetune",
    "adaptation": "bench.adaptation",
    "incremental": "bench.incremental",
    "own_data": "bench.own_data",
}


def summary(module: str) -> str:
    doc = importlib.import_module(module).__doc__ or ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def main(argv: list[str]) -> None:
    if argv[:1] == ["--list"]:
        width = max(map(len, BENCHMARKS))
        for name, module in BENCHMARKS.items():
            print(f"{name.ljust(width)}  {summary(module)}")
        return
    if not argv or argv[0].startswith("-"):
        name, rest = "perf", argv
    else:
        name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        raise SystemExit(f"error: no benchmark '{name}'; choose one of {', '.join(BENCHMARKS)} "
                         "(python -m bench --list).")
    importlib.import_module(BENCHMARKS[name]).main(rest)


if __name__ == "__main__":
    main(sys.argv[1:])
