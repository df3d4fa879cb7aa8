"""MoA's span KV cache: per KV head only its sink tokens and a ring of its group's largest window.

The layout is a `MoASchedule`'s (`schedule.py`), which the cache carries as static metadata, so
the decode kernels (`decode/span_triton.py`, `decode/span_tpu.py`) read the same schedule the
cache was built from.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from moa_jax.pallas_kernels.caches.protocol import random_like, tree_nbytes
from moa_jax.pallas_kernels.caches.schedule import MoASchedule


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=("k", "v", "pos"), meta_fields=("schedule",)
)
@dataclasses.dataclass
class SpanKVCache:
    """One layer's MoA cache over the flat slot layout of `schedule` (a
    `caches.protocol.KVCache`).

    Slot contents: k, v [B, M, D] (keys after RoPE, so slot order does not matter) and pos int32
    [B, M], the absolute position held, -1 for an empty slot; M = schedule.slots. Position
    p < sink_slots lives in sink slot p of each KV head g, p >= sink_slots in ring slot
    (p - sink_slots) % rings[g], overwriting p - rings[g].

    Memory per layer: B * M * (2 * D * itemsize + 4) bytes with
    M = sum_g roundup(sink_slots + rings[g], block), against B * max_len * Hkv * 2 * D * itemsize
    for the dense cache.
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    schedule: MoASchedule

    @classmethod
    def zeros(
        cls, batch: int, schedule: MoASchedule, head_dim: int, dtype=jnp.bfloat16
    ) -> SpanKVCache:
        """An empty cache laid out by `schedule`."""
        shape = (batch, schedule.slots, head_dim)
        return cls(
            jnp.zeros(shape, dtype),
            jnp.zeros(shape, dtype),
            jnp.full(shape[:2], -1, jnp.int32),
            schedule,
        )

    @property
    def num_kv_heads(self) -> int:
        return self.schedule.num_kv_heads

    def shard(self, i: int, k: jax.Array, v: jax.Array, pos: jax.Array) -> SpanKVCache:
        """Shard i's own cache, over its slots k, v [B, M / shards, D] and pos."""
        return SpanKVCache(k, v, pos, self.schedule.shard(i))

    def logical_axes(self) -> SpanKVCache:
        """Logical axis names of each leaf (see `moa_jax.parallel`)."""
        slots = "kv_slots" if self.schedule.shards > 1 else "seq"  # packed by head groups
        return dataclasses.replace(
            self,
            k=("batch", slots, "head_dim"),
            v=("batch", slots, "head_dim"),
            pos=("batch", slots),
        )

    def write(
        self, k: jax.Array, v: jax.Array, start: jax.Array, lengths: jax.Array | None = None
    ) -> SpanKVCache:
        """Writes a chunk of tokens at positions [start[b], start[b] + T), the first lengths[b]
        of them valid (the rest is padding and is not written).

        Every slot takes the newest valid chunk position that maps to it, so the result equals
        writing the tokens one by one.

        Args:
          k, v: [B, T, Hkv, D]; start: int [B]; lengths: int [B] (default T).
        """
        b, t, hkv, d = k.shape
        if hkv != self.num_kv_heads:
            raise ValueError(f"cache has {self.num_kv_heads} KV heads, got k with {hkv}")
        if t == 1 and lengths is None:
            return self._append(k[:, 0], v[:, 0], start)
        sink = self.schedule.sink_slots
        lengths = jnp.full((b,), t, jnp.int32) if lengths is None else lengths
        heads, kinds, index = (jnp.asarray(a) for a in self.schedule.slot_layout())
        rings = jnp.asarray(self.schedule.rings, jnp.int32)[heads]
        last = (start + lengths - 1)[:, None]  # [B, 1]
        # Newest position p <= last held by each ring slot: p = sink + i + R * n.
        n = jnp.floor_divide(last - sink - index[None], rings[None])
        ring_pos = sink + index[None] + rings[None] * n
        p = jnp.where(kinds[None] == 0, index[None], ring_pos)
        take = (
            (kinds[None] != 2)
            & (p <= last)
            & (p >= start[:, None])
            & ((kinds[None] == 0) | (p >= sink))
        )
        src = jnp.clip(p - start[:, None], 0, t - 1)
        rows = jnp.arange(b)[:, None]
        new_k = k[rows, src, heads[None]]
        new_v = v[rows, src, heads[None]]
        return dataclasses.replace(
            self,
            k=jnp.where(take[..., None], new_k.astype(self.k.dtype), self.k),
            v=jnp.where(take[..., None], new_v.astype(self.v.dtype), self.v),
            pos=jnp.where(take, p, self.pos),
        )

    def _append(self, k: jax.Array, v: jax.Array, position: jax.Array) -> SpanKVCache:
        """One token per row ([B, Hkv, D] at position [B]) by an in-place scatter."""
        sink = self.schedule.sink_slots
        offsets = jnp.asarray(self.schedule.offsets, jnp.int32)
        rings = jnp.asarray(self.schedule.rings, jnp.int32)
        p = position[:, None]
        slot = offsets[None] + jnp.where(p < sink, p, sink + jnp.remainder(p - sink, rings[None]))
        rows = jnp.arange(k.shape[0])[:, None]
        # The barrier keeps XLA from fusing the K/V projections into the scatter: at batch 1 it
        # does, and the fused scatter recomputes them serially (~70 us per layer on an H200).
        k, v = jax.lax.optimization_barrier((k.astype(self.k.dtype), v.astype(self.v.dtype)))
        put = dict(unique_indices=True, mode="promise_in_bounds")  # one slot per (row, head)
        return dataclasses.replace(
            self,
            k=self.k.at[rows, slot].set(k, **put),
            v=self.v.at[rows, slot].set(v, **put),
            pos=self.pos.at[rows, slot].set(jnp.broadcast_to(p, slot.shape), **put),
        )

    @property
    def nbytes(self) -> int:
        """Bytes of this cache: B * M * (2 * D * itemsize + 4)."""
        return tree_nbytes(self)

    def filled(self, context: int, key: jax.Array) -> SpanKVCache:
        """The slots a prompt of `context` tokens fills (each head's sinks and last span), with
        random keys and values."""
        b, _, d = self.k.shape
        k1, k2, _, _ = jax.random.split(key, 4)
        one = jnp.zeros((b, 1, self.num_kv_heads, d), self.k.dtype)
        c = self.write(one, one, jnp.zeros((b,), jnp.int32), jnp.full((b,), context, jnp.int32))
        return dataclasses.replace(c, k=random_like(k1, c.k), v=random_like(k2, c.v))
