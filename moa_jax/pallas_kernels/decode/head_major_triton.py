"""Decode attention for Recycled Attention and the K-slot baselines (StreamingLLM, H2O).

One query token per row attends to a per-KV-head buffer of N slots, k, v [B, Hkv, N, D], laid
out head-major so that each KV head's slots are contiguous. Two modes share one kernel:

- full step (`full_step_decode`): the buffer is the full cache and slot j holds position j
  (visible iff j <= q_position). Blocks past the query position are skipped.
- recycled / gathered step (`recycled_decode`): the buffer is the gathered top-K copy with
  `pos` int [B, Hkv, N] giving each slot's position (-1: empty); a slot is visible iff
  0 <= pos <= q_position. The current token (`k_new`, `v_new` [B, Hkv, D]) is attended to as
  one extra key without being written to the buffer first (the caller decides where it goes).

Both take an optional static `window` (the model's own sliding window, `ModelConfig.model_window`):
a slot is then visible only when q_position - its position < window; a full step also skips the
blocks before the window. Without it (the default) the kernels are unchanged.

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
- `head_major_decode_reference` (`reference.py`): the jnp oracle.

The entry points, `full_step_decode` and `recycled_decode`, are in `dispatch.py`.

The caches these kernels read (dense, recycled, K-slot) are in `caches/head_major.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from moa_jax.pallas_kernels.decode.split_k import LOG2E, flash_blocks
from moa_jax.pallas_kernels.heuristics import DECODE_NUM_STAGES, padded_group_gpu
from moa_jax.pallas_kernels.prefill.triton import compiler_params


# ------------------------------------------------------------------------------ GPU kernel
def _kernel(
    qpos_ref,
    q_ref,
    k_ref,
    v_ref,
    *refs,
    bk,
    per_split,
    nblocks,
    scale,
    has_pos,
    write_logits,
    window=None,
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
        if window is not None:  # nor do the blocks before the window
            lo = jnp.maximum(lo, jnp.maximum(qp - window + 1, 0) // bk)
    q = q_ref[b, g, :, :]  # [Gp, D]

    def load(i):
        sl = pl.ds(i * bk, bk)
        if has_pos:
            p = pos_ref[b, g, sl][None, :]
        else:
            p = (i * bk + jnp.arange(bk, dtype=jnp.int32))[None, :]
        vis = (p >= 0) & (p <= qp)
        if window is not None:
            vis = vis & (qp - p < window)
        return k_ref[b, g, sl, :], v_ref[b, g, sl, :], vis

    def keep_logits(i, sc):
        lg_ref[b, g, :, pl.ds(i * bk, bk)] = sc

    acc, m_i, l_i = flash_blocks(q, lo, hi, scale, load, keep_logits if write_logits else None)
    o_ref[b, g, s, :, :] = acc
    m_ref[b, g, s, :] = m_i
    l_ref[b, g, s, :] = l_i


@functools.partial(
    jax.jit,
    static_argnames=(
        "bk",
        "num_splits",
        "scale",
        "write_logits",
        "interpret",
        "num_warps",
        "window",
    ),
)
def head_major_partials(
    q,
    k,
    v,
    q_positions,
    pos,
    *,
    bk,
    num_splits,
    scale,
    write_logits,
    interpret,
    num_warps,
    window=None,
):
    b, h, d = q.shape
    _, hkv, n, _ = k.shape
    group = h // hkv
    gp = padded_group_gpu(group)
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
        window=window,
    )
    out_shape = [
        jax.ShapeDtypeStruct((b, hkv, num_splits, gp, d), jnp.float32),
        jax.ShapeDtypeStruct((b, hkv, num_splits, gp), jnp.float32),
        jax.ShapeDtypeStruct((b, hkv, num_splits, gp), jnp.float32),
    ]
    if write_logits:
        out_shape.append(jax.ShapeDtypeStruct((b, hkv, gp, n), jnp.float32))
    params = None if interpret else compiler_params(num_warps, DECODE_NUM_STAGES)
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
def merge_partials(q, o, m, l, logits, q_positions, pos, k_new, v_new, scale, scores, window=None):
    """Merges split partials (log2 domain; the Triton and the TPU kernel's) and the new token;
    normalises the logits (slots outside `window`, when given, score 0)."""
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
    if window is not None:
        p_ = jnp.arange(n, dtype=jnp.int32)[None, None] if pos is None else pos
        vis = vis & (q_positions[:, None, None] - p_ < window)
    lse2 = m_use + jnp.log2(safe)  # [B, Hkv, G]
    p = jnp.where(vis[:, :, None], jnp.exp2(logits - lse2[..., None]), 0.0)
    red = jnp.max if scores == "max" else jnp.sum
    new_sc = None
    if k_new is not None:
        new_sc = red(jnp.where(den > 0, jnp.exp2(s_new - lse2), 0.0), axis=2)
    return out, red(p, axis=2), new_sc
