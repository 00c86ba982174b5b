"""Server wrappers that patch tether at runtime, to measure a suggested change before making it.

Use one with any benchmark: ``BENCH_TETHER_WRAPPER=bench/experiments/NAME.py python -m bench.X``.
Nothing here is imported by tether; these files only exist to back the findings in
``docs/benchmarks.md`` with numbers anyone can reproduce.
"""
