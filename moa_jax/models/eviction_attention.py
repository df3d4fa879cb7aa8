"""The K-slot eviction baselines of Recycled Attention, on the same cache layout and kernels.

- `StreamingAttention(k, sink=4)`: StreamingLLM, 4 sinks + the K - 4 most recent tokens.
- `H2OAttention(k)`: H2O, K/2 heavy hitters by accumulated attention + K/2 recent tokens.

Both keep a `pallas_kernels.SelectedKVCache` of K gathered slots per layer and KV
head (no full cache), prefill with full causal attention (or the `prefill_moa` plan), and
decode with the recycled step over the K slots plus the current token (options:
`head_major_attention.HeadMajorBackend`).

On a layer with the model's own sliding window W (`HeadMajorBackend.model_windows`) the
prefill and every step see only positions inside the window (q_pos - W < j); StreamingLLM keeps
no sinks there (they fall outside the window, as a plan's do: `Plan.within_model_window`), so
its K slots are the K most recent tokens, and H2O keeps from the prompt only tokens inside
the window and evicts slots that have left it before any other (they can never be seen
again).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from moa_jax.models.head_major_attention import HeadMajorBackend, chunk_info, slot_after
from moa_jax.pallas_kernels.caches.head_major import (
    SelectedKVCache,
    gather_slots,
    round_up,
    streaming_positions,
)
from moa_jax.pallas_kernels.reference import visible
from moa_jax.plan import STREAMINGLLM_SINK


# ------------------------------------------------------------------------------ StreamingLLM
def _gather_chunk(k: jax.Array, idx: jax.Array, start: jax.Array) -> jax.Array:
    """k [B, T, Hkv, D] (positions start + t), idx [B, Hkv, M] -> [B, Hkv, M, D]."""
    t = k.shape[1]
    local = jnp.clip(idx - start[:, None, None], 0, t - 1)
    return gather_slots(jnp.swapaxes(k, 1, 2), local)


@dataclasses.dataclass(frozen=True)
class StreamingAttention(HeadMajorBackend):
    """StreamingLLM decoding: `sink` sinks + the K - sink most recent tokens per layer.

    The prompt is prefilled with full causal attention (or the `prefill_moa` plan) and then
    only the sinks and the most recent tokens are kept; a decode step attends over the K cached
    tokens plus the current one (as the recycled partial step does), then writes the current
    token over the oldest recent one. Options: `HeadMajorBackend`.
    """

    k: int
    sink: int = STREAMINGLLM_SINK

    def __post_init__(self):
        if not 0 <= self.sink < self.k:
            raise ValueError(
                f"StreamingAttention needs 0 <= sink < k, got sink {self.sink}, k {self.k}"
            )

    def init_cache(self, cfg, batch, max_len, dtype=jnp.bfloat16):
        self.validate_prefill(cfg)
        return tuple(
            SelectedKVCache.zeros(
                batch, max_len, cfg.num_kv_heads, cfg.head_dim, self.k, dtype, self.cache_block
            )
            for _ in range(cfg.num_layers)
        )

    def layer_sink(self, layer: int) -> int:
        """Sinks kept at `layer`: none under a model window (module docstring)."""
        return 0 if self.layer_window(layer) is not None else self.sink

    def prefill(self, q, k, v, *, layer, positions, cache, lengths=None, q_pre_rope=None):
        hkv = k.shape[2]
        slots = cache.kp.shape[2]
        out = self.prefill_attention(q, k, v, layer, cache.max_len)
        start, lengths, last, _ = chunk_info(q, positions, lengths)
        idx = streaming_positions(last, cache.top_k, self.layer_sink(layer), slots)
        idx = jnp.broadcast_to(idx[:, None], (q.shape[0], hkv, slots))
        # The prefill chunk starts the sequence (positions [0, T)).
        return out, dataclasses.replace(
            cache,
            kp=_gather_chunk(k, idx, start).astype(cache.kp.dtype),
            vp=_gather_chunk(v, idx, start).astype(cache.vp.dtype),
            idx=idx,
        )

    def decode_kv_tokens(self, cache: SelectedKVCache, live: float) -> float:
        return float(cache.top_k + 1)  # the K kept slots and the new token

    def decode_step(self, q, k, v, *, layer, positions, cache, q_pre_rope=None):
        hkv = k.shape[2]
        q0, k0, v0 = q[:, 0], k[:, 0], v[:, 0]
        pos = positions[:, 0].astype(jnp.int32)
        out = self.gathered_step(q0, cache.kp, cache.vp, cache.idx, pos, k0, v0, layer=layer)
        kp, vp, idx = cache.kp, cache.vp, cache.idx
        sink = self.layer_sink(layer)
        ring = cache.top_k - sink
        slot = slot_after(jnp.where(pos < sink, pos, sink + jnp.remainder(pos - sink, ring)), out)
        rows = jnp.arange(q.shape[0])
        return out[:, None], dataclasses.replace(
            cache,
            kp=kp.at[rows, :, slot].set(k0.astype(kp.dtype)),
            vp=vp.at[rows, :, slot].set(v0.astype(vp.dtype)),
            idx=idx.at[rows, :, slot].set(jnp.broadcast_to(pos[:, None], (q.shape[0], hkv))),
        )


# ------------------------------------------------------------------------------ H2O
def prompt_attention_sums(
    q: jax.Array, k: jax.Array, lengths: jax.Array, windows, sinks, *, chunk: int = 128
) -> jax.Array:
    """Accumulated attention of each prompt token: for KV head g and key j, the sum over the
    query heads of group g and the valid queries i of softmax_j(q_i . k_j) under the causal
    (window + sink) mask. Queries are processed `chunk` at a time (memory B*H*chunk*T floats).

    Args:
      q: [B, T, H, D]; k: [B, T, Hkv, D], positions [0, T); lengths: int [B] valid tokens.
      windows, sinks: per-query-head window and sink (static tuples; window >= T is causal).
    Returns:
      float32 [B, Hkv, T] (0 for padding keys).
    """
    b, t, h, d = q.shape
    hkv = k.shape[2]
    group = h // hkv
    c = min(chunk, t)
    tp = round_up(t, c)
    qf = jnp.pad(q.astype(jnp.float32), ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    qf = qf.reshape(b, tp // c, c, hkv, group, d)
    kf = k.astype(jnp.float32)
    w = jnp.asarray(windows, jnp.int32).reshape(hkv, group)[:, :, None, None]
    s = jnp.asarray(sinks, jnp.int32).reshape(hkv, group)[:, :, None, None]
    kpos = jnp.arange(t)[None, None, None, :]
    scale = d**-0.5

    def body(carry, xs):
        qc, n = xs  # [B, c, Hkv, G, D]
        qpos = (n * c + jnp.arange(c))[None, None, :, None]
        mask = visible(qpos, kpos, w, s)  # [Hkv, G, c, T]
        valid_q = (n * c + jnp.arange(c))[None, :] < lengths[:, None]  # [B, c]
        lg = jnp.einsum("bckgd,btkd->bkgct", qc, kf, precision=lax.Precision.HIGHEST) * scale
        lg = jnp.where(mask[None], lg, -jnp.inf)
        p = jax.nn.softmax(lg, axis=-1)
        p = jnp.where(mask[None] & valid_q[:, None, None, :, None], p, 0.0)
        return carry + jnp.sum(p, axis=(2, 3)), None

    init = jnp.zeros((b, hkv, t), jnp.float32)
    xs = (jnp.moveaxis(qf, 1, 0), jnp.arange(tp // c))
    acc, _ = lax.scan(body, init, xs)
    return acc


def _h2o_recent(k: int) -> int:
    """H2O's recent tokens of K slots (the current one included); the rest are heavy hitters."""
    return k - k // 2


@dataclasses.dataclass(frozen=True)
class H2OAttention(HeadMajorBackend):
    """H2O decoding: K/2 heavy hitters by accumulated attention + K/2 recent tokens.

    Per layer and KV head, each cached token carries its accumulated attention: after the prompt
    the sum of the prompt queries' probabilities on it (`prompt_attention_sums`), then every
    decode step adds the current query's probabilities (summed over the KV group's query heads;
    the current token starts with its own). A step attends over the K cached tokens plus the
    current one, then evicts, among cached tokens outside the K - K//2 most recent positions
    (the current one included), the one with the lowest accumulated attention (empty slots
    first), and writes the current token there. Options: `HeadMajorBackend`;
    `score_chunk` is the query chunk of the prompt's score pass.
    """

    k: int
    score_chunk: int = 128

    def __post_init__(self):
        if self.k < 2:
            raise ValueError(f"H2OAttention needs k >= 2, got {self.k}")

    def init_cache(self, cfg, batch, max_len, dtype=jnp.bfloat16):
        self.validate_prefill(cfg)
        return tuple(
            SelectedKVCache.zeros(
                batch,
                max_len,
                cfg.num_kv_heads,
                cfg.head_dim,
                self.k,
                dtype,
                self.cache_block,
                with_scores=True,
            )
            for _ in range(cfg.num_layers)
        )

    def prefill(self, q, k, v, *, layer, positions, cache, lengths=None, q_pre_rope=None):
        return self._prefill(q, k, v, layer, positions, cache, lengths)

    def decode_kv_tokens(self, cache: SelectedKVCache, live: float) -> float:
        return float(cache.top_k + 1)  # the K kept slots and the new token

    def decode_step(self, q, k, v, *, layer, positions, cache, q_pre_rope=None):
        return self._decode(q, k, v, layer, positions, cache)

    def _prefill(self, q, k, v, layer, positions, cache, lengths):
        out = self.prefill_attention(q, k, v, layer, cache.max_len)
        b, t, h, _ = q.shape
        start, lengths, last, _ = chunk_info(q, positions, lengths)
        windows, sinks = self.prefill_windows(layer, h, t, cache.max_len)
        acc = prompt_attention_sums(q, k, lengths, windows, sinks, chunk=self.score_chunk)
        j = start[:, None, None] + jnp.arange(t)[None, None, :]  # positions of the chunk
        valid = j <= last[:, None, None]
        w = self.layer_window(layer)
        if w is not None:  # only what the next query still sees
            valid = valid & (j > last[:, None, None] + 1 - w)
        recent = valid & (j > last[:, None, None] - _h2o_recent(cache.top_k))
        key = jnp.where(recent, jnp.inf, jnp.where(valid, acc, -jnp.inf))
        kk = min(cache.top_k, t)
        vals, loc = lax.top_k(key, kk)
        keep = vals > -jnp.inf
        idx = jnp.where(keep, jnp.take_along_axis(j, loc, -1), -1).astype(jnp.int32)
        sel_acc = jnp.where(keep, jnp.take_along_axis(acc, loc, -1), -jnp.inf)
        slots = cache.kp.shape[2]
        pad = slots - kk
        idx = jnp.pad(idx, ((0, 0), (0, 0), (0, pad)), constant_values=-1)
        sel_acc = jnp.pad(sel_acc, ((0, 0), (0, 0), (0, pad)), constant_values=-jnp.inf)
        return out, dataclasses.replace(
            cache,
            kp=_gather_chunk(k, idx, start).astype(cache.kp.dtype),
            vp=_gather_chunk(v, idx, start).astype(cache.vp.dtype),
            idx=idx,
            acc=sel_acc,
        )

    def _decode(self, q, k, v, layer, positions, cache):
        q0, k0, v0 = q[:, 0], k[:, 0], v[:, 0]
        pos = positions[:, 0].astype(jnp.int32)
        out, sc, new_sc = self.gathered_step(
            q0, cache.kp, cache.vp, cache.idx, pos, k0, v0, scores="sum", layer=layer
        )
        kp, vp = cache.kp, cache.vp
        acc = cache.acc + sc
        idx = cache.idx
        live = jnp.arange(idx.shape[-1])[None, None, :] < cache.top_k
        recent = idx > (pos[:, None, None] - _h2o_recent(cache.top_k))
        empty = idx < 0
        w = self.layer_window(layer)
        if w is not None:  # slots the next query cannot see go first, as empty ones
            empty = empty | (idx <= pos[:, None, None] + 1 - w)
        key = jnp.where(~live, jnp.inf, jnp.where(empty, -jnp.inf, jnp.where(recent, jnp.inf, acc)))
        slot = slot_after(jnp.argmin(key, axis=-1).astype(jnp.int32), out)  # [B, Hkv]
        b, hkv = slot.shape
        rb, hb = jnp.arange(b)[:, None], jnp.arange(hkv)[None, :]
        return out[:, None], dataclasses.replace(
            cache,
            kp=kp.at[rb, hb, slot].set(k0.astype(kp.dtype)),
            vp=vp.at[rb, hb, slot].set(v0.astype(vp.dtype)),
            idx=idx.at[rb, hb, slot].set(jnp.broadcast_to(pos[:, None], (b, hkv))),
            acc=acc.at[rb, hb, slot].set(new_sc),
        )
