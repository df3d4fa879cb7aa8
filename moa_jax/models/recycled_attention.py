"""Recycled Attention decoding (Xu, Goyal, Choi 2024): the config, the selection and the backend.

`RecycledAttention(RecycleConfig(k, stride, dynamic_threshold))` keeps two caches per layer
(`pallas_kernels.RecycledKVCache`): the full cache C_f (every token, never
evicted) and the recycled cache C_p of exactly K entries per KV head, kept as indices into C_f
plus a gathered copy of their keys and values (so partial steps read K contiguous slots). It
prefills with full causal attention, or with a MoA `Plan` through the block-sparse kernel when
`prefill_moa` is given (options: `head_major_attention.HeadMajorBackend`). The K-slot
baselines it is compared with are in `eviction_attention`.

Recycled Attention, as implemented (METHODS.md "Recycled Attention"):

- Selection (`select_top_k`): fp32 softmax probabilities of the single current query over C_f;
  per KV head the max over its query heads; a 1-D max-pool over tokens (kernel `pool` = 7,
  stride 1, same size, -inf padding), invalid slots re-masked to -inf after pooling; top-K.
  No sinks or recent tokens are forced in: every layer and KV head keeps exactly what scores
  highest. The K entries are stored sorted by ascending score (empty entries, when fewer than
  K tokens exist, first).
- Prefill is step 0: the last prompt token's probabilities over C_f (computed by the full-step
  kernel after the prompt is written; with a MoA prefill too, so the seed sees the whole prompt
  although the prefill itself was sparse) seed C_p.
- Partial step: attend over C_p plus the current token (K + 1 keys), then write the current
  token over the entry at a pointer that starts at 0 after each refresh and advances by one:
  with the ascending order this evicts the lowest-scored selected token still present, and the
  tokens generated since the last refresh are never evicted (needs S <= K). The token is also
  written to C_f, whose entries are never recomputed.
- Full step: attend over all of C_f and rebuild C_p (and reset the pointer) from the same pass's
  probabilities (`pallas_kernels.full_step_decode` returns both).
- Schedule, per layer inside the decode `lax.while_loop`: each layer's cache carries a decode
  step counter (the prefill is step 0), the pointer and the head-averaged query of its last full
  step, and `lax.cond` picks the full or the partial branch at run time, so a partial step never
  touches C_f beyond writing one token.
  * fixed (`dynamic_threshold=None`): steps t = S, 2S, ... are full (t counted from 1).
  * dynamic: every `stride` (= QC) steps a layer compares the cosine of the current
    head-averaged query (pre-RoPE by default, `pre_rope_query`) with the one at its last full
    step, and refreshes at or below the threshold. The decision is per row: the full branch runs
    when any row of the batch needs it and the other rows take the partial result, so a row's
    output never depends on the rest of the batch. A row whose C_p holds nothing but tokens
    generated since its last refresh (K partial steps in a row) is refreshed too (forced), so no
    generated token is ever evicted between refreshes.
  * never (`stride=None`): the seed selection is kept for good (SnapKV with a one-token
    observation window and the same pooling); after K new tokens the pointer wraps and the
    oldest generated token goes first.
- Exact limits (tested): S = 1 equals dense decoding; K >= final length equals dense decoding.
- The model's own sliding window W (`HeadMajorBackend.model_windows`): the prefill and the full
  step see the last W positions only, the partial step only its entries inside them, and a
  selection takes only positions the next query can still see (q_pos + 1 - W < j): with
  K >= W + S it equals the model's windowed dense decoding.

Memory per layer (`RecycledKVCache.nbytes`): the full cache 2 * B * Hkv * Lp * D * itemsize
plus 2 * B * Hkv * Kp * D * itemsize for C_p and 4 * B * Hkv * Kp for its positions (Lp, Kp:
L and K rounded up to the kernel block), i.e. L + K tokens as the paper states: nothing saved.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from moa_jax.config import ModelConfig
from moa_jax.models.head_major_attention import HeadMajorBackend, chunk_info, slot_after
from moa_jax.pallas_kernels.caches.head_major import RecycledKVCache, gather_slots, write_chunk


# ------------------------------------------------------------------------------ config
@dataclasses.dataclass(frozen=True)
class RecycleConfig:
    """Recycled Attention settings.

    Args:
      k: entries of the recycled cache per layer and KV head: sizes the cache
        (`RecycledKVCache.top_k`, the K that every step then reads).
      stride: fixed schedule: a full step every `stride` decode steps (S; S = 1 is dense);
        dynamic schedule: the query check interval QC; None: never refresh (SnapKV).
      dynamic_threshold: None for the fixed schedule; else the cosine similarity s at or below
        which a layer refreshes (0.85 for Llama-3.1-8B, 0.95 for Qwen2-7B in the paper).
      pre_rope_query: the dynamic rule compares queries before RoPE (the paper's default);
        False compares the rotated queries.
      pool: max-pool kernel over tokens (odd; 1 disables pooling).
    """

    k: int
    stride: int | None = 10
    dynamic_threshold: float | None = None
    pre_rope_query: bool = True
    pool: int = 7

    def __post_init__(self):
        if int(self.k) < 1:
            raise ValueError(f"RecycleConfig.k must be >= 1, got {self.k}")
        if self.stride is not None and int(self.stride) < 1:
            raise ValueError(f"RecycleConfig.stride must be >= 1 or None, got {self.stride}")
        if self.dynamic_threshold is not None and self.stride is None:
            raise ValueError("the dynamic schedule needs a check interval: set stride (QC)")
        if self.mode == "fixed" and self.stride > self.k:
            raise ValueError(
                f"stride S={self.stride} > k={self.k}: tokens generated between "
                f"refreshes would be evicted (S <= K is required)"
            )
        if self.pool < 1 or self.pool % 2 == 0:
            raise ValueError(f"pool must be an odd kernel size >= 1, got {self.pool}")

    @property
    def mode(self) -> str:
        """'fixed', 'dynamic' or 'never'."""
        if self.stride is None:
            return "never"
        return "fixed" if self.dynamic_threshold is None else "dynamic"


# ------------------------------------------------------------------------------ selection
def max_pool_scores(scores: jax.Array, valid: jax.Array, pool: int) -> jax.Array:
    """1-D max-pool over the last axis (kernel `pool`, stride 1, same size, -inf padding);
    invalid slots are -inf before and after pooling."""
    s = jnp.where(valid, scores, -jnp.inf)
    if pool > 1:
        dims = (1,) * (s.ndim - 1) + (pool,)
        pad = ((0, 0),) * (s.ndim - 1) + ((pool // 2, pool // 2),)
        s = lax.reduce_window(s, -jnp.inf, lax.max, dims, (1,) * s.ndim, pad)
    return jnp.where(valid, s, -jnp.inf)


def select_top_k(
    scores: jax.Array, valid: jax.Array, k: int, pool: int = 7, slots: int | None = None
) -> jax.Array:
    """The K best positions per (row, KV head), sorted by ascending pooled score.

    Args:
      scores: float32 [B, Hkv, N], per-KV-head scores (probabilities max over the group).
      valid: bool broadcastable to [B, Hkv, N].
      k: entries to keep; pool: max-pool kernel.
      slots: pad the result to this many entries (>= k) with -1 at the end.
    Returns:
      int32 [B, Hkv, slots or k]: positions, lowest score first; -1 (empty) entries, when
      fewer than k positions are valid, come before all valid ones.
    """
    s = max_pool_scores(scores, jnp.broadcast_to(valid, scores.shape), pool)
    n = s.shape[-1]
    kk = min(k, n)
    vals, ids = lax.top_k(s, kk)  # descending
    ids = jnp.where(vals == -jnp.inf, -1, ids).astype(jnp.int32)
    if kk < k:
        ids = jnp.concatenate([ids, jnp.full(ids.shape[:-1] + (k - kk,), -1, jnp.int32)], -1)
    ids = ids[..., ::-1]  # ascending
    slots = k if slots is None else slots
    if slots > k:
        ids = jnp.concatenate([ids, jnp.full(ids.shape[:-1] + (slots - k,), -1, jnp.int32)], -1)
    return ids


def _head_mean(q: jax.Array) -> jax.Array:
    return jnp.mean(q.astype(jnp.float32), axis=-2)


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    num = jnp.sum(a * b, axis=-1)
    den = jnp.sqrt(jnp.sum(a * a, axis=-1) * jnp.sum(b * b, axis=-1))
    return jnp.clip(num / jnp.maximum(den, 1e-30), -1.0, 1.0)


# ------------------------------------------------------------------------------ recycled
@dataclasses.dataclass(frozen=True)
class RecycledAttention(HeadMajorBackend):
    """Recycled Attention (see the module docstring).

    Args:
      config: the `RecycleConfig` (K, stride, dynamic threshold).
      options: keyword-only, see `HeadMajorBackend`.
    """

    config: RecycleConfig

    @property
    def wants_pre_rope_query(self) -> bool:
        """Asks the model for the pre-RoPE queries (`q_pre_rope=`): the dynamic rule's default."""
        return self.config.mode == "dynamic" and self.config.pre_rope_query

    def init_cache(self, cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16):
        self.validate_prefill(cfg)
        return tuple(
            RecycledKVCache.zeros(
                batch,
                max_len,
                cfg.num_kv_heads,
                cfg.head_dim,
                self.config.k,
                dtype,
                self.cache_block,
            )
            for _ in range(cfg.num_layers)
        )

    def _query_summary(self, q, q_pre):
        """Head-averaged query [B, D] (f32) for the dynamic rule, from [B, H, D] arrays."""
        if self.config.mode != "dynamic":
            return None
        if self.config.pre_rope_query:
            return _head_mean(q_pre)
        return _head_mean(q)

    def _check_pre_rope(self, q_pre_rope):
        if self.wants_pre_rope_query and q_pre_rope is None:
            raise ValueError(
                "RecycleConfig(pre_rope_query=True) needs the model to pass "
                "q_pre_rope= (the decoder, moa_jax.models.decoder, does)"
            )

    def prefill(self, q, k, v, *, layer, positions, cache, lengths=None, q_pre_rope=None):
        self._check_pre_rope(q_pre_rope)
        return self._prefill(q, k, v, layer, positions, cache, lengths, q_pre_rope)

    def decode_kv_tokens(self, cache: RecycledKVCache, live: float) -> float:
        # K + 1 keys on a partial step; the fixed schedule's full step every S reads them all
        k, stride = cache.top_k, self.config.stride
        if self.config.mode != "fixed":
            return float(k + 1)
        return (live + (stride - 1) * (k + 1)) / stride

    def decode_step(self, q, k, v, *, layer, positions, cache, q_pre_rope=None):
        self._check_pre_rope(q_pre_rope)
        return self._decode(q, k, v, layer, positions, cache, q_pre_rope)

    def _selectable(self, layer: int, n: int, pos: jax.Array) -> jax.Array:
        """bool [B, 1, n]: full-cache slots a selection at query position pos [B] may take:
        written ones (j <= pos) that the next query still sees within the model window."""
        j = jnp.arange(n)[None, None]
        ok = j <= pos[:, None, None]
        w = self.layer_window(layer)
        if w is not None:
            ok = ok & (j > pos[:, None, None] + 1 - w)
        return ok

    def _prefill(self, q, k, v, layer, positions, cache, lengths, q_pre):
        out = self.prefill_attention(q, k, v, layer, cache.max_len)
        start, lengths, last, rows = chunk_info(q, positions, lengths)
        ck, cv = write_chunk(cache.k, k, start), write_chunk(cache.v, v, start)
        cache = dataclasses.replace(cache, k=ck, v=cv)
        q_last = q[rows, lengths - 1]  # [B, H, D]
        _, probs = self.full_step(q_last, ck, cv, last, "max", layer)
        valid = self._selectable(layer, probs.shape[-1], last)
        idx = select_top_k(probs, valid, cache.top_k, self.config.pool, cache.kp.shape[2])
        kp, vp = gather_slots(ck, idx), gather_slots(cv, idx)
        summ = self._query_summary(q_last, None if q_pre is None else q_pre[rows, lengths - 1])
        return out, dataclasses.replace(
            cache,
            kp=kp,
            vp=vp,
            idx=idx,
            ptr=jnp.zeros_like(cache.ptr),
            step=jnp.zeros((), jnp.int32),
            ref_q=cache.ref_q if summ is None else summ,
        )

    def _decode(self, q, k, v, layer, positions, cache, q_pre):
        # Layout for XLA: the lax.cond returns C_p untouched on partial steps (its attention only
        # reads it) and the current token is written at the pointer after the cond, by a
        # scatter that drops the write on refreshed rows and depends on the attention output
        # (`slot_after`). Writing inside the branch, after reading C_p there, makes XLA copy C_p
        # around the cond at every step.
        cfg = self.config
        q0, k0, v0, pos = q[:, 0], k[:, 0], v[:, 0], positions[:, 0].astype(jnp.int32)
        b = q0.shape[0]
        rows = jnp.arange(b)
        ck = cache.k.at[rows, :, pos].set(k0.astype(cache.k.dtype))
        cv = cache.v.at[rows, :, pos].set(v0.astype(cache.v.dtype))
        step = cache.step + 1
        summ = self._query_summary(q0, None if q_pre is None else q_pre[:, 0])
        sel = (cache.kp, cache.vp, cache.idx, cache.ref_q)

        def partial_branch():
            out = self.gathered_step(q0, cache.kp, cache.vp, cache.idx, pos, k0, v0, layer=layer)
            return (out,) + sel

        def full_branch(need):
            out, probs = self.full_step(q0, ck, cv, pos, "max", layer)
            idx = select_top_k(
                probs,
                self._selectable(layer, probs.shape[-1], pos),
                cache.top_k,
                cfg.pool,
                cache.kp.shape[2],
            )
            ref_q = cache.ref_q if summ is None else summ
            if need is None:
                return out, gather_slots(ck, idx), gather_slots(cv, idx), idx, ref_q
            # Rows that keep their selection: C_p is by construction C_f at its positions, so
            # re-gathering it from C_f (rather than reading C_p here) reproduces it exactly.
            idx = jnp.where(need[:, None, None], idx, cache.idx)
            kp, vp = gather_slots(ck, idx), gather_slots(cv, idx)
            out_p = self.gathered_step(q0, kp, vp, idx, pos, k0, v0, layer=layer)
            return (
                jnp.where(need[:, None, None], out, out_p),
                kp,
                vp,
                idx,
                jnp.where(need[:, None], ref_q, cache.ref_q),
            )

        if cfg.mode == "never":
            refreshed = jnp.zeros((b,), bool)
            out, kp, vp, idx, ref_q = partial_branch()
        elif cfg.mode == "fixed":
            full = step % cfg.stride == 0
            refreshed = jnp.broadcast_to(full, (b,))
            out, kp, vp, idx, ref_q = lax.cond(full, lambda: full_branch(None), partial_branch)
        else:
            check = step % cfg.stride == 0
            refreshed = (check & (_cosine(summ, cache.ref_q) <= cfg.dynamic_threshold)) | (
                cache.ptr >= cache.top_k
            )
            out, kp, vp, idx, ref_q = lax.cond(
                jnp.any(refreshed), lambda: full_branch(refreshed), partial_branch
            )
        # Rows that took a partial step: the current token replaces the entry at the pointer.
        ptr = jnp.remainder(cache.ptr, cache.top_k) if cfg.mode == "never" else cache.ptr
        slot = slot_after(jnp.where(refreshed, kp.shape[2], ptr), out)  # out of range: dropped
        kp = kp.at[rows, :, slot].set(k0.astype(kp.dtype), mode="drop")
        vp = vp.at[rows, :, slot].set(v0.astype(vp.dtype), mode="drop")
        idx = idx.at[rows, :, slot].set(jnp.broadcast_to(pos[:, None], k0.shape[:2]), mode="drop")
        return out[:, None], dataclasses.replace(
            cache,
            k=ck,
            v=cv,
            kp=kp,
            vp=vp,
            idx=idx,
            step=step,
            ptr=jnp.where(refreshed, 0, ptr + 1).astype(jnp.int32),
            ref_q=ref_q,
        )
