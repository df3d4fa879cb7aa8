"""Attention kernels. `sparse_attention` is the dispatching entry point.

Semantics (`reference.window_sink_mask`): query head h at absolute position i attends key j iff
`j <= i and (i - j < windows[h] or j < sink[h])`, and `j < kv_lengths[b]` when given. Queries sit at
positions [q_offset, q_offset + T), keys at [0, S) (chunked prefill: S = q_offset + T).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from moa_jax.pallas_kernels.moa_cache import SpanKVCache
from moa_jax.pallas_kernels.moa_decode_gpu import span_decode, span_decode_reference
from moa_jax.pallas_kernels.moa_schedule import MoASchedule
from moa_jax.pallas_kernels.recycled_decode_gpu import (
    decode_reference,
    full_step_decode,
    recycled_decode,
)
from moa_jax.pallas_kernels.reference import mha_reference, window_sink_attention, window_sink_mask

_BACKENDS = ("auto", "gpu", "mgpu", "tpu", "reference")
_MGPU_OPTIONS = ("block_k_dq", "num_stages", "num_stages_dq", "num_stages_dkv")


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _block(requested: int | None, default: int, length: int) -> int:
    b = default if requested is None else int(requested)
    return max(16, min(b, _next_pow2(length)))


def sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    windows: Sequence[int],
    sink: int | Sequence[int] = 0,
    q_offset: int = 0,
    kv_lengths: jax.Array | None = None,
    backend: str = "auto",
    interpret: bool | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    return_lse: bool = False,
    scale: float | None = None,
    **kernel_options,
):
    """Causal attention with a sliding window and sinks per query head.

    Args:
      q: [B, T, H, D]; k, v: [B, S, Hkv, D] with H a multiple of Hkv (GQA: heads of one KV group
        may have different windows; K/V are never repeated).
      windows: static per-query-head window lengths in tokens (>= 1; >= S means dense).
      sink: sink tokens, one int for all heads or one per query head (static).
      q_offset: static position of the first query (queries at [q_offset, q_offset + T)).
      kv_lengths: optional int [B], valid keys per row (keys j >= kv_lengths[b] are padding).
      backend: 'auto' (by platform: TPU -> splash attention; Hopper or newer with bf16/f16 ->
        the Mosaic GPU kernel; other GPUs and f32 -> the Triton kernel; CPU -> the Triton kernel
        in interpret mode), 'gpu' (Triton), 'mgpu' (Mosaic GPU, sm90+), 'tpu' or 'reference'
        (the jnp oracle).
      interpret: run the Pallas kernel in interpret mode (default: True off GPU/TPU).
      block_q, block_k: forward block sizes (powers of two; clamped to the sequence lengths).
      return_lse: also return the log-sum-exp [B, H, T] (float32; -inf for rows with no key).
      scale: logit scale, default 1/sqrt(D).
      kernel_options: backend-specific options (Triton: block_q_dq, block_k_dq, block_q_dkv,
        block_k_dkv, num_warps, num_stages, num_warps_bwd, num_stages_bwd; Mosaic GPU:
        block_k_dq, num_stages, num_stages_dq, num_stages_dkv). With 'auto' the options the
        chosen kernel does not take are dropped, and a block_k other than 64 / 128 keeps the
        Triton kernel (the Mosaic GPU kernel's query tiles are fixed; it ignores block_q).
    Returns:
      out [B, T, H, D] in q's dtype (and lse). Differentiable with respect to q, k, v.
    """
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of KV heads ({Hkv})")
    windows = tuple(int(w) for w in windows)
    if len(windows) != H:
        raise ValueError(f"{len(windows)} windows for {H} query heads")
    sinks = (
        (int(sink),) * H
        if isinstance(sink, (int,)) or getattr(sink, "ndim", 1) == 0
        else tuple(int(s) for s in sink)
    )
    if len(sinks) != H:
        raise ValueError(f"{len(sinks)} sinks for {H} query heads")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    platform = jax.default_backend()
    if backend == "auto":
        if platform == "tpu":
            backend = "tpu"
        else:
            from moa_jax.pallas_kernels import moa_prefill_mgpu

            mgpu = (
                interpret is not True
                and block_k in (None, 64, 128)
                and moa_prefill_mgpu.available()
                and moa_prefill_mgpu.supported(q.dtype, D)
            )
            backend = "mgpu" if mgpu else "gpu"
            if mgpu:
                kernel_options = {k: v for k, v in kernel_options.items() if k in _MGPU_OPTIONS}
    if interpret is None:
        interpret = (
            platform not in ("gpu", "cuda", "rocm", "tpu")
            or (backend == "tpu" and platform != "tpu")
            or (backend == "gpu" and platform == "tpu")
        )

    if backend == "reference":
        from moa_jax.pallas_kernels.reference import window_sink_attention

        return window_sink_attention(
            q,
            k,
            v,
            windows,
            sinks,
            q_offset=q_offset,
            kv_lengths=kv_lengths,
            scale=scale,
            return_lse=return_lse,
        )

    if backend == "mgpu":
        from moa_jax.pallas_kernels.moa_prefill_mgpu import sparse_attention_mgpu

        if interpret:
            raise ValueError("the Mosaic GPU kernel has no interpret mode here; use 'gpu'")
        if block_k is not None:
            kernel_options = dict(kernel_options, block_k=int(block_k))
        out, lse = sparse_attention_mgpu(
            q,
            k,
            v,
            windows=windows,
            sinks=sinks,
            q_offset=q_offset,
            kv_lengths=kv_lengths,
            scale=scale,
            **kernel_options,
        )
        return (out, lse) if return_lse else out

    if backend == "tpu":
        from moa_jax.pallas_kernels.moa_prefill_tpu import sparse_attention_tpu

        # splash computes on whole 128-lane key blocks (and its backward on 128-row query
        # blocks): short sequences are padded up to one block, never given a smaller one
        out, lse = sparse_attention_tpu(
            q,
            k,
            v,
            windows=windows,
            sinks=sinks,
            q_offset=q_offset,
            kv_lengths=kv_lengths,
            scale=scale,
            block_q=max(128, _block(block_q, 128, T)),
            block_k=max(128, _block(block_k, 128, S)),
            interpret=interpret,
            return_lse=return_lse,
            **kernel_options,
        )
    else:
        from moa_jax.pallas_kernels.moa_prefill_gpu import sparse_attention_gpu

        wide = jnp.dtype(q.dtype).itemsize >= 4  # f32 tiles: halve them (shared memory)
        out, lse = sparse_attention_gpu(
            q,
            k,
            v,
            windows=windows,
            sinks=sinks,
            q_offset=q_offset,
            kv_lengths=kv_lengths,
            scale=scale,
            block_q=_block(block_q, 64 if wide else 128, T),
            block_k=_block(block_k, 32 if wide else 64, S),
            interpret=interpret,
            **kernel_options,
        )
    return (out, lse) if return_lse else out


__all__ = [
    "MoASchedule",
    "SpanKVCache",
    "decode_reference",
    "full_step_decode",
    "mha_reference",
    "recycled_decode",
    "sparse_attention",
    "span_decode",
    "span_decode_reference",
    "window_sink_attention",
    "window_sink_mask",
]
