"""Exact per-head window + sink (or dense causal) attention in jnp, query-chunked: the oracle
backend that measures what a plan keeps (not how fast a kernel runs), with memory bounded by a
query chunk x keys per layer.

- `chunked_attention`: T tokens over themselves (forward passes: causal and window skipping;
  `checkpoint=True`: rematerialised chunks for a bounded backward pass, used by profiling).
- `cache_attention`: queries over a whole `DenseKVCache`, masked by absolute position.
- `MaskedAttention`: the `CachedAttention` over both, used to generate the calibration answers,
  to validate candidate plans and by the evaluation's 'masked' implementation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moa_jax.config import ModelConfig
from moa_jax.models.attention import CachedAttention
from moa_jax.pallas_kernels.caches.dense import DenseKVCache
from moa_jax.pallas_kernels.reference import (
    causal_mask,
    mha_reference,
    window_sink_mask,
)


def _chunks(t: int, q_chunk: int) -> list[tuple[int, int]]:
    q_chunk = max(1, min(int(q_chunk), t))
    return [(s, min(s + q_chunk, t)) for s in range(0, t, q_chunk)]


def _masked_mha(q, k, v, qpos, kpos, windows, sinks):
    """q [B, Tq, H, D] at positions qpos over k/v [B, Tk, Hkv, D] at kpos: causal, or per-head
    window + sink when `windows` is given."""
    if windows is None:
        mask = causal_mask(qpos, kpos)
    else:
        mask = window_sink_mask(
            qpos, kpos, jnp.asarray(windows, jnp.int32), jnp.asarray(sinks, jnp.int32)
        )
    return mha_reference(q, k, v, mask)


def chunked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    positions: jax.Array,
    *,
    windows: Sequence[int] | None = None,
    sinks: Sequence[int] | int = 0,
    q_chunk: int = 512,
    checkpoint: bool = False,
    key_groups: int = 4,
) -> jax.Array:
    """Causal (or per-head window + sink) attention of T tokens over themselves, query-chunked.

    q [B, T, H, D], k/v [B, T, Hkv, D], positions int [B, T] increasing along T.

    Without `checkpoint` (forward passes) the chunks are unrolled and query chunk [s, e) reads
    only keys [0, e) (causality skips about half of the dense work).

    With `checkpoint` (for a backward pass) the memory must stay bounded whatever the compiler's
    schedule: query chunks run in `lax.scan`s with a rematerialised body, so the backward pass
    stores only each chunk's inputs and recomputes its probabilities. To keep most of the causal
    saving, chunks are split into `key_groups` consecutive groups, one scan each, group g reading
    keys up to its last query (work ~ (G+1)/(2G) of dense instead of 1/2).
    """
    b, t, h, d = q.shape

    def one(qc, kc, vc, qpos, kpos):
        return _masked_mha(qc, kc, vc, qpos, kpos, windows, sinks)

    chunks = _chunks(t, q_chunk)
    if not checkpoint or len(chunks) == 1:
        fn = jax.checkpoint(one) if checkpoint else one
        outs = [
            fn(q[:, s:e], k[:, :e], v[:, :e], positions[:, s:e], positions[:, :e])
            for s, e in chunks
        ]
        return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)

    qc = chunks[0][1]
    if t % qc:
        raise ValueError(
            f"sequence length {t} must be a multiple of q_chunk {qc} for the checkpointed path"
        )
    n = t // qc
    g = max(1, min(int(key_groups), n))
    bounds = [round(i * n / g) for i in range(g + 1)]
    body = jax.checkpoint(one)
    outs = []
    for c0, c1 in zip(bounds[:-1], bounds[1:]):
        if c1 <= c0:
            continue
        kend = c1 * qc
        kc, vc, kpos = k[:, :kend], v[:, :kend], positions[:, :kend]
        qs = q[:, c0 * qc : kend].reshape(b, c1 - c0, qc, h, d).swapaxes(0, 1)
        ps = positions[:, c0 * qc : kend].reshape(b, c1 - c0, qc).swapaxes(0, 1)

        def step(carry, xs, kc=kc, vc=vc, kpos=kpos):
            qi, pi = xs
            return carry, body(qi, kc, vc, pi, kpos)

        _, o = jax.lax.scan(step, None, (qs, ps))
        outs.append(o.swapaxes(0, 1).reshape(b, (c1 - c0) * qc, h, d))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def cache_attention(
    q: jax.Array,
    cache: Any,
    positions: jax.Array,
    *,
    windows: Sequence[int] | None = None,
    sinks: Sequence[int] | int = 0,
    q_chunk: int = 512,
) -> jax.Array:
    """Queries q [B, T, H, D] at positions [B, T] over a whole `DenseKVCache` (slot j holds
    position j), causal or per-head window + sink masked by absolute position, query-chunked."""
    kpos = jnp.arange(cache.max_len, dtype=positions.dtype)
    outs = []
    for s, e in _chunks(q.shape[1], q_chunk):
        outs.append(
            _masked_mha(q[:, s:e], cache.k, cache.v, positions[:, s:e], kpos, windows, sinks)
        )
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def _prefill_chunks(q, k, v, windows, sinks, q_chunk: int):
    """Attention of T tokens at positions [0, T) over themselves, query-chunked.

    Query chunk [s, e) reads the sink keys and keys [s - max_window + 1, e) only (all it can
    see): causal skipping for dense layers, window skipping for sparse ones.
    """
    t = q.shape[1]
    outs = []
    for s, e in _chunks(t, q_chunk):
        lo = 0 if windows is None else max(0, s - max(windows) + 1)
        sink = 0 if windows is None else max(sinks)
        if lo <= sink:
            kk, vv, idx = k[:, :e], v[:, :e], np.arange(e)
        else:  # sinks, then the band [lo, e): two slices, no gather
            kk = jnp.concatenate([k[:, :sink], k[:, lo:e]], axis=1)
            vv = jnp.concatenate([v[:, :sink], v[:, lo:e]], axis=1)
            idx = np.concatenate([np.arange(sink), np.arange(lo, e)])
        outs.append(
            _masked_mha(
                q[:, s:e],
                kk,
                vv,
                jnp.arange(s, e, dtype=jnp.int32)[None],
                jnp.asarray(idx, jnp.int32),
                windows,
                sinks,
            )
        )
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


@dataclasses.dataclass(frozen=True)
class MaskedAttention(CachedAttention):
    """Dense causal, or fixed per-head window + sink attention, computed exactly (jnp) in query
    chunks.

    Stateless, the tokens of a call sit at positions [0, T). With a (dense) cache, a `prefill`
    whose rows all start at position 0 (as `generate` does it) takes the chunked fast path over
    the new tokens; a continued prefill and `decode_step` attend over the whole cache under the
    position mask.

    Args:
      windows: [layers][heads] window per query head in tokens (None: dense causal).
      sinks: [layers][heads] sink tokens per head (None: none).
      q_chunk: queries per chunk.
      model_window: the windows and sinks are a plan composed with the model's own sliding
        window (`Plan.within_model_window`): the backend applies it (`applies_model_window`).
    """

    windows: tuple[tuple[int, ...], ...] | None = None
    sinks: tuple[tuple[int, ...], ...] | None = None
    q_chunk: int = 512
    model_window: bool = False

    @classmethod
    def for_plan(cls, plan: Any, length: int, q_chunk: int = 512) -> MaskedAttention:
        """The plan's windows resolved at `length`, and its sinks (both composed with the
        model's window when the plan is, `Plan.within_model_window`)."""
        w = tuple(tuple(int(x) for x in row) for row in plan.resolve(length))
        s = tuple(tuple(int(x) for x in row) for row in plan.sink_array())
        composed = getattr(plan, "model_windows", None) is not None
        return cls(windows=w, sinks=s, q_chunk=q_chunk, model_window=composed)

    @property
    def applies_model_window(self) -> bool:
        return self.model_window and self.windows is not None

    @property
    def layer_uniform(self) -> bool:
        return self.windows is None and self.sinks is None

    def _layer(self, layer: int):
        if self.windows is None:
            return None, None
        w = self.windows[layer]
        s = self.sinks[layer] if self.sinks is not None else (0,) * len(w)
        return w, s

    def init_cache(self, cfg: ModelConfig, batch: int, max_len: int, dtype: Any = jnp.bfloat16):
        if self.windows is not None and len(self.windows) != cfg.num_layers:
            raise ValueError(
                f"{len(self.windows)} layers of windows, the model has {cfg.num_layers}"
            )
        return tuple(
            DenseKVCache.zeros(batch, max_len, cfg.num_kv_heads, cfg.head_dim, dtype)
            for _ in range(cfg.num_layers)
        )

    def _layer_checked(self, layer: int, q: jax.Array):
        windows, sinks = self._layer(layer)
        if windows is not None and len(windows) != q.shape[2]:
            raise ValueError(f"{len(windows)} windows for {q.shape[2]} query heads")
        return windows, sinks

    def __call__(self, q, k, v, *, layer, positions, lengths=None):
        windows, sinks = self._layer_checked(layer, q)
        return _prefill_chunks(q, k, v, windows, sinks, self.q_chunk)

    # Slot j holds position j: right padding is overwritten by decoding and never visible to a
    # real query (causal mask), so `lengths` is not needed.
    def prefill(self, q, k, v, *, layer, positions, cache, lengths=None, q_pre_rope=None):
        windows, sinks = self._layer_checked(layer, q)
        cache = cache.write(k, v, positions[:, 0])
        out = jax.lax.cond(
            jnp.all(positions[:, 0] == 0),
            lambda: _prefill_chunks(q, k, v, windows, sinks, self.q_chunk),
            lambda: cache_attention(
                q, cache, positions, windows=windows, sinks=sinks, q_chunk=self.q_chunk
            ),
        )
        return out, cache

    def decode_step(self, q, k, v, *, layer, positions, cache, q_pre_rope=None):
        windows, sinks = self._layer_checked(layer, q)
        cache = cache.write(k, v, positions[:, 0])
        out = cache_attention(
            q, cache, positions, windows=windows, sinks=sinks, q_chunk=self.q_chunk
        )
        return out, cache
