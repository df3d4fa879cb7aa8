"""Attention kernels: the public kernel API the rest of the package imports.

Operations, each one dispatcher over its implementations (`dispatch.py`: 'auto', 'mgpu' Mosaic
GPU, 'gpu' Triton, 'tpu', 'reference' jnp, in fallback order):

- `sparse_attention`: prefill and training, per-head windows and sinks (`prefill/`).
- `span_decode`: one token per row over a MoA `SpanKVCache` (`decode/span_*`).
- `full_step_decode`, `recycled_decode`: one token per row over the head-major caches (dense,
  Recycled Attention, StreamingLLM, H2O; `decode/head_major_*`).

The caches the decode kernels read and `MoASchedule` are in `caches/`; the kernels under
`shard_map` in `sharding.py`; the jnp oracles in `reference.py`; launch heuristics in
`heuristics.py`.

Semantics (`reference.window_sink_mask`): query head h at absolute position i attends key j iff
`j <= i and (i - j < windows[h] or j < sink[h])`, and `j < kv_lengths[b]` when given. Queries sit at
positions [q_offset, q_offset + T), keys at [0, S) (chunked prefill: S = q_offset + T).
"""

from __future__ import annotations

from moa_jax.pallas_kernels.caches.dense import DenseKVCache
from moa_jax.pallas_kernels.caches.head_major import (
    HeadMajorKVCache,
    RecycledKVCache,
    SelectedKVCache,
)
from moa_jax.pallas_kernels.caches.schedule import MoASchedule
from moa_jax.pallas_kernels.caches.span import SpanKVCache
from moa_jax.pallas_kernels.dispatch import (
    BACKENDS,
    full_step_decode,
    recycled_decode,
    span_decode,
    sparse_attention,
)
from moa_jax.pallas_kernels.reference import (
    causal_mask,
    head_major_decode_reference,
    mha_reference,
    span_decode_reference,
    window_sink_attention,
    window_sink_mask,
)
from moa_jax.pallas_kernels.sharding import (
    HeadSharding,
    head_shards,
    same_kernel_on_mesh,
    shard_heads,
    span_decode_on_mesh,
    sparse_attention_on_mesh,
)

__all__ = [
    "BACKENDS",
    "DenseKVCache",
    "HeadMajorKVCache",
    "HeadSharding",
    "MoASchedule",
    "RecycledKVCache",
    "SelectedKVCache",
    "SpanKVCache",
    "causal_mask",
    "full_step_decode",
    "head_major_decode_reference",
    "head_shards",
    "mha_reference",
    "recycled_decode",
    "same_kernel_on_mesh",
    "shard_heads",
    "span_decode",
    "span_decode_on_mesh",
    "span_decode_reference",
    "sparse_attention",
    "sparse_attention_on_mesh",
    "window_sink_attention",
    "window_sink_mask",
]
