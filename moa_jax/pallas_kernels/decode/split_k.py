"""Split-K flash decoding shared by the GPU decode kernels (`span_triton.py`, the MoA span
cache; `head_major_triton.py`, the full and gathered caches): one program walks key blocks
[lo, hi) of its split with an online softmax in base 2 and writes unnormalised partials (acc,
max, sum), which the wrapper merges across splits. Equal-length segments split evenly
(`heuristics.default_splits`); the MoA span cache's segments of different lengths follow the
static work list of its schedule (`MoASchedule.work_list`, `caches/schedule.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

LOG2E = math.log2(math.e)


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
