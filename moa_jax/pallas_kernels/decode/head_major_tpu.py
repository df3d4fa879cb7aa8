"""Mosaic TPU kernel of `head_major_triton`'s full-step and gathered decode (backend 'tpu').

Grid (row, KV head, block): the last axis walks the KV head's N slots one block at a time,
sequentially, with the online-softmax state in VMEM scratch. The query heads of a KV group are
the rows of one matmul (padded to 8). In full-step mode (slot = position) the query positions
come in by scalar prefetch: the K/V index maps stop at the block holding the query's position
(later grid steps re-point at it, which Mosaic does not re-fetch) and skip the compute, so a
full step reads only the live part of the cache. Outputs are the unnormalised accumulator and
the (m, l) pair in the log2 domain, merged with the new token by the shared jnp epilogue, and,
when asked, the fp32 logits of every slot. Tested in interpret mode on CPU; on real TPUs the
block must be a multiple of 128 (the caches of `caches/head_major.py` pad to it).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from moa_jax.pallas_kernels.heuristics import padded_group_tpu

_LOG2E = math.log2(math.e)


def reset_state(m_scr, l_scr, acc_scr) -> None:
    """Empty online-softmax state: running max m_scr [Gp, 1] -inf, sum l_scr [Gp, 1] and
    accumulator acc_scr [Gp, D] zero."""
    m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)


def block_logits(q: jax.Array, k: jax.Array, scale: float) -> jax.Array:
    """q [Gp, D], k [bk, D] -> float32 [Gp, bk] logits in the log2 domain (scale * log2(e))."""
    return lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * (
        scale * _LOG2E
    )


def update_state(sc: jax.Array, v_ref, m_scr, l_scr, acc_scr) -> None:
    """Folds one block, log2-domain logits sc [Gp, bk] (-inf masked) and values v_ref [bk, D],
    into the online-softmax state m_scr, l_scr [Gp, 1], acc_scr [Gp, D]."""
    m_prev = m_scr[...]
    m_new = jnp.maximum(m_prev, jnp.max(sc, axis=1, keepdims=True))
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp2(m_prev - m_use)
    pr = jnp.exp2(sc - m_use)
    l_scr[...] = alpha * l_scr[...] + jnp.sum(pr, axis=1, keepdims=True)
    acc_scr[...] = alpha * acc_scr[...] + lax.dot_general(
        pr.astype(v_ref.dtype),
        v_ref[...],
        (((1,), (0,)), ((), ())),
        preferred_element_type=jnp.float32,
    )
    m_scr[...] = m_new


def _first_block(qp, bk: int, window: int):
    """The block holding the first position a query at qp sees within `window`."""
    return lax.div(jnp.maximum(qp - window + 1, 0), bk)


def _kernel(qpos_ref, q_ref, k_ref, v_ref, *refs, bk, scale, has_pos, write_logits, window=None):
    if has_pos:
        pos_ref, refs = refs[0], refs[1:]
    o_ref, m_ref, l_ref = refs[:3]
    refs = refs[3:]
    lg_ref = None
    if write_logits:
        lg_ref, refs = refs[0], refs[1:]
    m_scr, l_scr, acc_scr = refs
    b, i = pl.program_id(0), pl.program_id(2)
    qp = qpos_ref[b]

    @pl.when(i == 0)
    def _init():
        reset_state(m_scr, l_scr, acc_scr)

    def _step():
        q = q_ref[...]  # [Gp, D]
        k = k_ref[...]  # [bk, D]
        if has_pos:
            p = pos_ref[...]  # [1, bk]
        else:
            p = i * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        sc = block_logits(q, k, scale)
        vis = (p >= 0) & (p <= qp)
        if window is not None:
            vis = vis & (qp - p < window)
        sc = jnp.where(vis, sc, -jnp.inf)
        if write_logits:
            lg_ref[...] = sc
        update_state(sc, v_ref, m_scr, l_scr, acc_scr)

    if has_pos:
        _step()
    elif window is None:
        pl.when(i <= lax.div(qp, bk))(_step)  # positions are >= 0: truncation
    else:  # the blocks of the window only
        pl.when((i <= lax.div(qp, bk)) & (i >= _first_block(qp, bk, window)))(_step)

    @pl.when(i == pl.num_programs(2) - 1)
    def _finish():
        o_ref[...] = acc_scr[...]
        m_ref[...] = m_scr[...]
        l_ref[...] = l_scr[...]


@functools.partial(jax.jit, static_argnames=("bk", "scale", "write_logits", "interpret", "window"))
def tpu_partials(q, k, v, q_positions, pos, *, bk, scale, write_logits, interpret, window=None):
    """Returns (acc [B, Hkv, 1, Gp, D], m, l [B, Hkv, 1, Gp], logits [B, Hkv, G, N] or None).
    `window`: slots at q_position - window or before are invisible (None: no limit); a full
    step walks (and fetches) only the window's blocks."""
    b, h, d = q.shape
    _, hkv, n, _ = k.shape
    group = h // hkv
    gp = padded_group_tpu(group)
    steps = n // bk
    has_pos = pos is not None
    qg = jnp.zeros((b, hkv, gp, d), q.dtype).at[:, :, :group].set(q.reshape(b, hkv, group, d))

    if has_pos:

        def kv_map(bi, g, i, qpos_ref):
            return bi, g, i, 0
    elif window is None:

        def kv_map(bi, g, i, qpos_ref):
            return bi, g, jnp.minimum(i, lax.div(qpos_ref[bi], bk)), 0
    else:

        def kv_map(bi, g, i, qpos_ref):
            qp = qpos_ref[bi]
            first = _first_block(qp, bk, window)
            return bi, g, jnp.maximum(jnp.minimum(i, lax.div(qp, bk)), first), 0

    in_specs = [
        pl.BlockSpec((None, None, gp, d), lambda bi, g, i, *_: (bi, g, 0, 0)),
        pl.BlockSpec((None, None, bk, d), kv_map),
        pl.BlockSpec((None, None, bk, d), kv_map),
    ]
    args = [q_positions.astype(jnp.int32), qg, k, v]
    if has_pos:
        in_specs.append(pl.BlockSpec((None, None, 1, bk), lambda bi, g, i, *_: (bi, g, 0, i)))
        args.append(pos[:, :, None, :])
    out_specs = [
        pl.BlockSpec((None, None, gp, d), lambda bi, g, i, *_: (bi, g, 0, 0)),
        pl.BlockSpec((None, None, gp, 1), lambda bi, g, i, *_: (bi, g, 0, 0)),
        pl.BlockSpec((None, None, gp, 1), lambda bi, g, i, *_: (bi, g, 0, 0)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((b, hkv, gp, d), jnp.float32),
        jax.ShapeDtypeStruct((b, hkv, gp, 1), jnp.float32),
        jax.ShapeDtypeStruct((b, hkv, gp, 1), jnp.float32),
    ]
    if write_logits:
        out_specs.append(pl.BlockSpec((None, None, gp, bk), lambda bi, g, i, *_: (bi, g, 0, i)))
        out_shape.append(jax.ShapeDtypeStruct((b, hkv, gp, n), jnp.float32))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, hkv, steps),
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=[
            pltpu.VMEM((gp, 1), jnp.float32),
            pltpu.VMEM((gp, 1), jnp.float32),
            pltpu.VMEM((gp, d), jnp.float32),
        ],
    )
    res = pl.pallas_call(
        functools.partial(
            _kernel,
            bk=bk,
            scale=scale,
            has_pos=has_pos,
            write_logits=write_logits,
            window=window,
        ),
        grid_spec=grid_spec,
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        name="recycled_decode_tpu",
    )(*args)
    o, m, l = res[:3]
    logits = res[3][:, :, :group] if write_logits else None
    return o[:, :, None], m[:, :, None, :, 0], l[:, :, None, :, 0], logits
