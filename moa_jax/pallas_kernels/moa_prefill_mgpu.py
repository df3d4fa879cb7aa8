"""Block-sparse flash attention with per-head windows and sinks: Pallas, Mosaic GPU (Hopper).

The same schedule as the Triton kernel (`masks.schedule`: per (head, query block) the key blocks
to visit, partial blocks first), run the FlashAttention-3 way on sm90:

forward  one CTA per (query head, 128 query rows), heaviest items first. Two compute warpgroups
         own 64 rows each; a third (memory) warpgroup streams the scheduled K/V blocks with TMA
         into an `num_stages`-deep shared-memory ring. Both matmuls are wgmma (Q from shared
         memory, P from registers); the two compute warpgroups ping-pong on a schedule barrier so
         that one's softmax overlaps the other's matmuls. Only partial blocks pay the element
         mask. K/V are read at the query head's KV head, never repeated.
dq       the forward schedule again (query rows own the CTA; K/V streamed): S, dP and dQ by
         wgmma, P recomputed once from the saved log-sum-exp.
dk/dv    one CTA per (KV head, 128 keys): each compute warpgroup keeps 64 rows of K and V in
         shared memory and accumulates dK and dV in registers over the streamed (query head,
         query block) tiles of every query head of its KV group (each head with its own window),
         so dK/dV are written once, already summed over the group. P is recomputed once per tile.

Schedule tables are int32 arrays in global memory read as scalars; grids are static. The
wrapper pads T and S to 128 and D to a multiple of 64. bf16 / f16 only (f32 stays on Triton).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from moa_jax.pallas_kernels import flash_vjp, masks
from moa_jax.pallas_kernels.reference import visible

try:
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover - jax without Mosaic GPU
    plgpu = None

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_WG_ROWS = 64  # rows per compute warpgroup (one wgmma M tile)
_TILE = 128  # T and S padding: the CTA tile of every kernel


@dataclasses.dataclass(frozen=True)
class MgpuConfig:
    """Static configuration of one call (hashable)."""

    fwd: masks.MaskSpec  # block_q = 128 (two warpgroups), block_k = forward key block
    dq: masks.MaskSpec  # block_q = 128, block_k = dq key block
    dkv: masks.MaskSpec  # block_q = 64 (streamed query tile), block_k = 128 (two warpgroups)
    num_kv_heads: int
    scale: float
    has_kv_lengths: bool
    num_stages: int = 2  # forward K/V ring depth
    num_stages_dq: int = 2  # dq K/V ring depth
    num_stages_dkv: int = 3  # dk/dv (q, dO, lse, delta) ring depth
    profile_dir: str = ""  # when set: Mosaic GPU's in-kernel trace, one JSON per call


def _compiler_params(cfg: MgpuConfig, steps: int):
    """approx exp2; with cfg.profile_dir, the profiler records every named scope of every
    warpgroup (room for `steps` loop iterations of up to 8 scopes each; the trace buffer takes
    shared memory, so profile short sequences)."""
    if not cfg.profile_dir:
        return plgpu.CompilerParams(approx_math=True)
    return plgpu.CompilerParams(
        approx_math=True, profile_space=8 * steps + 16, profile_dir=cfg.profile_dir
    )


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
        and _pad_dim(head_dim) <= 128
    )


def _pad_dim(d: int) -> int:
    return -(-d // 64) * 64


def _smem(shape, dtype):
    """Shared memory tile laid out for wgmma / TMA (8x64 tiles, 128-byte swizzle)."""
    return plgpu.SMEM(
        shape, dtype, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    )


def _row_vec(ref):
    """[n] f32 shared-memory vector in the layout of a wgmma row reduction."""
    return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(1))


def _col_vec(ref):
    return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(0))


def _iota(shape, dim):
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _visible(rows, cols, w, s, kv_valid):
    """Element mask: query positions `rows`, key positions `cols` (same shape)."""
    return visible(rows, cols, w, s) & (cols < kv_valid)


def _mask_block(s, row0, col0, w, sink, kv_valid):
    """Logits s [rows, keys] of query positions row0.. and key positions col0..: -inf where the
    key is not visible."""
    rows = row0 + _iota(s.shape, 0)
    cols = col0 + _iota(s.shape, 1)
    return jnp.where(_visible(rows, cols, w, sink, kv_valid), s, -jnp.inf)


def _div(x, d: int):
    return lax.div(x, jnp.asarray(d, x.dtype))


def _rem(x, d: int):
    return lax.rem(x, jnp.asarray(d, x.dtype))


def _work_item(order_ref, num_ref, npart_ref, inner: int, has_kvlen: bool):
    """This CTA's (batch row, item, item // inner, item % inner, blocks to visit, of which
    masked); with ragged kv lengths every block is masked."""
    b = lax.axis_index("batch")
    item = order_ref[lax.axis_index("item")]
    num = num_ref[item]
    npart = num if has_kvlen else npart_ref[item]
    return b, item, _div(item, inner), _rem(item, inner), num, npart


def _kv_valid(kvlen_ref, b, kv_len: int, has_kvlen: bool):
    return jnp.minimum(kvlen_ref[b], kv_len) if has_kvlen else kv_len


def _bcast(x, shape, dim):
    return lax.broadcast_in_dim(x, shape, [dim])


def _zeros(shape):
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def _stream_kv(
    k_ref,
    v_ref,
    k_smem,
    v_smem,
    k_ready,
    v_ready,
    k_free,
    v_free,
    blocks_ref,
    base,
    num,
    b,
    kvh,
    bk: int,
    stages: int,
):
    """The memory warpgroup of the row-tiled kernels: TMA the `num` scheduled key blocks
    (`blocks_ref[base + i]`) of K and V into a `stages`-deep ring, each slot reused once both
    compute warpgroups have freed it."""

    @pl.loop(0, num)
    def _(i):
        slot = _rem(i, stages)
        sl = (b, pl.ds(blocks_ref[base + i] * bk, bk), kvh)

        @pl.when(i >= stages)
        def _():
            plgpu.barrier_wait(k_free.at[slot])

        plgpu.copy_gmem_to_smem(k_ref.at[sl], k_smem.at[slot], k_ready.at[slot])

        @pl.when(i >= stages)
        def _():
            plgpu.barrier_wait(v_free.at[slot])

        plgpu.copy_gmem_to_smem(v_ref.at[sl], v_smem.at[slot], v_ready.at[slot])


def _row_tiles(cfg: MgpuConfig, spec: masks.MaskSpec, num_heads: int):
    """Statics of a kernel whose CTAs own 2 x 64 query rows and stream scheduled key blocks:
    (schedule, query tiles, most blocks per tile, rows per warpgroup, key block, GQA group,
    log2-scaled logit scale, query offset, key length, ragged kv lengths?)."""
    sch = masks.schedule(spec)
    return (
        sch,
        spec.num_q_blocks,
        sch.max_kv_blocks,
        spec.block_q // 2,
        spec.block_k,
        num_heads // cfg.num_kv_heads,
        cfg.scale * _LOG2E,
        spec.q_offset,
        spec.kv_len,
        cfg.has_kv_lengths,
    )


# --------------------------------------------------------------------------------- forward
def _fwd_call(cfg: MgpuConfig, q, k, v, kv_lengths):
    """q [B, Tp, H, Dp], k/v [B, Sp, Hkv, Dp] -> (out [B, Tp, H, Dp], lse [B, H, Tp] natural)."""
    spec = cfg.fwd
    B, Tp, H, D = q.shape
    sch, nq, kmax, bq, bk, group, c, q_offset, kv_len, has_kvlen = _row_tiles(cfg, spec, H)
    stages = cfg.num_stages
    dtype = q.dtype

    def kernel(
        order_ref,
        win_ref,
        sink_ref,
        blocks_ref,
        npart_ref,
        num_ref,
        kvlen_ref,
        q_ref,
        k_ref,
        v_ref,
        out_ref,
        lse_ref,
        qo_smem2,
        k_smem,
        v_smem,
        lse_smem2,
        k_ready,
        v_ready,
        q_ready,
        k_free,
        v_free,
        sched,
    ):
        b, item, h, m, num, npart = _work_item(order_ref, num_ref, npart_ref, nq, has_kvlen)
        kvh = _div(h, group)
        base = item * kmax
        wg = lax.axis_index("wg")

        def schedule_barrier():
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            qo = qo_smem2.at[wg]
            row0 = m * (2 * bq) + wg * bq
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, bq), h], qo, q_ready.at[wg])
            w = win_ref[h]
            s_ = sink_ref[h]
            kv_valid = _kv_valid(kvlen_ref, b, kv_len, has_kvlen)
            plgpu.barrier_wait(q_ready.at[wg])
            acc = _zeros((bq, D))
            m_i = plgpu.layout_cast(
                jnp.full((bq,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1)
            )
            l_i = plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))

            @pl.when(num > 0)
            def _():
                plgpu.barrier_wait(k_ready.at[0])

            pl.when(wg == 1)(schedule_barrier)

            def step(i, carry, masked):
                acc, m_i, l_i = carry
                slot = _rem(i, stages)

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, qo, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                    schedule_barrier()
                    return acc_ref[...]

                with jax.named_scope("qk"):
                    s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                with jax.named_scope("softmax"):
                    if masked:
                        s = _mask_block(
                            s, q_offset + row0, blocks_ref[base + i] * bk, w, s_, kv_valid
                        )
                    m_new = jnp.maximum(m_i, s.max(axis=1) * c)
                    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
                    alpha = jnp.exp2(m_i - m_use)
                    p = jnp.exp2(s * c - _bcast(m_use, s.shape, 0))
                    acc = acc * _bcast(alpha, acc.shape, 0)
                    l_i = l_i * alpha + p.sum(axis=1)
                    p16 = p.astype(dtype)
                    acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
                with jax.named_scope("wait"):
                    plgpu.barrier_arrive(sched)  # softmax done
                    plgpu.barrier_wait(v_ready.at[slot])
                    plgpu.barrier_wait(sched)  # the tensor cores are ours

                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

                    @pl.when(i + 1 < num)
                    def _():
                        plgpu.barrier_wait(k_ready.at[_rem(i + 1, stages)])

                with jax.named_scope("pv"):
                    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l_i

            carry = lax.fori_loop(0, npart, functools.partial(step, masked=True), (acc, m_i, l_i))
            if not has_kvlen:
                carry = lax.fori_loop(npart, num, functools.partial(step, masked=False), carry)
            acc, m_i, l_i = carry
            pl.when(wg == 0)(schedule_barrier)

            ok = l_i > 0.0
            l_safe = jnp.where(ok, l_i, 1.0)
            qo[...] = (acc / _bcast(l_safe, acc.shape, 0)).astype(dtype)
            lse_smem2.at[wg][...] = jnp.where(ok, m_i * _LN2 + jnp.log(l_safe), -jnp.inf)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo, out_ref.at[b, pl.ds(row0, bq), h])
            plgpu.copy_smem_to_gmem(lse_smem2.at[wg], lse_ref.at[b, h, pl.ds(row0, bq)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            _stream_kv(
                k_ref,
                v_ref,
                k_smem,
                v_smem,
                k_ready,
                v_ready,
                k_free,
                v_free,
                blocks_ref,
                base,
                num,
                b,
                kvh,
                bk,
                stages,
            )

    tables = [
        jnp.asarray(t)
        for t in masks.kernel_tables(spec, sch.kv_blocks, sch.kv_num_partial, sch.kv_num)
    ] + [kv_lengths.astype(jnp.int32)]
    out, lse = plgpu.kernel(
        kernel,
        out_type=[
            jax.ShapeDtypeStruct((B, Tp, H, D), dtype),
            jax.ShapeDtypeStruct((B, H, Tp), jnp.float32),
        ],
        scratch_types=[
            _smem((2, bq, D), dtype),
            _smem((stages, bk, D), dtype),
            _smem((stages, bk, D), dtype),
            plgpu.SMEM((2, bq), jnp.float32),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),
            plgpu.Barrier(num_arrivals=2),
        ],
        grid=(H * nq, B),
        grid_names=("item", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=_compiler_params(cfg, kmax),
    )(*tables, q, k, v)
    return out, lse


# -------------------------------------------------------------------------------------- dq
def _dq_call(cfg: MgpuConfig, q, k, v, do, lse2, delta, kv_lengths):
    """dq [B, Tp, H, Dp] (scaled) over the forward-style schedule of cfg.dq."""
    spec = cfg.dq
    B, Tp, H, D = q.shape
    sch, nq, kmax, bq, bk, group, c, q_offset, kv_len, has_kvlen = _row_tiles(cfg, spec, H)
    stages = cfg.num_stages_dq
    dtype = q.dtype

    def kernel(
        order_ref,
        win_ref,
        sink_ref,
        blocks_ref,
        npart_ref,
        num_ref,
        kvlen_ref,
        q_ref,
        k_ref,
        v_ref,
        do_ref,
        lse_ref,
        delta_ref,
        dq_ref,
        q_smem2,
        do_smem2,
        lse_smem2,
        delta_smem2,
        k_smem,
        v_smem,
        row_ready,
        k_ready,
        v_ready,
        k_free,
        v_free,
    ):
        b, item, h, m, num, npart = _work_item(order_ref, num_ref, npart_ref, nq, has_kvlen)
        kvh = _div(h, group)
        base = item * kmax
        wg = lax.axis_index("wg")

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            q_s, do_s = q_smem2.at[wg], do_smem2.at[wg]
            row0 = m * (2 * bq) + wg * bq
            rs = (b, pl.ds(row0, bq), h)
            plgpu.copy_gmem_to_smem(q_ref.at[rs], q_s, row_ready.at[wg])
            plgpu.copy_gmem_to_smem(do_ref.at[rs], do_s, row_ready.at[wg])
            plgpu.copy_gmem_to_smem(
                lse_ref.at[b, h, pl.ds(row0, bq)], lse_smem2.at[wg], row_ready.at[wg]
            )
            plgpu.copy_gmem_to_smem(
                delta_ref.at[b, h, pl.ds(row0, bq)], delta_smem2.at[wg], row_ready.at[wg]
            )
            w = win_ref[h]
            s_ = sink_ref[h]
            kv_valid = _kv_valid(kvlen_ref, b, kv_len, has_kvlen)
            plgpu.barrier_wait(row_ready.at[wg])
            lse = _row_vec(lse_smem2.at[wg])
            dlt = _row_vec(delta_smem2.at[wg])

            def step(i, dq, masked):
                slot = _rem(i, stages)
                plgpu.barrier_wait(k_ready.at[slot])

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, q_s, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                    return acc_ref[...]

                with jax.named_scope("s"):
                    s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
                with jax.named_scope("p"):
                    if masked:
                        s = _mask_block(
                            s, q_offset + row0, blocks_ref[base + i] * bk, w, s_, kv_valid
                        )
                    p = jnp.exp2(s * c - _bcast(lse, s.shape, 0))
                plgpu.barrier_wait(v_ready.at[slot])

                def dpv(acc_ref):
                    plgpu.wgmma(acc_ref, do_s, plgpu.transpose_ref(v_smem.at[slot], (1, 0)))
                    return acc_ref[...]

                with jax.named_scope("dp"):
                    dp = pl.run_scoped(dpv, plgpu.ACC((bq, bk), jnp.float32))
                plgpu.barrier_arrive(v_free.at[slot])
                with jax.named_scope("ds"):
                    ds = (p * (dp - _bcast(dlt, dp.shape, 0))).astype(dtype)

                def dqk(acc_ref):
                    plgpu.wgmma(acc_ref, ds, k_smem.at[slot])

                with jax.named_scope("dq"):
                    dq = pl.run_state(dqk)(plgpu.ACC.init(dq))
                plgpu.barrier_arrive(k_free.at[slot])
                return dq

            dq = lax.fori_loop(0, npart, functools.partial(step, masked=True), _zeros((bq, D)))
            if not has_kvlen:
                dq = lax.fori_loop(npart, num, functools.partial(step, masked=False), dq)
            q_s[...] = (dq * cfg.scale).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_s, dq_ref.at[rs])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            _stream_kv(
                k_ref,
                v_ref,
                k_smem,
                v_smem,
                k_ready,
                v_ready,
                k_free,
                v_free,
                blocks_ref,
                base,
                num,
                b,
                kvh,
                bk,
                stages,
            )

    tables = [
        jnp.asarray(t)
        for t in masks.kernel_tables(spec, sch.kv_blocks, sch.kv_num_partial, sch.kv_num)
    ] + [kv_lengths.astype(jnp.int32)]
    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((B, Tp, H, D), dtype),
        scratch_types=[
            _smem((2, bq, D), dtype),
            _smem((2, bq, D), dtype),
            plgpu.SMEM((2, bq), jnp.float32),
            plgpu.SMEM((2, bq), jnp.float32),
            _smem((stages, bk, D), dtype),
            _smem((stages, bk, D), dtype),
            plgpu.Barrier(num_arrivals=4, num_barriers=2),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        ],
        grid=(H * nq, B),
        grid_names=("item", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=_compiler_params(cfg, kmax),
    )(*tables, q, k, v, do, lse2, delta)


# ----------------------------------------------------------------------------------- dk/dv
def dkv_tables(spec: masks.MaskSpec, num_kv_heads: int):
    """Per (KV head, key block) the (query head, query block) tiles to stream, masked first.

    Returns (entries [Hkv * nk, Emax] int32 with entry = head * nq + query block,
    num_partial [Hkv * nk], num [Hkv * nk]); rows padded with a repeat of a valid entry.
    """
    sch = masks.schedule(spec)
    H, nk = spec.num_heads, spec.num_k_blocks
    nq = spec.num_q_blocks
    group = H // num_kv_heads
    rows, npart, num = (
        [],
        np.zeros(num_kv_heads * nk, np.int32),
        np.zeros(num_kv_heads * nk, np.int32),
    )
    for kvh in range(num_kv_heads):
        heads = range(kvh * group, (kvh + 1) * group)
        for n in range(nk):
            part, full = [], []
            for h in heads:
                blocks = sch.q_blocks[h, n]
                npp, nn = int(sch.q_num_partial[h, n]), int(sch.q_num[h, n])
                part.extend(h * nq + int(x) for x in blocks[:npp])
                full.extend(h * nq + int(x) for x in blocks[npp:nn])
            item = kvh * nk + n
            rows.append(part + full)
            npart[item], num[item] = len(part), len(part) + len(full)
    emax = max(1, int(num.max()))
    entries = np.zeros((len(rows), emax), np.int32)
    for i, r in enumerate(rows):
        if r:
            entries[i, : len(r)] = r
            entries[i, len(r) :] = r[-1]
    return entries, npart, num


def _dkv_call(cfg: MgpuConfig, q, k, v, do, lse2, delta, kv_lengths):
    """(dk, dv) [B, Sp, Hkv, Dp] (dk scaled), summed over each KV group's query heads."""
    spec = cfg.dkv
    B, Tp, H, D = q.shape
    Sp, Hkv = k.shape[1], k.shape[2]
    entries, npart_t, num_t = dkv_tables(spec, Hkv)
    nq, nk, emax = spec.num_q_blocks, spec.num_k_blocks, entries.shape[1]
    bq, bk = spec.block_q, spec.block_k // 2
    stages = cfg.num_stages_dkv
    c = cfg.scale * _LOG2E
    q_offset, kv_len, has_kvlen = spec.q_offset, spec.kv_len, cfg.has_kv_lengths
    dtype = q.dtype

    def kernel(
        order_ref,
        win_ref,
        sink_ref,
        ent_ref,
        npart_ref,
        num_ref,
        kvlen_ref,
        q_ref,
        k_ref,
        v_ref,
        do_ref,
        lse_ref,
        delta_ref,
        dk_ref,
        dv_ref,
        k_smem2,
        v_smem2,
        q_smem,
        do_smem,
        lse_smem,
        delta_smem,
        kv_ready,
        tile_ready,
        tile_free,
    ):
        b, item, kvh, n, num, npart = _work_item(order_ref, num_ref, npart_ref, nk, has_kvlen)
        base = item * emax
        wg = lax.axis_index("wg")

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            k_s, v_s = k_smem2.at[wg], v_smem2.at[wg]
            col0 = n * (2 * bk) + wg * bk
            ks = (b, pl.ds(col0, bk), kvh)
            plgpu.copy_gmem_to_smem(k_ref.at[ks], k_s, kv_ready.at[wg])
            plgpu.copy_gmem_to_smem(v_ref.at[ks], v_s, kv_ready.at[wg])
            kv_valid = _kv_valid(kvlen_ref, b, kv_len, has_kvlen)
            plgpu.barrier_wait(kv_ready.at[wg])

            def step(i, carry, masked):
                dk, dv = carry
                slot = _rem(i, stages)
                plgpu.barrier_wait(tile_ready.at[slot])

                def kq(acc_ref):
                    plgpu.wgmma(acc_ref, k_s, plgpu.transpose_ref(q_smem.at[slot], (1, 0)))
                    return acc_ref[...]

                with jax.named_scope("s"):
                    st = pl.run_scoped(kq, plgpu.ACC((bk, bq), jnp.float32))  # [keys, queries]
                if masked:
                    e = ent_ref[base + i]
                    h = _div(e, nq)
                    keys = col0 + _iota((bk, bq), 0)
                    qpos = q_offset + _rem(e, nq) * bq + _iota((bk, bq), 1)
                    st = jnp.where(
                        _visible(qpos, keys, win_ref[h], sink_ref[h], kv_valid), st, -jnp.inf
                    )
                lse = _col_vec(lse_smem.at[slot])
                pt = jnp.exp2(st * c - _bcast(lse, st.shape, 1))

                def dv_dpt(refs):
                    dv_ref_, dpt_ref = refs
                    plgpu.wgmma(dv_ref_, pt.astype(dtype), do_smem.at[slot])
                    plgpu.wgmma(dpt_ref, v_s, plgpu.transpose_ref(do_smem.at[slot], (1, 0)))

                with jax.named_scope("dv_dp"):
                    dv, dpt = pl.run_state(dv_dpt)(
                        (plgpu.ACC.init(dv), plgpu.ACC.init(_zeros((bk, bq))))
                    )
                with jax.named_scope("ds"):
                    dlt = _col_vec(delta_smem.at[slot])
                    dst = (pt * (dpt - _bcast(dlt, dpt.shape, 1))).astype(dtype)

                def dkq(acc_ref):
                    plgpu.wgmma(acc_ref, dst, q_smem.at[slot])

                with jax.named_scope("dk"):
                    dk = pl.run_state(dkq)(plgpu.ACC.init(dk))
                plgpu.barrier_arrive(tile_free.at[slot])
                return dk, dv

            carry = (_zeros((bk, D)), _zeros((bk, D)))
            carry = lax.fori_loop(0, npart, functools.partial(step, masked=True), carry)
            if not has_kvlen:
                carry = lax.fori_loop(npart, num, functools.partial(step, masked=False), carry)
            dk, dv = carry
            k_s[...] = (dk * cfg.scale).astype(dtype)
            v_s[...] = dv.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_s, dk_ref.at[ks])
            plgpu.copy_smem_to_gmem(v_s, dv_ref.at[ks])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            @pl.loop(0, num)
            def _(i):
                slot = _rem(i, stages)
                e = ent_ref[base + i]
                h = _div(e, nq)
                r0 = _rem(e, nq) * bq

                @pl.when(i >= stages)
                def _():
                    plgpu.barrier_wait(tile_free.at[slot])

                rs = (b, pl.ds(r0, bq), h)
                plgpu.copy_gmem_to_smem(q_ref.at[rs], q_smem.at[slot], tile_ready.at[slot])
                plgpu.copy_gmem_to_smem(do_ref.at[rs], do_smem.at[slot], tile_ready.at[slot])
                plgpu.copy_gmem_to_smem(
                    lse_ref.at[b, h, pl.ds(r0, bq)], lse_smem.at[slot], tile_ready.at[slot]
                )
                plgpu.copy_gmem_to_smem(
                    delta_ref.at[b, h, pl.ds(r0, bq)], delta_smem.at[slot], tile_ready.at[slot]
                )

    tables = [jnp.asarray(t) for t in masks.kernel_tables(spec, entries, npart_t, num_t)] + [
        kv_lengths.astype(jnp.int32)
    ]
    kv_type = jax.ShapeDtypeStruct((B, Sp, Hkv, D), k.dtype)
    dk, dv = plgpu.kernel(
        kernel,
        out_type=[kv_type, kv_type],
        scratch_types=[
            _smem((2, bk, D), dtype),
            _smem((2, bk, D), dtype),
            _smem((stages, bq, D), dtype),
            _smem((stages, bq, D), dtype),
            plgpu.SMEM((stages, bq), jnp.float32),
            plgpu.SMEM((stages, bq), jnp.float32),
            plgpu.Barrier(num_arrivals=2, num_barriers=2),
            plgpu.Barrier(num_arrivals=4, num_barriers=stages),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        ],
        grid=(Hkv * nk, B),
        grid_names=("item", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=_compiler_params(cfg, emax),
    )(*tables, q, k, v, do, lse2, delta)
    return dk, dv


# ------------------------------------------------------------------------------ custom vjp
def _lse2(lse):
    """The saved lse in base 2 for p = exp2(s * c - lse2); +inf (p = 0) on rows with no key."""
    return jnp.where(jnp.isfinite(lse), lse * _LOG2E, jnp.inf)


def _bwd_call(cfg: MgpuConfig, q, k, v, kv_lengths, out, lse, do, dlse):
    delta = flash_vjp.backward_delta(out, do, lse, dlse)
    lse2 = _lse2(lse)
    dq = _dq_call(cfg, q, k, v, do, lse2, delta, kv_lengths)
    dk, dv = _dkv_call(cfg, q, k, v, do, lse2, delta, kv_lengths)
    return dq, dk, dv


_attention = flash_vjp.flash_attention(_fwd_call, _bwd_call)


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
    block_k: int = 128,
    block_k_dq: int = 128,
    num_stages: int = 2,
    num_stages_dq: int = 2,
    num_stages_dkv: int = 3,
    profile_dir: str = "",
):
    """The static config and the padded operands of one call (the tuning defaults live here:
    the fastest on an H200 at D = 128, docs/benchmarks.md)."""
    if plgpu is None:
        raise RuntimeError("this jax has no Pallas Mosaic GPU backend")
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    if not supported(q.dtype, D):
        raise ValueError(
            f"the Mosaic GPU kernel takes bf16/f16 with head_dim <= 128, got {q.dtype} and {D}"
        )
    for name, x in (("block_k", block_k), ("block_k_dq", block_k_dq)):
        if x not in (64, 128):
            raise ValueError(f"{name} must be 64 or 128, got {x}")
    scale = float(D**-0.5 if scale is None else scale)
    Tp = masks.cdiv(T, _TILE) * _TILE
    Sp = masks.cdiv(S, _TILE) * _TILE
    Dp = _pad_dim(D)
    mk = lambda bq, bk: masks.MaskSpec(windows, sinks, T, S, q_offset, bq, bk)  # noqa: E731
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
    fwd = jax.jit(functools.partial(_fwd_call, cfg))
    out, lse = jax.jit(functools.partial(_fwd_call, dataclasses.replace(cfg, profile_dir="")))(
        qp, kp, vp, kvl
    )
    delta = flash_vjp.backward_delta(out, dop, lse, None)
    lse2 = _lse2(lse)
    dq = jax.jit(functools.partial(_dq_call, cfg))
    dkv = jax.jit(functools.partial(_dkv_call, cfg))
    return {
        "fwd": lambda: fwd(qp, kp, vp, kvl),
        "dq": lambda: dq(qp, kp, vp, dop, lse2, delta, kvl),
        "dkv": lambda: dkv(qp, kp, vp, dop, lse2, delta, kvl),
    }
