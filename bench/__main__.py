"""``python -m bench [--quick] [--only overhead,cache,...]``: the performance suite (``bench/perf.py``), which
writes ``bench/results/perf.md`` and its plots. The topic benchmarks run on their own:
``python -m bench.<finetune|adaptation|incremental|datasets|offtheshelf|own_data> [--quick]`` (offtheshelf: ``[--resume]``)."""
from bench.perf import main

main()
