"""MoA span-cache decode attention for TPU (Mosaic): `span_decode` with backend
'tpu'.

Grid (row, KV head, block): the last axis walks the KV head's segment one `block` of slots at a
time, sequentially, with the online-softmax state in VMEM scratch; the segment's first block and
block count (from the cache's `MoASchedule`) come in through scalar prefetch, so the index maps
fetch only that head's blocks (steps past a short segment re-point at its last block, which
Mosaic does not re-fetch, and skip the compute). The query heads of a KV group form the rows of
one matmul (padded to 8). Tested in interpret mode on CPU; the cache block must be a multiple of
128 on real TPUs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from moa_jax.pallas_kernels.caches.span import SpanKVCache
from moa_jax.pallas_kernels.decode.head_major_tpu import block_logits, reset_state, update_state
from moa_jax.pallas_kernels.heuristics import padded_group_tpu
from moa_jax.pallas_kernels.reference import visible


def _kernel(
    start_ref,
    nblk_ref,
    qpos_ref,
    q_ref,
    win_ref,
    sink_ref,
    k_ref,
    v_ref,
    pos_ref,
    o_ref,
    m_scr,
    l_scr,
    acc_scr,
    *,
    scale,
):
    b, g, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    @pl.when(i == 0)
    def _init():
        reset_state(m_scr, l_scr, acc_scr)

    @pl.when(i < nblk_ref[g])
    def _step():
        q = q_ref[...]  # [Gp, D]
        k = k_ref[...]  # [bk, D]
        p = pos_ref[...]  # [1, bk]
        qp = qpos_ref[b]
        sc = block_logits(q, k, scale)
        vis = (p >= 0) & visible(qp, p, win_ref[...], sink_ref[...])
        sc = jnp.where(vis, sc, -jnp.inf)
        update_state(sc, v_ref, m_scr, l_scr, acc_scr)

    @pl.when(i == pl.num_programs(2) - 1)
    def _finish():
        l = l_scr[...]
        o_ref[...] = (acc_scr[...] / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "interpret"))
def span_decode_tpu(
    q: jax.Array,
    cache: SpanKVCache,
    q_positions: jax.Array,
    *,
    scale: float | None,
    interpret: bool,
) -> jax.Array:
    """q [B, H, D] -> [B, H, D]; see `dispatch.span_decode`."""
    b, h, d = q.shape
    sched = cache.schedule
    hkv, group = sched.num_kv_heads, sched.group
    gp = padded_group_tpu(group)
    bk = sched.block
    nblk, start = sched.segment_blocks, sched.block_offsets
    steps = int(nblk.max())
    scale = d**-0.5 if scale is None else scale
    windows, sinks = sched.group_tables(gp)
    qg = jnp.zeros((b, hkv, gp, d), q.dtype).at[:, :, :group].set(q.reshape(b, hkv, group, d))

    def kv_map(bi, g, i, start_ref, nblk_ref, qpos_ref):
        return bi, start_ref[g] + jnp.minimum(i, nblk_ref[g] - 1), 0

    def pos_map(bi, g, i, start_ref, nblk_ref, qpos_ref):
        return bi, 0, start_ref[g] + jnp.minimum(i, nblk_ref[g] - 1)

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(b, hkv, steps),
        in_specs=[
            pl.BlockSpec((None, None, gp, d), lambda bi, g, i, *_: (bi, g, 0, 0)),
            pl.BlockSpec((None, gp, 1), lambda bi, g, i, *_: (g, 0, 0)),
            pl.BlockSpec((None, gp, 1), lambda bi, g, i, *_: (g, 0, 0)),
            pl.BlockSpec((None, bk, d), kv_map),
            pl.BlockSpec((None, bk, d), kv_map),
            pl.BlockSpec((None, 1, bk), pos_map),
        ],
        out_specs=pl.BlockSpec((None, None, gp, d), lambda bi, g, i, *_: (bi, g, 0, 0)),
        scratch_shapes=[
            pltpu.VMEM((gp, 1), jnp.float32),
            pltpu.VMEM((gp, 1), jnp.float32),
            pltpu.VMEM((gp, d), jnp.float32),
        ],
    )
    out = pl.pallas_call(
        functools.partial(_kernel, scale=scale),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, hkv, gp, d), q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        name="moa_span_decode_tpu",
    )(
        jnp.asarray(start, jnp.int32),
        jnp.asarray(nblk, jnp.int32),
        q_positions.astype(jnp.int32),
        qg,
        jnp.asarray(windows[..., None]),
        jnp.asarray(sinks[..., None]),
        cache.k,
        cache.v,
        cache.pos[:, None, :],
    )
    return out[:, :, :group].reshape(b, h, d)
