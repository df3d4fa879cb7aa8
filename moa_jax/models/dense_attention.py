"""Dense causal attention for training and scoring without a cache: `TrainDenseAttention`
over `causal_attention` (cuDNN / XLA's fused attention, the project's Pallas flash kernel or
the jnp reference), optionally masked to packed documents (`segment_ids_from_positions`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from moa_jax.models.attention import Attention
from moa_jax.pallas_kernels import sparse_attention
from moa_jax.pallas_kernels.reference import causal_mask, mha_reference

ATTENTION_IMPLS = ("auto", "reference", "xla", "cudnn", "pallas")


def resolve_impl(impl: str, dtype: Any) -> str:
    """The implementation `causal_attention` runs for `impl` and inputs of `dtype` ('auto':
    cuDNN on GPU for half-precision inputs, else the jnp reference)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if jax.default_backend() in ("gpu", "cuda", "rocm") and jnp.dtype(dtype) in (
        jnp.dtype(jnp.bfloat16),
        jnp.dtype(jnp.float16),
    ):
        return "cudnn"
    return "reference"


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str = "auto") -> jax.Array:
    """Causal attention of q [B, T, H, D] over k, v [B, T, Hkv, D] (same positions).

    impl: 'reference' (jnp, float32 softmax), 'xla' / 'cudnn' (`jax.nn.dot_product_attention`;
    cuDNN needs bf16/fp16 inputs), 'pallas' (the project's block-sparse flash kernel
    `sparse_attention` with every window dense, fwd + bwd), 'auto' (cuDNN on GPU for half
    inputs, else the reference).
    """
    impl = resolve_impl(impl, q.dtype)
    if impl == "reference":
        pos = jnp.arange(q.shape[1], dtype=jnp.int32)[None]
        return mha_reference(q, k, v, causal_mask(pos, pos[0]))
    if impl == "pallas":
        return sparse_attention(q, k, v, windows=(q.shape[1],) * q.shape[2], sink=0)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)


def segment_ids_from_positions(positions: jax.Array) -> jax.Array:
    """Segment ids [B, T]: a new segment starts wherever positions[t] != positions[t-1] + 1
    (positions reset at a packed document's start)."""
    starts = jnp.concatenate(
        [jnp.ones_like(positions[:, :1], dtype=bool), positions[:, 1:] != positions[:, :-1] + 1],
        axis=1,
    )
    return jnp.cumsum(starts.astype(jnp.int32), axis=1)


@dataclasses.dataclass(frozen=True)
class TrainDenseAttention(Attention):
    """Full causal attention for training and evaluation without a cache.

    Args:
      impl: see `causal_attention` ('auto': cuDNN on GPU in bf16/fp16, else the jnp reference).
      segments: also mask attention across packed documents, whose boundaries are read from
        `positions` (a reset, see `segment_ids_from_positions`); uses an explicit mask (XLA's
        attention when impl is 'xla' / 'cudnn', else the jnp reference).
    """

    impl: str = "auto"
    segments: bool = False

    def __post_init__(self):
        if self.impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {self.impl!r}")

    def __call__(self, q, k, v, *, layer, positions, lengths=None):
        if not self.segments:
            return causal_attention(q, k, v, self.impl)
        seg = segment_ids_from_positions(positions)
        idx = jnp.arange(q.shape[1], dtype=jnp.int32)
        mask = (idx[None, None, :, None] >= idx[None, None, None, :]) & (
            seg[:, None, :, None] == seg[:, None, None, :]
        )
        impl = resolve_impl(self.impl, q.dtype)
        if impl in ("reference", "pallas"):
            return mha_reference(q, k, v, mask)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")

    def attention_entries(self, seq_len: int) -> int:
        """(query, key) pairs per head of one sequence (for FLOP counts; no packing)."""
        return seq_len * (seq_len + 1) // 2
