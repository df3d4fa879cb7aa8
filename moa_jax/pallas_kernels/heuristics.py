"""Every launch heuristic of the kernels, each with its reason: block sizes, split-K splits,
warps and pipeline stages, program counts, padded query rows and cache padding.

The kernels and the dispatcher (`dispatch.py`) read their defaults here; a caller's explicit
option always wins. Numbers tuned on a GPU say on which (docs/benchmarks.md has the runs).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# ------------------------------------------------------------------------------ GPU occupancy
# An H100 / H200 has 132 SMs. Two programs per SM hide one program's memory stalls behind the
# other's work, so decode launches aim at 2 * 132 programs.
GPU_PROGRAMS = 264


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


# ------------------------------------------------------------------------------ prefill
def _clamped(requested: int | None, default: int, length: int) -> int:
    """A power-of-two block no larger than the sequence needs (a block past the sequence is
    padding work) and no smaller than 16 (the smallest tensor-core tile)."""
    b = default if requested is None else int(requested)
    return max(16, min(b, next_pow2(length)))


def triton_prefill_blocks(
    dtype, q_len: int, kv_len: int, block_q: int | None, block_k: int | None
) -> tuple[int, int]:
    """(block_q, block_k) of the Triton prefill: 128 x 64 tiles for 2-byte inputs, halved for
    f32, whose tiles take twice the shared memory."""
    wide = jnp.dtype(dtype).itemsize >= 4
    return (
        _clamped(block_q, 64 if wide else 128, q_len),
        _clamped(block_k, 32 if wide else 64, kv_len),
    )


def triton_prefill_warps(head_dim: int) -> int:
    """Warps of the Triton prefill kernels: 4 up to D = 64, 8 beyond (the [block, D] tiles and
    their accumulators grow with D; more warps keep each thread's registers in bounds)."""
    return 4 if head_dim <= 64 else 8


def triton_head_dim(head_dim: int) -> int:
    """Head dim the Triton prefill pads to: a power of two (Triton block shapes) of at least 16
    (the smallest tensor-core K)."""
    return max(16, 1 << (head_dim - 1).bit_length())


# The Triton dk/dv kernel streams query and dO tiles past resident K/V: small query tiles keep
# the streamed working set in shared memory.
TRITON_DKV_BLOCK_Q = 64
# Triton pipeline depth of the prefill kernels (a K/V prefetch one block ahead).
TRITON_PREFILL_STAGES = 2


def tpu_prefill_blocks(
    q_len: int, kv_len: int, block_q: int | None, block_k: int | None
) -> tuple[int, int]:
    """(block_q, block_k) of splash attention: it computes on whole 128-lane key blocks (and its
    backward on 128-row query blocks), so short sequences are padded up to one block, never
    given a smaller one."""
    return (
        max(128, _clamped(block_q, 128, q_len)),
        max(128, _clamped(block_k, 128, kv_len)),
    )


# Mosaic GPU prefill: query tiles are fixed (one 64-row wgmma M tile per compute warpgroup, two
# warpgroups per CTA), so only the key blocks and ring depths are options. The defaults are the
# fastest on an H200 at D = 128.
MGPU_BLOCK_K = (64, 128)  # key blocks the kernels take (TMA box and wgmma N tile)
MGPU_DEFAULTS = dict(
    block_k=128, block_k_dq=128, num_stages=2, num_stages_dq=2, num_stages_dkv=3
)  # dk/dv keeps K and V resident and streams small query tiles: one stage deeper
MGPU_MAX_HEAD_DIM = 128  # dk/dv's shared memory: K, V and a 3-deep ring of query tiles


# ------------------------------------------------------------------------------ decode
def padded_group_gpu(group: int) -> int:
    """Query rows per KV group in the GPU decode kernels: the group's query heads are the rows
    of one matmul, padded to a power of two and to 16, the tensor cores' smallest M."""
    return max(16, 1 << (group - 1).bit_length())


def padded_group_tpu(group: int) -> int:
    """Query rows per KV group in the TPU decode kernels: a multiple of 8 sublanes."""
    return max(8, -(-group // 8) * 8)


# Triton decode kernels: 4 warps for one [16, D] x [D, bk] tile per step; two stages prefetch
# the next K/V block while the current one is multiplied.
DECODE_NUM_WARPS = 4
DECODE_NUM_STAGES = 2

# Largest key block of the head-major decode kernels: 64 slots on GPU (a [16, 64] score tile in
# registers), 512 on TPU (fewer, longer grid steps amortise the per-step overhead).
HEAD_MAJOR_BLOCK_CAP = {"gpu": 64, "tpu": 512}


def head_major_block(n: int, requested: int | None, platform: str) -> int:
    """Key block of the head-major decode kernels over N slots: must divide N; by default the
    largest divisor up to the platform's cap. Fewer than 8 slots per block wastes the tile."""
    if requested is not None:
        if n % requested:
            raise ValueError(f"block_k {requested} does not divide the {n} slots")
        return int(requested)
    bk = math.gcd(n, HEAD_MAJOR_BLOCK_CAP[platform])
    if bk < 8:
        raise ValueError(f"{n} slots: pad the buffer to a multiple of 16 (got block {bk})")
    return bk


def default_splits(batch: int, num_kv_heads: int, max_blocks: int) -> int:
    """Split-K splits per (row, KV head) of equal-length segments: enough programs to fill the
    GPU (`GPU_PROGRAMS`), each split keeping at least 4 blocks of work (fewer and the merge
    costs more than the split saves)."""
    want = -(-GPU_PROGRAMS // (batch * num_kv_heads))
    return int(max(1, min(want, max_blocks // 4 or 1)))


# Span-cache work lists (`split_segments`): at least this many blocks per item, for the same
# reason as `default_splits`.
SPAN_MIN_BLOCKS = 4


# ------------------------------------------------------------------------------ caches
def cache_block() -> int:
    """Padding granularity of the head-major caches (and the bound of their kernel block):
    128 lanes on TPU, 64 slots elsewhere (the GPU decode block cap)."""
    return 128 if jax.default_backend() == "tpu" else 64
