"""Head-major KV caches read by the head-major decode kernels (`decode/head_major_triton.py`).

All three keep each KV head's slots contiguous, k, v [B, Hkv, N, D], with N rounded up to the
kernel block (`default_block`):

- `HeadMajorKVCache`: a dense cache, slot j holds position j (`full_step_decode`).
- `RecycledKVCache`: Recycled Attention's full cache C_f (as `HeadMajorKVCache`) plus the
  recycled cache C_p, K gathered slots per KV head with their positions (`recycled_decode`),
  and the schedule state (pointer, step, last full step's query).
- `SelectedKVCache`: the K gathered slots alone (StreamingLLM, H2O), with H2O's accumulated
  attention per slot.

A cache's K (`top_k`, static) is the one its backend reads at every step; the backend's config
only sizes the cache (`init_cache`). Slots [K, Kp) are block padding and always empty (-1).
Each is a `caches.protocol.KVCache`: `write` puts a chunk's tokens into the full cache (slot j
holds position j) and into every gathered slot that holds one of their positions; which
positions the gathered slots hold is the backend's choice.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from moa_jax.pallas_kernels.caches.protocol import random_like, tree_nbytes
from moa_jax.pallas_kernels.heuristics import cache_block

KV_AXES = ("batch", "kv_heads", "seq", "head_dim")
SLOT_AXES = ("batch", "kv_heads", "seq")


def round_up(x: int, m: int) -> int:
    return -(-int(x) // m) * m


def default_block() -> int:
    """Cache padding granularity (and kernel block bound): `heuristics.cache_block`."""
    return cache_block()


def gather_slots(buf: jax.Array, idx: jax.Array) -> jax.Array:
    """buf [B, Hkv, N, D], idx int [B, Hkv, M] (-1 allowed: reads slot 0) -> [B, Hkv, M, D]."""
    return jnp.take_along_axis(buf, jnp.maximum(idx, 0)[..., None], axis=2)


def write_chunk(buf: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """buf [B, Hkv, L, D] <- new [B, T, Hkv, D] (token-major) at slots [start[b], start[b] + T)."""
    new = jnp.swapaxes(new, 1, 2).astype(buf.dtype)

    def put(bf, nw, s):
        return lax.dynamic_update_slice_in_dim(bf, nw, s, axis=1)

    return jax.vmap(put)(buf, new, start)


def refresh_slots(
    buf: jax.Array,
    idx: jax.Array,
    new: jax.Array,
    start: jax.Array,
    lengths: jax.Array | None = None,
) -> jax.Array:
    """Gathered slots buf [B, Hkv, M, D] holding positions idx int [B, Hkv, M] (-1 empty), with
    the slots whose position is one of the valid chunk tokens new [B, T, Hkv, D] (positions
    [start[b], start[b] + lengths[b])) set to that token."""
    b, t = new.shape[:2]
    lengths = jnp.full((b,), t, jnp.int32) if lengths is None else lengths
    local = idx - start[:, None, None]
    take = (idx >= 0) & (local >= 0) & (local < lengths[:, None, None])
    got = gather_slots(jnp.swapaxes(new, 1, 2), jnp.clip(local, 0, t - 1)).astype(buf.dtype)
    return jnp.where(take[..., None], got, buf)


def streaming_positions(last: jax.Array, top_k: int, sink: int, slots: int) -> jax.Array:
    """int32 [B, slots]: the position each slot of a StreamingLLM cache (`sink` sinks, then a
    ring of top_k - sink recent tokens) holds after tokens [0, last] were written one by one
    (slot p for p < sink, else sink + (p - sink) % (top_k - sink)); -1 for empty slots."""
    ring = top_k - sink
    j = jnp.arange(slots, dtype=jnp.int32)[None, :]
    last = last[:, None]
    i = j - sink
    ring_pos = sink + i + ring * jnp.floor_divide(last - sink - i, ring)
    p = jnp.where(j < sink, j, ring_pos)
    ok = (j < top_k) & (p <= last) & ((j < sink) | (p >= sink))
    return jnp.where(ok, p, -1).astype(jnp.int32)


def _random_selection(key: jax.Array, shape: tuple[int, ...], top_k: int, context: int):
    """int32 [B, Hkv, slots] (shape): min(top_k, context) random distinct positions of
    [0, context) per row and KV head, then -1."""
    b, hkv, slots = shape
    kk = min(top_k, context)
    idx = lax.top_k(jax.random.uniform(key, (b, hkv, context)), kk)[1].astype(jnp.int32)
    return jnp.pad(idx, ((0, 0), (0, 0), (0, slots - kk)), constant_values=-1)


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=("k", "v"), meta_fields=("max_len",)
)
@dataclasses.dataclass
class HeadMajorKVCache:
    """A dense cache in the head-major layout of the recycled kernels: k, v [B, Hkv, Lp, D]."""

    k: jax.Array
    v: jax.Array
    max_len: int

    @classmethod
    def zeros(
        cls,
        batch: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: Any = jnp.bfloat16,
        block: int = 64,
    ) -> HeadMajorKVCache:
        shape = (batch, num_kv_heads, round_up(max_len, block), head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), int(max_len))

    def logical_axes(self) -> HeadMajorKVCache:
        return dataclasses.replace(self, k=KV_AXES, v=KV_AXES)

    @property
    def nbytes(self) -> int:
        return tree_nbytes(self)

    def write(
        self, k: jax.Array, v: jax.Array, start: jax.Array, lengths: jax.Array | None = None
    ) -> HeadMajorKVCache:
        """Writes k, v [B, T, Hkv, D] at slots [start[b], start[b] + T) (padding included:
        decoding overwrites it in order before any query can see it)."""
        return dataclasses.replace(
            self, k=write_chunk(self.k, k, start), v=write_chunk(self.v, v, start)
        )

    def filled(self, context: int, key: jax.Array) -> HeadMajorKVCache:
        """Random keys and values in every slot (the slots past `context` are never read)."""
        k1, k2, _, _ = jax.random.split(key, 4)
        return dataclasses.replace(self, k=random_like(k1, self.k), v=random_like(k2, self.v))


class _GatheredSlots:
    """What `RecycledKVCache` and `SelectedKVCache` share: gathered slots kp, vp
    [B, Hkv, Kp, D] holding the positions idx int32 [B, Hkv, Kp] (-1 empty; slots [top_k, Kp)
    are padding), with Kp = top_k rounded up to the cache block."""

    @classmethod
    def zeros(
        cls,
        batch: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        top_k: int,
        dtype: Any = jnp.bfloat16,
        block: int = 64,
        **options: Any,
    ):
        """An empty cache; options are the class's own (`SelectedKVCache`: with_scores)."""
        shape = (batch, num_kv_heads, round_up(top_k, block), head_dim)
        slots = {
            "kp": jnp.zeros(shape, dtype),
            "vp": jnp.zeros(shape, dtype),
            "idx": jnp.full(shape[:3], -1, jnp.int32),
        }
        return cls.around_slots(slots, int(top_k), int(max_len), block, **options)

    @property
    def nbytes(self) -> int:
        return tree_nbytes(self)

    def slot_writes(
        self, k: jax.Array, v: jax.Array, start: jax.Array, lengths: jax.Array | None
    ) -> dict[str, jax.Array]:
        """kp, vp with the slots that hold one of the valid tokens' positions of k, v
        [B, T, Hkv, D] (positions [start[b], start[b] + lengths[b])) set to those tokens."""
        return {
            "kp": refresh_slots(self.kp, self.idx, k, start, lengths),
            "vp": refresh_slots(self.vp, self.idx, v, start, lengths),
        }

    def selected(self) -> jax.Array:
        """int32 [B, Hkv, K]: positions held by the live slots (-1 empty)."""
        return self.idx[..., : self.top_k]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("k", "v", "kp", "vp", "idx", "ptr", "step", "ref_q"),
    meta_fields=("top_k", "max_len"),
)
@dataclasses.dataclass
class RecycledKVCache(_GatheredSlots):
    """One layer's Recycled Attention state.

    k, v: [B, Hkv, Lp, D] the full cache C_f, head-major, slot j holds position j.
    kp, vp: [B, Hkv, Kp, D] the recycled cache C_p (a gathered copy of the selected tokens).
    idx: int32 [B, Hkv, Kp], the position held by each C_p entry, -1 when empty; entries
      [0, top_k) are live, sorted by ascending selection score at the last refresh (entries
      overwritten since hold generated tokens), entries [top_k, Kp) are padding, always -1.
    ptr: int32 [B], the C_p entry the next generated token goes to.
    step: int32 [], decode steps done since the prefill (the prefill is step 0).
    ref_q: float32 [B, D], the head-averaged query of the last full step (dynamic schedule).
    top_k: K (static); max_len: the logical capacity in tokens (static, <= Lp).
    """

    k: jax.Array
    v: jax.Array
    kp: jax.Array
    vp: jax.Array
    idx: jax.Array
    ptr: jax.Array
    step: jax.Array
    ref_q: jax.Array
    top_k: int
    max_len: int

    @classmethod
    def around_slots(
        cls, slots: dict[str, jax.Array], top_k: int, max_len: int, block: int
    ) -> RecycledKVCache:
        """An empty cache around the empty C_p slots (kp, vp, idx)."""
        batch, num_kv_heads, _, head_dim = slots["kp"].shape
        dtype = slots["kp"].dtype
        full = HeadMajorKVCache.zeros(batch, max_len, num_kv_heads, head_dim, dtype, block)
        return cls(
            k=full.k,
            v=full.v,
            **slots,
            ptr=jnp.zeros((batch,), jnp.int32),
            step=jnp.zeros((), jnp.int32),
            ref_q=jnp.zeros((batch, head_dim), jnp.float32),
            top_k=top_k,
            max_len=max_len,
        )

    def logical_axes(self) -> RecycledKVCache:
        return dataclasses.replace(
            self,
            k=KV_AXES,
            v=KV_AXES,
            kp=KV_AXES,
            vp=KV_AXES,
            idx=SLOT_AXES,
            ptr=("batch",),
            step=(),
            ref_q=("batch", "head_dim"),
        )

    def write(
        self, k: jax.Array, v: jax.Array, start: jax.Array, lengths: jax.Array | None = None
    ) -> RecycledKVCache:
        """Writes k, v [B, T, Hkv, D] into C_f at slots [start[b], start[b] + T), and into the
        C_p entries that hold one of the valid tokens' positions."""
        return dataclasses.replace(
            self,
            k=write_chunk(self.k, k, start),
            v=write_chunk(self.v, v, start),
            **self.slot_writes(k, v, start, lengths),
        )

    def filled(self, context: int, key: jax.Array) -> RecycledKVCache:
        """Random C_f, C_p a random selection of K of the `context` positions gathered from
        it, and a random last-refresh query."""
        k1, k2, k3, k4 = jax.random.split(key, 4)
        ck, cv = random_like(k1, self.k), random_like(k2, self.v)
        idx = _random_selection(k3, self.idx.shape, self.top_k, context)
        return dataclasses.replace(
            self,
            k=ck,
            v=cv,
            idx=idx,
            kp=gather_slots(ck, idx),
            vp=gather_slots(cv, idx),
            ref_q=jax.random.normal(k4, self.ref_q.shape, jnp.float32),
        )


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("kp", "vp", "idx", "acc"),
    meta_fields=("top_k", "max_len"),
)
@dataclasses.dataclass
class SelectedKVCache(_GatheredSlots):
    """One layer's K-slot cache of the eviction baselines (StreamingLLM, H2O): no full cache.

    kp, vp: [B, Hkv, Kp, D]; idx: int32 [B, Hkv, Kp] position per slot (-1 empty; slots
    [top_k, Kp) are padding); acc: float32 [B, Hkv, Kp] accumulated attention per slot (H2O;
    -inf for empty slots) or None (StreamingLLM).
    """

    kp: jax.Array
    vp: jax.Array
    idx: jax.Array
    acc: jax.Array | None
    top_k: int
    max_len: int

    @classmethod
    def around_slots(
        cls,
        slots: dict[str, jax.Array],
        top_k: int,
        max_len: int,
        block: int,
        with_scores: bool = False,
    ) -> SelectedKVCache:
        """An empty cache of the empty slots (kp, vp, idx), keeping scores when with_scores."""
        idx = slots["idx"]
        acc = jnp.full(idx.shape, -jnp.inf, jnp.float32) if with_scores else None
        return cls(**slots, acc=acc, top_k=top_k, max_len=max_len)

    def logical_axes(self) -> SelectedKVCache:
        return dataclasses.replace(
            self,
            kp=KV_AXES,
            vp=KV_AXES,
            idx=SLOT_AXES,
            acc=None if self.acc is None else SLOT_AXES,
        )

    def write(
        self, k: jax.Array, v: jax.Array, start: jax.Array, lengths: jax.Array | None = None
    ) -> SelectedKVCache:
        """Writes k, v [B, T, Hkv, D] (positions [start[b], start[b] + T)) into the slots that
        hold one of the valid tokens' positions."""
        return dataclasses.replace(self, **self.slot_writes(k, v, start, lengths))

    def filled(self, context: int, key: jax.Array, sink: int = 4) -> SelectedKVCache:
        """Random keys and values; the slots hold StreamingLLM's positions after `context`
        tokens (`sink` sinks, StreamingLLM's 4 by default) when the cache keeps no scores,
        else a random selection of K positions with random accumulated attention (H2O)."""
        k1, k2, k3, k4 = jax.random.split(key, 4)
        b, hkv, slots = self.idx.shape
        if self.acc is None:
            last = jnp.full((b,), context - 1, jnp.int32)
            idx = streaming_positions(last, self.top_k, sink, slots)
            idx = jnp.broadcast_to(idx[:, None], (b, hkv, slots))
            acc = None
        else:
            idx = _random_selection(k3, self.idx.shape, self.top_k, context)
            acc = jnp.where(idx >= 0, jax.random.uniform(k4, idx.shape), -jnp.inf)
        return dataclasses.replace(
            self, kp=random_like(k1, self.kp), vp=random_like(k2, self.vp), idx=idx, acc=acc
        )
