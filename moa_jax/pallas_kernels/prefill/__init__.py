"""Prefill kernels (whole prompts, training): Triton, Mosaic GPU, TPU splash, and the block
tables they share.
"""
