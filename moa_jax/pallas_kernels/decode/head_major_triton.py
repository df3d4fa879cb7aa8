"""Decode attention for Recycled Attention and the K-slot baselines (StreamingLLM, H2O).

One query token per row attends to a per-KV-head buffer of N slots, k, v [B, Hkv, N, D], laid
out head-major so that each KV head's slots are contiguous. Two modes share one kernel:

- full step (`full_step_decode`): the buffer is the full cache and slot j holds position j
  (visible iff j <= q_position). Blocks past the query position are skipped.
- recycled / gathered step (`recycled_decode`): the buffer is the gathered top-K copy with
  `pos` int [B, Hkv, N] giving each slot's position (-1: empty); a slot is visible iff
  0 <= pos <= q_position. The current token (`k_new`, `v_new` [B, Hkv, D]) is attended to as
  one extra key without being written to the buffer first (the caller decides where it goes).

Both optionally return attention *scores* per KV head and slot: the fp32 softmax probabilities
of the query heads of a KV group over everything the query attended to (slots and the new
token), reduced over the group by max (Recycled Attention's selection) or sum (H2O's
accumulated attention). The single pass over the cache writes each query head's fp32 logits
beside the online softmax (log2 domain, N * group rows per KV head: 4 bytes per slot and query
head against 2 * D * itemsize bytes of K/V per slot and KV head, i.e. 12.5% extra traffic for
Llama-3-8B shapes with the 16 padded rows); the jnp epilogue normalises them with the merged
log-sum-exp and reduces over the group. The cache is never read twice.

Kernels:
- GPU (Pallas, Triton backend): split-K flash decoding, one program per (row, KV head, split);
  the query heads of a KV group are the rows of one matmul (padded to 16 for the tensor cores),
  so each K/V block is read once for its group; the splits are merged in jnp.
- TPU (Mosaic, `head_major_tpu.py`): grid (row, KV head, block) with the online softmax in VMEM
  scratch; on full steps the query positions come in by scalar prefetch and the index maps stop
  at the query's last block (later steps re-point at it, which Mosaic does not re-fetch).
- `decode_reference`: the jnp oracle.

The caches these kernels read (dense, recycled, K-slot) are in `caches/head_major.py`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from moa_jax.pallas_kernels.decode.split_k import LOG2E, default_splits, flash_blocks

_SCORE_MODES = (None, "max", "sum")


# ------------------------------------------------------------------------------ oracle
def decode_reference(
    q, k, v, q_positions, *, pos=None, k_new=None, v_new=None, scores=None, scale=None
):
    """The jnp oracle (float32). See `full_step_decode` / `recycled_decode` for the arguments.

    Returns out [B, H, D] (q's dtype), or with `scores`: (out, scores [B, Hkv, N],
    new_scores [B, Hkv] or None).
    """
    b, h, d = q.shape
    _, hkv, n, _ = k.shape
    group = h // hkv
    scale = d**-0.5 if scale is None else scale
    if pos is None:
        pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, hkv, n))
    qp = q_positions.astype(jnp.int32)[:, None, None]
    vis = (pos >= 0) & (pos <= qp)  # [B, Hkv, N]
    qg = q.reshape(b, hkv, group, d).astype(jnp.float32)
    logits = (
        jnp.einsum("bkgd,bknd->bkgn", qg, k.astype(jnp.float32), precision=lax.Precision.HIGHEST)
        * scale
    )
    logits = jnp.where(vis[:, :, None], logits, -jnp.inf)
    vals = v.astype(jnp.float32)
    if k_new is not None:
        ln = (
            jnp.einsum(
                "bkgd,bkd->bkg", qg, k_new.astype(jnp.float32), precision=lax.Precision.HIGHEST
            )
            * scale
        )
        logits = jnp.concatenate([logits, ln[..., None]], axis=-1)
        vals = jnp.concatenate([vals, v_new.astype(jnp.float32)[:, :, None]], axis=2)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(m == -jnp.inf, 0.0, m)
    p = jnp.exp(logits - m)
    den = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(den > 0, den, 1.0)
    out = jnp.einsum("bkgn,bknd->bkgd", p, vals, precision=lax.Precision.HIGHEST)
    out = out.reshape(b, h, d).astype(q.dtype)
    if scores is None:
        return out
    agg = jnp.max(p, axis=2) if scores == "max" else jnp.sum(p, axis=2)
    if k_new is None:
        return out, agg, None
    return out, agg[..., :n], agg[..., n]


# ------------------------------------------------------------------------------ GPU kernel
def _kernel(
    qpos_ref, q_ref, k_ref, v_ref, *refs, bk, per_split, nblocks, scale, has_pos, write_logits
):
    if has_pos:
        pos_ref, refs = refs[0], refs[1:]
    o_ref, m_ref, l_ref = refs[:3]
    lg_ref = refs[3] if write_logits else None
    b, g, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    qp = qpos_ref[b]
    lo = s * per_split
    hi = jnp.minimum(lo + per_split, nblocks)
    if not has_pos:  # slot = position: blocks past the query hold nothing visible
        hi = jnp.minimum(hi, qp // bk + 1)
    q = q_ref[b, g, :, :]  # [Gp, D]

    def load(i):
        sl = pl.ds(i * bk, bk)
        if has_pos:
            p = pos_ref[b, g, sl][None, :]
        else:
            p = (i * bk + jnp.arange(bk, dtype=jnp.int32))[None, :]
        return k_ref[b, g, sl, :], v_ref[b, g, sl, :], (p >= 0) & (p <= qp)

    def keep_logits(i, sc):
        lg_ref[b, g, :, pl.ds(i * bk, bk)] = sc

    acc, m_i, l_i = flash_blocks(q, lo, hi, scale, load, keep_logits if write_logits else None)
    o_ref[b, g, s, :, :] = acc
    m_ref[b, g, s, :] = m_i
    l_ref[b, g, s, :] = l_i


@functools.partial(
    jax.jit, static_argnames=("bk", "num_splits", "scale", "write_logits", "interpret", "num_warps")
)
def _gpu_partials(
    q, k, v, q_positions, pos, *, bk, num_splits, scale, write_logits, interpret, num_warps
):
    b, h, d = q.shape
    _, hkv, n, _ = k.shape
    group = h // hkv
    gp = max(16, 1 << (group - 1).bit_length())
    nblocks = n // bk
    per_split = -(-nblocks // num_splits)
    qg = jnp.zeros((b, hkv, gp, d), q.dtype).at[:, :, :group].set(q.reshape(b, hkv, group, d))
    kernel = functools.partial(
        _kernel,
        bk=bk,
        per_split=per_split,
        nblocks=nblocks,
        scale=scale,
        has_pos=pos is not None,
        write_logits=write_logits,
    )
    out_shape = [
        jax.ShapeDtypeStruct((b, hkv, num_splits, gp, d), jnp.float32),
        jax.ShapeDtypeStruct((b, hkv, num_splits, gp), jnp.float32),
        jax.ShapeDtypeStruct((b, hkv, num_splits, gp), jnp.float32),
    ]
    if write_logits:
        out_shape.append(jax.ShapeDtypeStruct((b, hkv, gp, n), jnp.float32))
    params = None
    if not interpret:
        from moa_jax.pallas_kernels.prefill.triton import _compiler_params

        params = _compiler_params(num_warps, 2)
    args = [q_positions.astype(jnp.int32), qg, k, v] + ([] if pos is None else [pos])
    res = pl.pallas_call(
        kernel,
        grid=(b, hkv, num_splits),
        out_shape=out_shape,
        compiler_params=params,
        interpret=interpret,
        name="recycled_decode",
    )(*args)
    o, m, l = res[:3]
    return o, m, l, (res[3][:, :, :group] if write_logits else None)


# ------------------------------------------------------------------------------ epilogue
def _merge(q, o, m, l, logits, q_positions, pos, k_new, v_new, scale, scores):
    """Merges split partials (log2 domain) and the new token; normalises the logits."""
    b, h, d = q.shape
    hkv = o.shape[1]
    group = h // hkv
    o, m, l = o[..., :group, :], m[..., :group], l[..., :group]  # [B, Hkv, S, G(, D)]
    m_all = jnp.max(m, axis=2)  # [B, Hkv, G]
    if k_new is not None:
        qg = q.reshape(b, hkv, group, d).astype(jnp.float32)
        s_new = jnp.einsum(
            "bkgd,bkd->bkg", qg, k_new.astype(jnp.float32), precision=lax.Precision.HIGHEST
        ) * (scale * LOG2E)
        m_all = jnp.maximum(m_all, s_new)
    m_use = jnp.where(m_all == -jnp.inf, 0.0, m_all)
    wgt = jnp.exp2(m - m_use[:, :, None])  # [B, Hkv, S, G]
    num = jnp.sum(o * wgt[..., None], axis=2)  # [B, Hkv, G, D]
    den = jnp.sum(l * wgt, axis=2)
    if k_new is not None:
        w_new = jnp.exp2(s_new - m_use)
        num = num + w_new[..., None] * v_new.astype(jnp.float32)[:, :, None]
        den = den + w_new
    safe = jnp.where(den > 0, den, 1.0)
    out = (num / safe[..., None]).reshape(b, h, d).astype(q.dtype)
    if scores is None:
        return out
    n = logits.shape[-1]
    if pos is None:
        vis = jnp.broadcast_to(
            jnp.arange(n, dtype=jnp.int32)[None, None] <= q_positions[:, None, None], (b, hkv, n)
        )
    else:
        vis = (pos >= 0) & (pos <= q_positions[:, None, None])
    lse2 = m_use + jnp.log2(safe)  # [B, Hkv, G]
    p = jnp.where(vis[:, :, None], jnp.exp2(logits - lse2[..., None]), 0.0)
    red = jnp.max if scores == "max" else jnp.sum
    new_sc = None
    if k_new is not None:
        new_sc = red(jnp.where(den > 0, jnp.exp2(s_new - lse2), 0.0), axis=2)
    return out, red(p, axis=2), new_sc


# ------------------------------------------------------------------------------ dispatch
def _check(q, k, v, q_positions, pos, k_new, v_new, scores):
    b, h, d = q.shape
    if k.ndim != 4 or k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"q {q.shape} needs k, v [B, Hkv, N, D]; got {k.shape}, {v.shape}")
    hkv, n = k.shape[1], k.shape[2]
    if h % hkv:
        raise ValueError(f"{h} query heads do not divide into {hkv} KV heads")
    if q_positions.shape != (b,):
        raise ValueError(f"q_positions must be [B]={b}, got {q_positions.shape}")
    if pos is not None and pos.shape != (b, hkv, n):
        raise ValueError(f"pos must be [B, Hkv, N]={(b, hkv, n)}, got {pos.shape}")
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new go together")
    if k_new is not None and (k_new.shape != (b, hkv, d) or v_new.shape != (b, hkv, d)):
        raise ValueError(
            f"k_new, v_new must be [B, Hkv, D]={(b, hkv, d)}, got {k_new.shape}, {v_new.shape}"
        )
    if scores not in _SCORE_MODES:
        raise ValueError(f"scores must be one of {_SCORE_MODES}, got {scores!r}")


def _pick_block(n: int, requested: int | None, cap: int) -> int:
    if requested is not None:
        if n % requested:
            raise ValueError(f"block_k {requested} does not divide the {n} slots")
        return int(requested)
    bk = math.gcd(n, cap)
    if bk < 8:
        raise ValueError(f"{n} slots: pad the buffer to a multiple of 16 (got block {bk})")
    return bk


def _decode(
    q,
    k,
    v,
    q_positions,
    *,
    pos,
    k_new,
    v_new,
    scores,
    backend,
    interpret,
    num_splits,
    block_k,
    scale,
    num_warps,
):
    _check(q, k, v, q_positions, pos, k_new, v_new, scores)
    q_positions = q_positions.astype(jnp.int32)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    if backend == "reference":
        return decode_reference(
            q, k, v, q_positions, pos=pos, k_new=k_new, v_new=v_new, scores=scores, scale=scale
        )
    if backend not in ("auto", "gpu", "tpu"):
        raise ValueError(f"backend must be 'auto', 'gpu', 'tpu' or 'reference', got {backend!r}")
    platform = jax.default_backend()
    if backend == "auto":
        backend = "tpu" if platform == "tpu" else "gpu"
    if interpret is None:
        interpret = platform != backend
    n = k.shape[2]
    if backend == "tpu":
        from moa_jax.pallas_kernels.decode.head_major_tpu import tpu_partials

        bk = _pick_block(n, block_k, 512)
        o, m, l, logits = tpu_partials(
            q,
            k,
            v,
            q_positions,
            pos,
            bk=bk,
            scale=scale,
            write_logits=scores is not None,
            interpret=interpret,
        )
    else:
        bk = _pick_block(n, block_k, 64)
        nblocks = n // bk
        splits = num_splits or default_splits(q.shape[0], k.shape[1], nblocks)
        o, m, l, logits = _gpu_partials(
            q,
            k,
            v,
            q_positions,
            pos,
            bk=bk,
            num_splits=int(max(1, min(splits, nblocks))),
            scale=scale,
            write_logits=scores is not None,
            interpret=bool(interpret),
            num_warps=num_warps,
        )
    return _merge(q, o, m, l, logits, q_positions, pos, k_new, v_new, scale, scores)


def full_step_decode(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    *,
    scores: str | None = "max",
    backend: str = "auto",
    interpret: bool | None = None,
    num_splits: int | None = None,
    block_k: int | None = None,
    scale: float | None = None,
    num_warps: int = 4,
):
    """A full decode step over the full cache, with the selection scores from the same pass.

    Args:
      q: [B, H, D] queries (after RoPE) at q_positions int [B].
      k, v: [B, Hkv, N, D]; slot j holds position j (the current token already written).
      scores: 'max' (default: max over the query heads of a KV group of the fp32 softmax
        probabilities), 'sum', or None (attention only).
      backend: 'auto' (TPU kernel on TPU, else the Triton kernel; interpret mode off their
        platform), 'gpu', 'tpu' or 'reference' (the jnp oracle).
      num_splits: GPU split-K factor (default: enough programs to fill the GPU).
      block_k: slots per block (must divide N; default gcd(N, 64) on GPU, gcd(N, 512) on TPU).
    Returns:
      out [B, H, D] in q's dtype, or (out, scores float32 [B, Hkv, N]); invisible slots score 0.
    """
    res = _decode(
        q,
        k,
        v,
        q_positions,
        pos=None,
        k_new=None,
        v_new=None,
        scores=scores,
        backend=backend,
        interpret=interpret,
        num_splits=num_splits,
        block_k=block_k,
        scale=scale,
        num_warps=num_warps,
    )
    return res if scores is None else res[:2]


def recycled_decode(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    pos: jax.Array,
    q_positions: jax.Array,
    k_new: jax.Array | None = None,
    v_new: jax.Array | None = None,
    *,
    scores: str | None = None,
    backend: str = "auto",
    interpret: bool | None = None,
    num_splits: int | None = None,
    block_k: int | None = None,
    scale: float | None = None,
    num_warps: int = 4,
):
    """Decode attention over a gathered K-slot buffer plus the current token.

    Args:
      q: [B, H, D] at q_positions int [B].
      k, v: [B, Hkv, N, D] gathered keys (after RoPE, any slot order) and values.
      pos: int [B, Hkv, N], each slot's position, -1 for an empty slot.
      k_new, v_new: optional [B, Hkv, D], the current token, attended as one more key.
      scores: None (default), 'max' or 'sum' over the group of the probabilities.
      backend, interpret, num_splits, block_k, scale: as in `full_step_decode`.
    Returns:
      out [B, H, D], or (out, slot scores [B, Hkv, N], new-token score [B, Hkv] or None).
    """
    return _decode(
        q,
        k,
        v,
        q_positions,
        pos=pos.astype(jnp.int32),
        k_new=k_new,
        v_new=v_new,
        scores=scores,
        backend=backend,
        interpret=interpret,
        num_splits=num_splits,
        block_k=block_k,
        scale=scale,
        num_warps=num_warps,
    )


__all__ = ["decode_reference", "full_step_decode", "recycled_decode"]
