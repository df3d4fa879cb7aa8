"""Pure-jnp masked attention: the oracle every kernel and backend is tested against.

Layouts follow `jax.nn.dot_product_attention`: q [B, T, H, D], k/v [B, S, Hkv, D] with H a multiple
of Hkv (GQA: query head h reads KV head h // (H // Hkv)). Positions are absolute token indices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from moa_jax.pallas_kernels.caches.span import SpanKVCache
from moa_jax.pallas_kernels.checks import PREFILL_LAYOUT, check_qkv

_NEG_INF = -1e30
_EXACT = jax.lax.Precision.HIGHEST  # true f32 products (GPUs default to TF32)


def causal_mask(
    q_positions: jax.Array, k_positions: jax.Array, k_valid: jax.Array | None = None
) -> jax.Array:
    """Boolean mask [B, 1, T, S]: key j visible to query i iff k_pos[j] <= q_pos[i] (and k_valid).

    Args:
      q_positions: int [B, T].
      k_positions: int [B, S] or [S].
      k_valid: optional bool [B, S], False for empty cache slots or padding.
    """
    if k_positions.ndim == 1:
        k_positions = jnp.broadcast_to(k_positions, (q_positions.shape[0], k_positions.shape[0]))
    mask = k_positions[:, None, None, :] <= q_positions[:, None, :, None]
    if k_valid is not None:
        mask = mask & k_valid[:, None, None, :]
    return mask


def visible(q_pos, k_pos, window, sink):
    """The mask predicate, elementwise on broadcastable arrays: key position k_pos is visible
    from query position q_pos iff k_pos <= q_pos and (q_pos - k_pos < window or k_pos < sink).
    Used as is by the oracle and inside the kernels."""
    return (k_pos <= q_pos) & ((q_pos - k_pos < window) | (k_pos < sink))


def window_sink_mask(
    q_positions: jax.Array,
    k_positions: jax.Array,
    windows: jax.Array,
    sink: int | jax.Array = 0,
    k_valid: jax.Array | None = None,
) -> jax.Array:
    """Per-head causal sliding window plus sinks, [B, H, T, S].

    Query head h at position i sees key position j iff j <= i and (i - j < windows[h] or j < sink).

    Args:
      windows: int [H], window length in tokens (>= 1; >= the sequence length means dense).
      sink: number of initial tokens every query may attend to (scalar or int [H]).
    """
    if k_positions.ndim == 1:
        k_positions = jnp.broadcast_to(k_positions, (q_positions.shape[0], k_positions.shape[0]))
    qp = q_positions[:, None, :, None]
    kp = k_positions[:, None, None, :]
    w = jnp.asarray(windows)[None, :, None, None]
    s = jnp.broadcast_to(jnp.asarray(sink), jnp.asarray(windows).shape)[None, :, None, None]
    mask = visible(qp, kp, w, s)
    if k_valid is not None:
        mask = mask & k_valid[:, None, None, :]
    return mask


def mha_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Masked softmax attention computed in float32.

    Args:
      q: [B, T, H, D]; k, v: [B, S, Hkv, D].
      mask: bool broadcastable to [B, H, T, S].
      scale: logit scale, default 1/sqrt(D).
      return_lse: also return the log-sum-exp of the masked logits, [B, H, T] (-inf for rows that
        see no key; their output is 0).
    Returns:
      out [B, T, H, D] in q's dtype (and lse).
    """
    b, t, h, d, _, s, hkv, _ = check_qkv("mha_reference", q, k, v, PREFILL_LAYOUT, nonempty=False)
    g = h // hkv
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, t, hkv, g, d).astype(jnp.float32)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32), precision=_EXACT) * scale
    mask = jnp.broadcast_to(mask, (b, h, t, s)).reshape(b, hkv, g, t, s)
    logits = jnp.where(mask, logits, _NEG_INF)
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(logits - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    safe = jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bkgts,bskd->btkgd", p / safe, v.astype(jnp.float32), precision=_EXACT)
    out = out.reshape(b, t, h, d).astype(q.dtype)
    if not return_lse:
        return out
    lse = jnp.where(denom[..., 0] > 0, m[..., 0] + jnp.log(safe[..., 0]), -jnp.inf)
    return out, lse.reshape(b, h, t)


def window_sink_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    windows,
    sinks,
    *,
    q_offset: int = 0,
    kv_lengths: jax.Array | None = None,
    scale: float | None = None,
    return_lse: bool = False,
):
    """The oracle of `sparse_attention`: `mha_reference` under `window_sink_mask`.

    q [B, T, H, D] at positions [q_offset, q_offset + T); k, v [B, S, Hkv, D] at [0, S);
    windows, sinks int [H]; kv_lengths optional int [B] (keys j >= kv_lengths[b] are padding).
    """
    b, t = q.shape[:2]
    s = k.shape[1]
    qpos = q_offset + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    kpos = jnp.arange(s, dtype=jnp.int32)
    valid = None if kv_lengths is None else kpos[None, :] < jnp.asarray(kv_lengths)[:, None]
    mask = window_sink_mask(qpos, kpos, jnp.asarray(windows), jnp.asarray(sinks), valid)
    return mha_reference(q, k, v, mask, scale=scale, return_lse=return_lse)


def span_decode_reference(
    q: jax.Array, cache: SpanKVCache, q_positions: jax.Array, scale: float | None = None
) -> jax.Array:
    """The jnp oracle. q [B, H, D] at positions q_positions [B]; returns [B, H, D]."""
    b, h, d = q.shape
    sched = cache.schedule
    p = cache.pos[:, None, None, :]  # [B, 1, 1, M]
    qp = q_positions[:, None, None, None]
    w = jnp.asarray(sched.windows, jnp.int32)[None, :, None, None]
    s = jnp.asarray(sched.sinks, jnp.int32)[None, :, None, None]
    heads = jnp.asarray(sched.slot_layout()[0])
    own = (heads[None, :] == (jnp.arange(h) // sched.group)[:, None])[None, :, None, :]
    mask = own & (p >= 0) & visible(qp, p, w, s)
    out = mha_reference(q[:, None], cache.k[:, :, None], cache.v[:, :, None], mask, scale=scale)
    return out[:, 0]


def head_major_decode_reference(
    q, k, v, q_positions, *, pos=None, k_new=None, v_new=None, scores=None, scale=None, window=None
):
    """The jnp oracle (float32). See `full_step_decode` / `recycled_decode` for the arguments
    (`window`: a slot is visible only when q_position - its position < window; None: no limit).

    Returns out [B, H, D] (q's dtype), or with `scores`: (out, scores [B, Hkv, N],
    new_scores [B, Hkv] or None).
    """
    b, h, d = q.shape
    _, hkv, n, _ = k.shape
    group = h // hkv
    scale = d**-0.5 if scale is None else scale
    if pos is None:
        pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, hkv, n))
    qp = q_positions.astype(jnp.int32)[:, None, None]
    vis = (pos >= 0) & (pos <= qp)  # [B, Hkv, N]
    if window is not None:
        vis = vis & (qp - pos < window)
    qg = q.reshape(b, hkv, group, d).astype(jnp.float32)
    logits = (
        jnp.einsum("bkgd,bknd->bkgn", qg, k.astype(jnp.float32), precision=lax.Precision.HIGHEST)
        * scale
    )
    logits = jnp.where(vis[:, :, None], logits, -jnp.inf)
    vals = v.astype(jnp.float32)
    if k_new is not None:
        ln = (
            jnp.einsum(
                "bkgd,bkd->bkg", qg, k_new.astype(jnp.float32), precision=lax.Precision.HIGHEST
            )
            * scale
        )
        logits = jnp.concatenate([logits, ln[..., None]], axis=-1)
        vals = jnp.concatenate([vals, v_new.astype(jnp.float32)[:, :, None]], axis=2)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(m == -jnp.inf, 0.0, m)
    p = jnp.exp(logits - m)
    den = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(den > 0, den, 1.0)
    out = jnp.einsum("bkgn,bknd->bkgd", p, vals, precision=lax.Precision.HIGHEST)
    out = out.reshape(b, h, d).astype(q.dtype)
    if scores is None:
        return out
    agg = jnp.max(p, axis=2) if scores == "max" else jnp.sum(p, axis=2)
    if k_new is None:
        return out, agg, None
    return out, agg[..., :n], agg[..., n]
