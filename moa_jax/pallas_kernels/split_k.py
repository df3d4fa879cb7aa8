"""Split-K flash decoding shared by the GPU decode kernels (`moa_decode_gpu.py`, the MoA span
cache; `recycled_decode_gpu.py`, the full and gathered caches): one program walks key blocks
[lo, hi) of its split with an online softmax in base 2 and writes unnormalised partials (acc,
max, sum), which the wrapper merges across splits. Equal-length segments split evenly
(`default_splits`); segments of different lengths become a static work list (`split_segments`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

LOG2E = math.log2(math.e)


def default_splits(batch: int, num_kv_heads: int, max_blocks: int) -> int:
    """Splits per (row, KV head) of equal-length segments: enough programs to fill a GPU's ~132
    SMs twice, each split keeping at least 4 blocks of work."""
    want = -(-264 // (batch * num_kv_heads))
    return int(max(1, min(want, max_blocks // 4 or 1)))


@dataclasses.dataclass(frozen=True)
class SegmentSplits:
    """A static split-K work list over segments of different lengths (numpy, made outside jit).

    Item i walks blocks [start[i], start[i] + count[i]) (absolute block indices) of segment
    segment[i]; items are ordered by segment. `table` [S, C] lists each segment's items,
    padded with the out-of-range id I (the merge gathers them with a fill value)."""

    segment: np.ndarray
    start: np.ndarray
    count: np.ndarray
    table: np.ndarray

    @property
    def num_items(self) -> int:
        return len(self.segment)


def split_segments(
    blocks: Sequence[int],
    batch: int,
    per_split: int | None = None,
    offsets: Sequence[int] | None = None,
    programs: int = 264,
    min_blocks: int = 4,
) -> SegmentSplits:
    """Cuts segments of `blocks[s]` blocks, segment s starting at block `offsets[s]` (default:
    laid out one after another), into work items of about `per_split` blocks, so every program
    of a launch does about the same work however uneven the segments are (a MoA span cache:
    dense heads' segments beside short windows).

    Default `per_split`: the work of a row batch spread over `programs` programs (a GPU's
    ~132 SMs twice), but no more than the shortest segment (so a long segment becomes several
    items of the short ones' length) and no less than `min_blocks`. A segment of n blocks
    becomes round(n / per_split) (at least 1) items of near-equal length.
    """
    blocks = [int(x) for x in blocks]
    if min(blocks) < 1:
        raise ValueError(f"every segment needs at least one block, got {blocks}")
    if per_split is None:
        per_split = -(-batch * sum(blocks) // programs)
        per_split = max(min_blocks, min(per_split, min(blocks)))
    per_split = max(1, int(per_split))
    if offsets is None:
        offsets = np.cumsum([0] + blocks[:-1])
    segment, start, count, rows = [], [], [], []
    for s, n in enumerate(blocks):
        k = min(n, max(1, int(n / per_split + 0.5)))
        base, extra = divmod(n, k)
        rows.append(list(range(len(segment), len(segment) + k)))
        at = int(offsets[s])
        for j in range(k):
            c = base + (j < extra)
            segment.append(s)
            start.append(at)
            count.append(c)
            at += c
    width = max(len(r) for r in rows)
    table = np.full((len(blocks), width), len(segment), np.int32)
    for s, r in enumerate(rows):
        table[s, : len(r)] = r
    as32 = functools.partial(np.asarray, dtype=np.int32)
    return SegmentSplits(as32(segment), as32(start), as32(count), table)


def flash_blocks(
    q: jax.Array,
    lo: jax.Array,
    hi: jax.Array,
    scale: float,
    load: Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array]],
    on_scores: Callable[[jax.Array, jax.Array], None] | None = None,
):
    """Online softmax of q [Gp, D] over key blocks lo..hi-1.

    load(i) -> (k [bk, D], v [bk, D], visible bool [Gp or 1, bk]) for block i; on_scores(i,
    scores) sees each block's masked base-2 logits (-inf where invisible). Returns
    (acc f32 [Gp, D], running max [Gp], running sum [Gp]).
    """
    prec = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    c = scale * LOG2E

    def body(i, carry):
        acc, m_prev, l_prev = carry
        k, v, visible = load(i)
        sc = (
            lax.dot_general(
                q, k, (((1,), (1,)), ((), ())), precision=prec, preferred_element_type=jnp.float32
            )
            * c
        )
        sc = jnp.where(visible, sc, -jnp.inf)
        if on_scores is not None:
            on_scores(i, sc)
        m_new = jnp.maximum(m_prev, jnp.max(sc, axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m_prev - m_use)
        pr = jnp.exp2(sc - m_use[:, None])
        acc = acc * alpha[:, None] + lax.dot_general(
            pr.astype(v.dtype),
            v,
            (((1,), (0,)), ((), ())),
            precision=prec,
            preferred_element_type=jnp.float32,
        )
        return acc, m_new, alpha * l_prev + jnp.sum(pr, axis=1)

    gp, d = q.shape
    return lax.fori_loop(
        lo,
        hi,
        body,
        (
            jnp.zeros((gp, d), jnp.float32),
            jnp.full((gp,), -jnp.inf, jnp.float32),
            jnp.zeros((gp,), jnp.float32),
        ),
    )
