"""mdserver's benchmark suite: `python -m bench` (docs/BENCHMARKS.md)."""
