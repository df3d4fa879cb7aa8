"""MoA decode attention over a `SpanKVCache`: one query token per row, per-head windows + sinks.

The cache's `MoASchedule` (`caches/schedule.py`) gives everything static: each KV head's segment of
the flat cache holds its sink tokens and a ring of its group's largest window, and a query head h
attends to the slots of its KV head whose stored position p satisfies
`p <= i and (i - p < windows[h] or p < sinks[h])`. Slot order is irrelevant (keys carry RoPE
already), so there is no causal mask or rotation in the kernel.

Kernel (Pallas, Triton backend), split-K flash decoding over the schedule's static work list
(`MoASchedule.work_list`): the KV heads' segments differ in length (a dense head's whole
sequence beside short windows), so each is cut into items of about the same number of blocks
and the grid is (row, item); one program walks its item's blocks with an online softmax and
writes an unnormalised partial result, and each KV head's items are merged in jnp. The query
heads of a KV group are processed together (padded to 16 rows for the tensor cores), so each
K/V block is read once for its whole group. The work list is precomputed outside the kernel and
read as scalars. The entry point, `span_decode`, is in `dispatch.py`; the oracle,
`span_decode_reference`, in `reference.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from moa_jax.pallas_kernels.decode.split_k import flash_blocks
from moa_jax.pallas_kernels.heuristics import DECODE_NUM_STAGES, padded_group_gpu
from moa_jax.pallas_kernels.prefill.triton import compiler_params
from moa_jax.pallas_kernels.reference import visible


def _decode_kernel(
    seg_ref,
    first_ref,
    count_ref,
    win_ref,
    sink_ref,
    qpos_ref,
    q_ref,
    k_ref,
    v_ref,
    pos_ref,
    o_ref,
    m_ref,
    l_ref,
    *,
    bk,
    scale,
):
    b, it = pl.program_id(0), pl.program_id(1)
    g = seg_ref[it]
    first = first_ref[it]
    q = q_ref[b, g, :, :]  # [Gp, D]
    w = win_ref[g, :][:, None]
    sk = sink_ref[g, :][:, None]
    qp = qpos_ref[b]

    def load(i):
        sl = pl.ds((first + i) * bk, bk)
        p = pos_ref[b, sl][None, :]
        return k_ref[b, sl, :], v_ref[b, sl, :], (p >= 0) & visible(qp, p, w, sk)

    acc, m_i, l_i = flash_blocks(q, 0, count_ref[it], scale, load)
    o_ref[b, it, :, :] = acc
    m_ref[b, it, :] = m_i
    l_ref[b, it, :] = l_i


@functools.partial(jax.jit, static_argnames=("scale", "per_split", "interpret", "num_warps"))
def span_decode_triton(q, cache, q_positions, *, scale, per_split, interpret, num_warps):
    """The Triton kernel: q [B, H, D] at q_positions [B] over `cache` -> [B, H, D]."""
    b, h, d = q.shape
    sched = cache.schedule
    hkv, group = sched.num_kv_heads, sched.group
    gp = padded_group_gpu(group)
    work = sched.work_list(b, per_split)
    items = work.num_items
    windows, sinks = sched.group_tables(gp)
    qg = jnp.zeros((b, hkv, gp, d), q.dtype).at[:, :, :group].set(q.reshape(b, hkv, group, d))
    kernel = functools.partial(
        _decode_kernel, bk=sched.block, scale=d**-0.5 if scale is None else scale
    )
    out_shape = [
        jax.ShapeDtypeStruct((b, items, gp, d), jnp.float32),
        jax.ShapeDtypeStruct((b, items, gp), jnp.float32),
        jax.ShapeDtypeStruct((b, items, gp), jnp.float32),
    ]
    params = None if interpret else compiler_params(num_warps, DECODE_NUM_STAGES)
    o, m, l = pl.pallas_call(
        kernel,
        grid=(b, items),
        out_shape=out_shape,
        compiler_params=params,
        interpret=interpret,
        name="moa_span_decode",
    )(
        jnp.asarray(work.segment),
        jnp.asarray(work.start),
        jnp.asarray(work.count),
        jnp.asarray(windows),
        jnp.asarray(sinks),
        q_positions.astype(jnp.int32),
        qg,
        cache.k,
        cache.v,
        cache.pos,
    )
    # Merge each KV head's items: [B, Hkv, C, ...], padding items filled as empty partials.
    table = jnp.asarray(work.table)
    m = jnp.take(m, table, axis=1, mode="fill", fill_value=-jnp.inf)
    l = jnp.take(l, table, axis=1, mode="fill", fill_value=0.0)
    o = jnp.take(o, table, axis=1, mode="fill", fill_value=0.0)
    m_all = jnp.max(m, axis=2, keepdims=True)
    m_all = jnp.where(m_all == -jnp.inf, 0.0, m_all)
    wgt = jnp.exp2(m - m_all)  # [B, Hkv, C, Gp]
    num = jnp.sum(o * wgt[..., None], axis=2)
    den = jnp.sum(l * wgt, axis=2)
    out = num / jnp.where(den > 0, den, 1.0)[..., None]
    return out[:, :, :group].reshape(b, h, d).astype(q.dtype)
