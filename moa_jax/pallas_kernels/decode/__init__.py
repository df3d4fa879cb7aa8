"""Decode kernels (one query token per row): over the MoA span cache (`span_*`) and over
head-major caches (`head_major_*`: dense, Recycled Attention, StreamingLLM, H2O).
"""
