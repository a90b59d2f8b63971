"""mapper's benchmarks: what tracking costs AC, and how fast delivery drains.

Run with `scripts/bench` (or `python -m benchmarks`); `--smoke` runs each
measurement small, to show that it works, never how fast it is.
"""
