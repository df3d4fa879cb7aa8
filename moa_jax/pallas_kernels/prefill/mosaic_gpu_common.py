"""What the Mosaic GPU prefill kernels (mosaic_gpu_fwd.py, mosaic_gpu_bwd.py) share: the
static config, shared-memory and register layouts, the element mask, the reads of the block
tables and the memory warpgroup that streams scheduled K/V blocks."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from moa_jax.pallas_kernels.prefill.block_tables import MaskSpec, block_tables, kernel_tables
from moa_jax.pallas_kernels.reference import visible

try:
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover - jax without Mosaic GPU
    plgpu = None

LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class MgpuConfig:
    """Static configuration of one call (hashable)."""

    fwd: MaskSpec  # block_q = 128 (two warpgroups), block_k = forward key block
    dq: MaskSpec  # block_q = 128, block_k = dq key block
    dkv: MaskSpec  # block_q = 64 (streamed query tile), block_k = 128 (two warpgroups)
    num_kv_heads: int
    scale: float
    has_kv_lengths: bool
    num_stages: int = 2  # forward K/V ring depth
    num_stages_dq: int = 2  # dq K/V ring depth
    num_stages_dkv: int = 3  # dk/dv (q, dO, lse, delta) ring depth
    profile_dir: str = ""  # when set: Mosaic GPU's in-kernel trace, one JSON per call


def compiler_params(cfg: MgpuConfig, steps: int):
    """approx exp2; with cfg.profile_dir, the profiler records every named scope of every
    warpgroup (room for `steps` loop iterations of up to 8 scopes each; the trace buffer takes
    shared memory, so profile short sequences)."""
    if not cfg.profile_dir:
        return plgpu.CompilerParams(approx_math=True)
    return plgpu.CompilerParams(
        approx_math=True, profile_space=8 * steps + 16, profile_dir=cfg.profile_dir
    )


def smem(shape, dtype):
    """Shared memory tile laid out for wgmma / TMA (8x64 tiles, 128-byte swizzle)."""
    return plgpu.SMEM(
        shape, dtype, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    )


def _iota(shape, dim):
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def mask_block(s, row0, col0, w, sink, kv_valid, *, keys_first: bool = False):
    """Logits s [queries, keys] of query positions row0.. and key positions col0..: -inf where
    the key is not visible. keys_first: s is [keys, queries] (the dk/dv kernel's S^T)."""
    q_dim, k_dim = (1, 0) if keys_first else (0, 1)
    rows = row0 + _iota(s.shape, q_dim)
    cols = col0 + _iota(s.shape, k_dim)
    return jnp.where(visible(rows, cols, w, sink) & (cols < kv_valid), s, -jnp.inf)


def div(x, d: int):
    return lax.div(x, jnp.asarray(d, x.dtype))


def rem(x, d: int):
    return lax.rem(x, jnp.asarray(d, x.dtype))


def work_item(order_ref, num_ref, npart_ref, inner: int, has_kvlen: bool):
    """This CTA's (batch row, item, item // inner, item % inner, blocks to visit, of which
    masked); with ragged kv lengths every block is masked."""
    b = lax.axis_index("batch")
    item = order_ref[lax.axis_index("item")]
    num = num_ref[item]
    npart = num if has_kvlen else npart_ref[item]
    return b, item, div(item, inner), rem(item, inner), num, npart


def valid_kv_len(kvlen_ref, b, kv_len: int, has_kvlen: bool):
    """Keys that exist in batch row b: min(kv_lengths[b], S) when ragged, else S."""
    return jnp.minimum(kvlen_ref[b], kv_len) if has_kvlen else kv_len


def bcast(x, shape, dim):
    """A row (dim 0) or column (dim 1) vector broadcast to a 2-D tile."""
    return lax.broadcast_in_dim(x, shape, [dim])


def acc_zeros(shape):
    """f32 zeros in the wgmma accumulator layout."""
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def table_operands(spec: MaskSpec, blocks, num_partial, num, kv_lengths) -> list:
    """The scalar tables every kernel here takes first: `kernel_tables` (work order,
    windows, sinks, blocks, num_partial, num) and kv_lengths int32 [B]."""
    return [jnp.asarray(t) for t in kernel_tables(spec, blocks, num_partial, num)] + [
        kv_lengths.astype(jnp.int32)
    ]


def stream_kv(
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
        slot = rem(i, stages)
        sl = (b, pl.ds(blocks_ref[base + i] * bk, bk), kvh)

        @pl.when(i >= stages)
        def _():
            plgpu.barrier_wait(k_free.at[slot])

        plgpu.copy_gmem_to_smem(k_ref.at[sl], k_smem.at[slot], k_ready.at[slot])

        @pl.when(i >= stages)
        def _():
            plgpu.barrier_wait(v_free.at[slot])

        plgpu.copy_gmem_to_smem(v_ref.at[sl], v_smem.at[slot], v_ready.at[slot])


def row_tiles(cfg: MgpuConfig, spec: MaskSpec, num_heads: int):
    """Statics of a kernel whose CTAs own 2 x 64 query rows and stream scheduled key blocks:
    (block tables, query tiles, most blocks per tile, rows per warpgroup, key block, GQA group,
    log2-scaled logit scale, query offset, key length, ragged kv lengths?)."""
    sch = block_tables(spec)
    return (
        sch,
        spec.num_q_blocks,
        sch.max_kv_blocks,
        spec.block_q // 2,
        spec.block_k,
        num_heads // cfg.num_kv_heads,
        cfg.scale * LOG2E,
        spec.q_offset,
        spec.kv_len,
        cfg.has_kv_lengths,
    )
