"""Benchmark suite of convnextv2_fast (see benchmarks/run.py)."""
