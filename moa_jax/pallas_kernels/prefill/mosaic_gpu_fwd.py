"""The forward kernel of the Mosaic GPU prefill attention: one CTA per (query head, 128 query
rows), two compute warpgroups of 64 rows ping-ponging on the tensor cores, a memory warpgroup
streaming the scheduled K/V blocks (see mosaic_gpu.py)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from moa_jax.pallas_kernels.prefill.mosaic_gpu_common import (
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

_LN2 = math.log(2.0)


def fwd_call(cfg: MgpuConfig, q, k, v, kv_lengths):
    """q [B, Tp, H, Dp], k/v [B, Sp, Hkv, Dp] -> (out [B, Tp, H, Dp], lse [B, H, Tp] natural)."""
    spec = cfg.fwd
    B, Tp, H, D = q.shape
    sch, nq, kmax, bq, bk, group, c, q_offset, kv_len, has_kvlen = row_tiles(cfg, spec, H)
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
        b, item, h, m, num, npart = work_item(order_ref, num_ref, npart_ref, nq, has_kvlen)
        kvh = div(h, group)
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
            kv_valid = valid_kv_len(kvlen_ref, b, kv_len, has_kvlen)
            plgpu.barrier_wait(q_ready.at[wg])
            acc = acc_zeros((bq, D))
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
                slot = rem(i, stages)

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, qo, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                    schedule_barrier()
                    return acc_ref[...]

                with jax.named_scope("qk"):
                    s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                with jax.named_scope("softmax"):
                    if masked:
                        s = mask_block(
                            s, q_offset + row0, blocks_ref[base + i] * bk, w, s_, kv_valid
                        )
                    m_new = jnp.maximum(m_i, s.max(axis=1) * c)
                    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
                    alpha = jnp.exp2(m_i - m_use)
                    p = jnp.exp2(s * c - bcast(m_use, s.shape, 0))
                    acc = acc * bcast(alpha, acc.shape, 0)
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
                        plgpu.barrier_wait(k_ready.at[rem(i + 1, stages)])

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
            qo[...] = (acc / bcast(l_safe, acc.shape, 0)).astype(dtype)
            lse_smem2.at[wg][...] = jnp.where(ok, m_i * _LN2 + jnp.log(l_safe), -jnp.inf)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo, out_ref.at[b, pl.ds(row0, bq), h])
            plgpu.copy_smem_to_gmem(lse_smem2.at[wg], lse_ref.at[b, h, pl.ds(row0, bq)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            stream_kv(
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

    tables = table_operands(spec, sch.kv_blocks, sch.kv_num_partial, sch.kv_num, kv_lengths)
    out, lse = plgpu.kernel(
        kernel,
        out_type=[
            jax.ShapeDtypeStruct((B, Tp, H, D), dtype),
            jax.ShapeDtypeStruct((B, H, Tp), jnp.float32),
        ],
        scratch_types=[
            smem((2, bq, D), dtype),
            smem((stages, bk, D), dtype),
            smem((stages, bk, D), dtype),
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
        compiler_params=compiler_params(cfg, kmax),
    )(*tables, q, k, v)
    return out, lse
