"""Block-sparse flash attention with per-head windows and sinks: Pallas, Mosaic GPU (Hopper).

The same block tables as the Triton kernel (`block_tables`: per (head, query block) the key blocks
to visit, partial blocks first), run the FlashAttention-3 way on sm90:

forward  one CTA per (query head, 128 query rows), heaviest items first. Two compute warpgroups
         own 64 rows each; a third (memory) warpgroup streams the scheduled K/V blocks with TMA
         into an `num_stages`-deep shared-memory ring. Both matmuls are wgmma (Q from shared
         memory, P from registers); the two compute warpgroups ping-pong on a schedule barrier so
         that one's softmax overlaps the other's matmuls. Only partial blocks pay the element
         mask. K/V are read at the query head's KV head, never repeated.
dq       the forward block tables again (query rows own the CTA; K/V streamed): S, dP and dQ by
         wgmma, P recomputed once from the saved log-sum-exp.
dk/dv    one CTA per (KV head, 128 keys): each compute warpgroup keeps 64 rows of K and V in
         shared memory and accumulates dK and dV in registers over the streamed (query head,
         query block) tiles of every query head of its KV group (each head with its own window),
         so dK/dV are written once, already summed over the group. P is recomputed once per tile.

Block tables are int32 arrays in global memory read as scalars; grids are static. The
wrapper pads T and S to 128 and D to a multiple of 64. bf16 / f16 only (f32 stays on Triton).

This module holds the entry point, its tuning options and the custom VJP; the kernels are in
mosaic_gpu_fwd.py and mosaic_gpu_bwd.py, what they share in mosaic_gpu_common.py.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from moa_jax.pallas_kernels.heuristics import MGPU_BLOCK_K, MGPU_DEFAULTS, MGPU_MAX_HEAD_DIM
from moa_jax.pallas_kernels.prefill import flash_vjp
from moa_jax.pallas_kernels.prefill.block_tables import MaskSpec, cdiv
from moa_jax.pallas_kernels.prefill.mosaic_gpu_bwd import dkv_call, dq_call
from moa_jax.pallas_kernels.prefill.mosaic_gpu_common import LOG2E, MgpuConfig, plgpu
from moa_jax.pallas_kernels.prefill.mosaic_gpu_fwd import fwd_call

_WG_ROWS = 64  # rows per compute warpgroup (one wgmma M tile)
_TILE = 128  # T and S padding: the CTA tile of every kernel


def available() -> bool:
    """True when the default device is an NVIDIA GPU of compute capability >= 9.0."""
    if plgpu is None:
        return False
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return False
    if dev.platform != "gpu":
        return False
    cc = getattr(dev, "compute_capability", None)
    try:
        return cc is not None and float(cc) >= 9.0
    except (TypeError, ValueError):
        return False


def supported(dtype, head_dim: int) -> bool:
    """Whether this kernel takes q/k/v of `dtype` and head dim `head_dim`: bf16/f16 and
    D <= 128 (the dk/dv kernel's shared memory: K, V and a 3-deep ring of query tiles)."""
    return (
        jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and _pad_dim(head_dim) <= MGPU_MAX_HEAD_DIM
    )


def _pad_dim(d: int) -> int:
    return -(-d // 64) * 64


def _lse2(lse):
    """The saved lse in base 2 for p = exp2(s * c - lse2); +inf (p = 0) on rows with no key."""
    return jnp.where(jnp.isfinite(lse), lse * LOG2E, jnp.inf)


def _bwd_call(cfg: MgpuConfig, q, k, v, kv_lengths, out, lse, do, dlse):
    delta = flash_vjp.backward_delta(out, do, lse, dlse)
    lse2 = _lse2(lse)
    dq = dq_call(cfg, q, k, v, do, lse2, delta, kv_lengths)
    dk, dv = dkv_call(cfg, q, k, v, do, lse2, delta, kv_lengths)
    return dq, dk, dv


_attention = flash_vjp.flash_attention(fwd_call, _bwd_call)


def _prepare(
    q,
    k,
    v,
    windows,
    sinks,
    q_offset=0,
    kv_lengths=None,
    scale=None,
    *,
    block_k: int = MGPU_DEFAULTS["block_k"],
    block_k_dq: int = MGPU_DEFAULTS["block_k_dq"],
    num_stages: int = MGPU_DEFAULTS["num_stages"],
    num_stages_dq: int = MGPU_DEFAULTS["num_stages_dq"],
    num_stages_dkv: int = MGPU_DEFAULTS["num_stages_dkv"],
    profile_dir: str = "",
):
    """The static config and the padded operands of one call (tuning defaults:
    `heuristics.MGPU_DEFAULTS`)."""
    if plgpu is None:
        raise RuntimeError("this jax has no Pallas Mosaic GPU backend")
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    if not supported(q.dtype, D):
        raise ValueError(
            f"the Mosaic GPU kernel takes bf16/f16 with head_dim <= 128, got {q.dtype} and {D}"
        )
    for name, x in (("block_k", block_k), ("block_k_dq", block_k_dq)):
        if x not in MGPU_BLOCK_K:
            raise ValueError(f"{name} must be one of {MGPU_BLOCK_K}, got {x}")
    scale = float(D**-0.5 if scale is None else scale)
    Tp = cdiv(T, _TILE) * _TILE
    Sp = cdiv(S, _TILE) * _TILE
    Dp = _pad_dim(D)
    mk = lambda bq, bk: MaskSpec(windows, sinks, T, S, q_offset, bq, bk)  # noqa: E731
    cfg = MgpuConfig(
        fwd=mk(2 * _WG_ROWS, block_k),
        dq=mk(2 * _WG_ROWS, block_k_dq),
        dkv=mk(_WG_ROWS, _TILE),
        num_kv_heads=Hkv,
        scale=scale,
        has_kv_lengths=kv_lengths is not None,
        num_stages=num_stages,
        num_stages_dq=num_stages_dq,
        num_stages_dkv=num_stages_dkv,
        profile_dir=profile_dir,
    )
    return (cfg, *flash_vjp.pad_inputs(q, k, v, kv_lengths, Tp, Sp, Dp))


def sparse_attention_mgpu(
    q, k, v, *, windows, sinks, q_offset=0, kv_lengths=None, scale=None, **tuning
):
    """Mosaic GPU per-head window + sink attention. Returns (out [B,T,H,D], lse [B,H,T]).

    q [B, T, H, D] and k, v [B, S, Hkv, D] in bf16 or f16, D <= 128; see `sparse_attention`.
    `tuning`: block_k (forward key block, 64 or 128; default 128), block_k_dq (dq key block,
    default 128),
    num_stages / num_stages_dq / num_stages_dkv (each kernel's shared-memory ring depth,
    default 2 / 2 / 3); profile_dir (Mosaic GPU's in-kernel trace of every named scope, for
    benchmarks). Query tiles are fixed (64 rows per warpgroup, 128 per CTA) and the
    dk/dv pass holds 128 keys per CTA. A configuration that does not fit in shared memory
    fails to compile.
    """
    T, D = q.shape[1], q.shape[3]
    cfg, qp, kp, vp, kvl = _prepare(q, k, v, windows, sinks, q_offset, kv_lengths, scale, **tuning)
    out, lse = _attention(qp, kp, vp, kvl, cfg)
    return out[:, :T, :, :D], lse[:, :, :T]


def kernel_stages(q, k, v, do, *, windows, sinks, **options) -> dict:
    """For benchmarks: each of the three kernels of one call as a zero-argument jitted function
    ({'fwd', 'dq', 'dkv'}), on the padded operands, so that they can be timed alone."""
    cfg, qp, kp, vp, kvl = _prepare(q, k, v, windows, sinks, **options)
    dop = flash_vjp.pad_to(flash_vjp.pad_to(do, 1, qp.shape[1]), 3, qp.shape[3])
    fwd = jax.jit(functools.partial(fwd_call, cfg))
    out, lse = jax.jit(functools.partial(fwd_call, dataclasses.replace(cfg, profile_dir="")))(
        qp, kp, vp, kvl
    )
    delta = flash_vjp.backward_delta(out, dop, lse, None)
    lse2 = _lse2(lse)
    dq = jax.jit(functools.partial(dq_call, cfg))
    dkv = jax.jit(functools.partial(dkv_call, cfg))
    return {
        "fwd": lambda: fwd(qp, kp, vp, kvl),
        "dq": lambda: dq(qp, kp, vp, dop, lse2, delta, kvl),
        "dkv": lambda: dkv(qp, kp, vp, dop, lse2, delta, kvl),
    }
