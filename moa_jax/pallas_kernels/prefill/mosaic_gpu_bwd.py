"""The backward kernels of the Mosaic GPU prefill attention (see mosaic_gpu.py): dq over the
forward block tables, and dk/dv with one CTA per (KV head, 128 keys) over the (query head, query
block) tiles of `dkv_tables`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from moa_jax.pallas_kernels.prefill.block_tables import MaskSpec, block_tables
from moa_jax.pallas_kernels.prefill.flash_vjp import BackwardRefs
from moa_jax.pallas_kernels.prefill.mosaic_gpu_common import (
    LOG2E,
    MgpuConfig,
    acc_zeros,
    bcast,
    compiler_params,
    div,
    mask_block,
    plgpu,
    rem,
    row_tiles,
    smem,
    stream_kv,
    table_operands,
    valid_kv_len,
    work_item,
)


def _row_vec(ref):
    """[n] f32 shared-memory vector in the layout of a wgmma row reduction."""
    return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(1))


def _col_vec(ref):
    return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(0))


def dq_call(cfg: MgpuConfig, q, k, v, do, lse2, delta, kv_lengths):
    """dq [B, Tp, H, Dp] (scaled) over the forward-style block tables of cfg.dq."""
    spec = cfg.dq
    B, Tp, H, D = q.shape
    sch, nq, kmax, bq, bk, group, c, q_offset, kv_len, has_kvlen = row_tiles(cfg, spec, H)
    stages = cfg.num_stages_dq
    dtype = q.dtype

    def kernel(
        *refs,
    ):
        r, own = BackwardRefs.split(refs)
        dq_ref = own[0]
        q_smem2, do_smem2, lse_smem2, delta_smem2, k_smem, v_smem = own[1:7]
        row_ready, k_ready, v_ready, k_free, v_free = own[7:]
        b, item, h, m, num, npart = work_item(r.order, r.num, r.npart, nq, has_kvlen)
        kvh = div(h, group)
        base = item * kmax
        wg = lax.axis_index("wg")

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            q_s, do_s = q_smem2.at[wg], do_smem2.at[wg]
            row0 = m * (2 * bq) + wg * bq
            rs = (b, pl.ds(row0, bq), h)
            plgpu.copy_gmem_to_smem(r.q.at[rs], q_s, row_ready.at[wg])
            plgpu.copy_gmem_to_smem(r.do.at[rs], do_s, row_ready.at[wg])
            plgpu.copy_gmem_to_smem(
                r.lse.at[b, h, pl.ds(row0, bq)], lse_smem2.at[wg], row_ready.at[wg]
            )
            plgpu.copy_gmem_to_smem(
                r.delta.at[b, h, pl.ds(row0, bq)], delta_smem2.at[wg], row_ready.at[wg]
            )
            w = r.win[h]
            s_ = r.sink[h]
            kv_valid = valid_kv_len(r.kvlen, b, kv_len, has_kvlen)
            plgpu.barrier_wait(row_ready.at[wg])
            lse = _row_vec(lse_smem2.at[wg])
            dlt = _row_vec(delta_smem2.at[wg])

            def step(i, dq, masked):
                slot = rem(i, stages)
                plgpu.barrier_wait(k_ready.at[slot])

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, q_s, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                    return acc_ref[...]

                with jax.named_scope("s"):
                    s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
                with jax.named_scope("p"):
                    if masked:
                        s = mask_block(s, q_offset + row0, r.blocks[base + i] * bk, w, s_, kv_valid)
                    p = jnp.exp2(s * c - bcast(lse, s.shape, 0))
                plgpu.barrier_wait(v_ready.at[slot])

                def dpv(acc_ref):
                    plgpu.wgmma(acc_ref, do_s, plgpu.transpose_ref(v_smem.at[slot], (1, 0)))
                    return acc_ref[...]

                with jax.named_scope("dp"):
                    dp = pl.run_scoped(dpv, plgpu.ACC((bq, bk), jnp.float32))
                plgpu.barrier_arrive(v_free.at[slot])
                with jax.named_scope("ds"):
                    ds = (p * (dp - bcast(dlt, dp.shape, 0))).astype(dtype)

                def dqk(acc_ref):
                    plgpu.wgmma(acc_ref, ds, k_smem.at[slot])

                with jax.named_scope("dq"):
                    dq = pl.run_state(dqk)(plgpu.ACC.init(dq))
                plgpu.barrier_arrive(k_free.at[slot])
                return dq

            dq = lax.fori_loop(0, npart, functools.partial(step, masked=True), acc_zeros((bq, D)))
            if not has_kvlen:
                dq = lax.fori_loop(npart, num, functools.partial(step, masked=False), dq)
            q_s[...] = (dq * cfg.scale).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_s, dq_ref.at[rs])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            stream_kv(
                r.k,
                r.v,
                k_smem,
                v_smem,
                k_ready,
                v_ready,
                k_free,
                v_free,
                r.blocks,
                base,
                num,
                b,
                kvh,
                bk,
                stages,
            )

    tables = table_operands(spec, sch.kv_blocks, sch.kv_num_partial, sch.kv_num, kv_lengths)
    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((B, Tp, H, D), dtype),
        scratch_types=[
            smem((2, bq, D), dtype),
            smem((2, bq, D), dtype),
            plgpu.SMEM((2, bq), jnp.float32),
            plgpu.SMEM((2, bq), jnp.float32),
            smem((stages, bk, D), dtype),
            smem((stages, bk, D), dtype),
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
        compiler_params=compiler_params(cfg, kmax),
    )(*tables, q, k, v, do, lse2, delta)


def dkv_tables(spec: MaskSpec, num_kv_heads: int):
    """Per (KV head, key block) the (query head, query block) tiles to stream, masked first.

    Returns (entries [Hkv * nk, Emax] int32 with entry = head * nq + query block,
    num_partial [Hkv * nk], num [Hkv * nk]); rows padded with a repeat of a valid entry.
    """
    sch = block_tables(spec)
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


def dkv_call(cfg: MgpuConfig, q, k, v, do, lse2, delta, kv_lengths):
    """(dk, dv) [B, Sp, Hkv, Dp] (dk scaled), summed over each KV group's query heads."""
    spec = cfg.dkv
    B, Tp, H, D = q.shape
    Sp, Hkv = k.shape[1], k.shape[2]
    entries, npart_t, num_t = dkv_tables(spec, Hkv)
    nq, nk, emax = spec.num_q_blocks, spec.num_k_blocks, entries.shape[1]
    bq, bk = spec.block_q, spec.block_k // 2
    stages = cfg.num_stages_dkv
    c = cfg.scale * LOG2E
    q_offset, kv_len, has_kvlen = spec.q_offset, spec.kv_len, cfg.has_kv_lengths
    dtype = q.dtype

    def kernel(
        *refs,
    ):
        r, own = BackwardRefs.split(refs)
        dk_ref, dv_ref = own[:2]
        k_smem2, v_smem2, q_smem, do_smem, lse_smem, delta_smem = own[2:8]
        kv_ready, tile_ready, tile_free = own[8:]
        b, item, kvh, n, num, npart = work_item(r.order, r.num, r.npart, nk, has_kvlen)
        base = item * emax
        wg = lax.axis_index("wg")

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            k_s, v_s = k_smem2.at[wg], v_smem2.at[wg]
            col0 = n * (2 * bk) + wg * bk
            ks = (b, pl.ds(col0, bk), kvh)
            plgpu.copy_gmem_to_smem(r.k.at[ks], k_s, kv_ready.at[wg])
            plgpu.copy_gmem_to_smem(r.v.at[ks], v_s, kv_ready.at[wg])
            kv_valid = valid_kv_len(r.kvlen, b, kv_len, has_kvlen)
            plgpu.barrier_wait(kv_ready.at[wg])

            def step(i, carry, masked):
                dk, dv = carry
                slot = rem(i, stages)
                plgpu.barrier_wait(tile_ready.at[slot])

                def kq(acc_ref):
                    plgpu.wgmma(acc_ref, k_s, plgpu.transpose_ref(q_smem.at[slot], (1, 0)))
                    return acc_ref[...]

                with jax.named_scope("s"):
                    st = pl.run_scoped(kq, plgpu.ACC((bk, bq), jnp.float32))  # [keys, queries]
                if masked:
                    e = r.blocks[base + i]
                    h = div(e, nq)
                    row0 = q_offset + rem(e, nq) * bq
                    st = mask_block(st, row0, col0, r.win[h], r.sink[h], kv_valid, keys_first=True)
                lse = _col_vec(lse_smem.at[slot])
                pt = jnp.exp2(st * c - bcast(lse, st.shape, 1))

                def dv_dpt(refs):
                    dv_ref_, dpt_ref = refs
                    plgpu.wgmma(dv_ref_, pt.astype(dtype), do_smem.at[slot])
                    plgpu.wgmma(dpt_ref, v_s, plgpu.transpose_ref(do_smem.at[slot], (1, 0)))

                with jax.named_scope("dv_dp"):
                    dv, dpt = pl.run_state(dv_dpt)(
                        (plgpu.ACC.init(dv), plgpu.ACC.init(acc_zeros((bk, bq))))
                    )
                with jax.named_scope("ds"):
                    dlt = _col_vec(delta_smem.at[slot])
                    dst = (pt * (dpt - bcast(dlt, dpt.shape, 1))).astype(dtype)

                def dkq(acc_ref):
                    plgpu.wgmma(acc_ref, dst, q_smem.at[slot])

                with jax.named_scope("dk"):
                    dk = pl.run_state(dkq)(plgpu.ACC.init(dk))
                plgpu.barrier_arrive(tile_free.at[slot])
                return dk, dv

            carry = (acc_zeros((bk, D)), acc_zeros((bk, D)))
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
                slot = rem(i, stages)
                e = r.blocks[base + i]
                h = div(e, nq)
                r0 = rem(e, nq) * bq

                @pl.when(i >= stages)
                def _():
                    plgpu.barrier_wait(tile_free.at[slot])

                rs = (b, pl.ds(r0, bq), h)
                plgpu.copy_gmem_to_smem(r.q.at[rs], q_smem.at[slot], tile_ready.at[slot])
                plgpu.copy_gmem_to_smem(r.do.at[rs], do_smem.at[slot], tile_ready.at[slot])
                plgpu.copy_gmem_to_smem(
                    r.lse.at[b, h, pl.ds(r0, bq)], lse_smem.at[slot], tile_ready.at[slot]
                )
                plgpu.copy_gmem_to_smem(
                    r.delta.at[b, h, pl.ds(r0, bq)], delta_smem.at[slot], tile_ready.at[slot]
                )

    tables = table_operands(spec, entries, npart_t, num_t, kv_lengths)
    kv_type = jax.ShapeDtypeStruct((B, Sp, Hkv, D), k.dtype)
    dk, dv = plgpu.kernel(
        kernel,
        out_type=[kv_type, kv_type],
        scratch_types=[
            smem((2, bk, D), dtype),
            smem((2, bk, D), dtype),
            smem((stages, bq, D), dtype),
            smem((stages, bq, D), dtype),
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
        compiler_params=compiler_params(cfg, emax),
    )(*tables, q, k, v, do, lse2, delta)
    return dk, dv
