"""Synthetic data for tests, smoke runs and benchmarks.

See :mod:`convnextv2_fast.data.synthetic_coco`.
"""
