"""Operators of the ConvNeXt V2 block.

``reference`` holds the pure-PyTorch definitions every fused kernel is tested
and benchmarked against.  Fused Triton ops live one per file beside it.
"""
