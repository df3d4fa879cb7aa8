"""KV caches: pytrees with static shapes, one per layer.

- `DenseKVCache`: keys (after RoPE) and values at their absolute positions, slot j holds token j.
  Memory: 2 * B * S * Hkv * D * itemsize bytes per layer.
- `SpanKVCache`: MoA's heterogeneous cache, per KV head only the sink tokens and a ring buffer of
  the largest window of its query group (see its docstring for the layout and memory formula).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DenseKVCache:
    """One layer's dense cache. k, v: [B, S, Hkv, D]; slot j holds the token at position j."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(
        cls, batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype=jnp.bfloat16
    ) -> "DenseKVCache":
        shape = (batch, max_len, num_kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    def logical_axes(self) -> "DenseKVCache":
        """Logical axis names of each leaf (see `moa_jax.parallel`)."""
        axes = ("batch", "seq", "kv_heads", "head_dim")
        return DenseKVCache(axes, axes)

    @property
    def max_len(self) -> int:
        return self.k.shape[1]

    def write(self, k: jax.Array, v: jax.Array, start: jax.Array) -> "DenseKVCache":
        """Writes T new tokens per row at slots [start[b], start[b] + T).

        Args:
          k, v: [B, T, Hkv, D].
          start: int [B], the position of each row's first new token. Callers guarantee
            start + T <= max_len (checked on the host by `generate`), since XLA clamps
            out-of-range slices instead of failing.
        """

        def put(buf, new, s):
            return jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), s, axis=0)

        return DenseKVCache(jax.vmap(put)(self.k, k, start), jax.vmap(put)(self.v, v, start))

    @staticmethod
    def nbytes(
        batch: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        num_layers: int,
        dtype=jnp.bfloat16,
    ) -> int:
        """Total bytes of a model's dense cache."""
        return (
            2 * batch * max_len * num_kv_heads * head_dim * num_layers * jnp.dtype(dtype).itemsize
        )


def span_cache_layout(
    windows: Sequence[int], num_kv_heads: int, sink: int, max_len: int, block: int = 64
) -> tuple[int, tuple[int, ...]]:
    """Sink slots and per-KV-head ring sizes of a MoA span cache.

    Args:
      windows: per query head window in tokens (sinks not included), H entries, H a multiple of
        num_kv_heads; a KV head's ring serves the largest window of its query group.
      sink: sink tokens kept by every head (the first `sink` positions).
      max_len: the longest sequence the cache will see (prompt + new tokens).
      block: rings are rounded up to a multiple of this, then capped at what `max_len` needs.
    Returns:
      (sink slots, ring size per KV head).
    """
    h = len(windows)
    if h % num_kv_heads:
        raise ValueError(f"{h} query-head windows do not divide into {num_kv_heads} KV heads")
    if min(windows) < 1:
        raise ValueError(f"windows must be >= 1 token, got min {min(windows)}")
    group = h // num_kv_heads
    sink = min(int(sink), max_len)
    rings = []
    for g in range(num_kv_heads):
        w = max(int(x) for x in windows[g * group : (g + 1) * group])
        rings.append(max(1, min(-(-w // block) * block, max_len - sink)))
    return sink, tuple(rings)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("k", "v", "pos"),
    meta_fields=("sink", "rings", "block", "max_len", "shards"),
)
@dataclasses.dataclass
class SpanKVCache:
    """One layer's MoA cache: per KV head only its sink tokens and a ring of its span.

    Layout: one flat buffer per layer. KV head g owns the segment
    [offsets[g], offsets[g] + seg[g]) of `sink` sink slots followed by a ring of `rings[g]` slots,
    padded to a multiple of `block` (padding slots stay empty). Slot contents: k, v [B, M, D]
    (keys after RoPE, so slot order does not matter) and pos int32 [B, M], the absolute position
    held, -1 for an empty slot. Position p < sink lives in sink slot p; p >= sink in ring slot
    (p - sink) % rings[g], overwriting p - rings[g].

    Memory per layer: B * M * (2 * D * itemsize + 4) bytes with
    M = sum_g roundup(sink + rings[g], block), against B * max_len * Hkv * 2 * D * itemsize for
    the dense cache.

    Split over devices by heads (`shards` > 1, the mesh's `tensor` size): the KV heads form
    `shards` contiguous groups, each group's segments packed into its own stretch of M / shards
    slots (padded to the largest group), so splitting the slot axis evenly gives every device
    its own heads' segments (`shard`).
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    sink: int
    rings: tuple[int, ...]
    block: int
    max_len: int
    shards: int = 1

    @staticmethod
    def segment_sizes(sink: int, rings: Sequence[int], block: int) -> tuple[int, ...]:
        return tuple(-(-(sink + r) // block) * block for r in rings)

    @classmethod
    def zeros(
        cls,
        batch: int,
        windows: Sequence[int],
        num_kv_heads: int,
        sink: int,
        max_len: int,
        head_dim: int,
        dtype=jnp.bfloat16,
        block: int = 64,
        shards: int = 1,
    ) -> "SpanKVCache":
        """An empty cache sized by `span_cache_layout` for sequences of up to max_len tokens,
        its KV heads packed in `shards` groups."""
        if num_kv_heads % shards:
            raise ValueError(f"{num_kv_heads} KV heads do not split into {shards} shards")
        sink, rings = span_cache_layout(windows, num_kv_heads, sink, max_len, block)
        sizes = cls.segment_sizes(sink, rings, block)
        per = num_kv_heads // shards
        m = shards * max(sum(sizes[i * per : (i + 1) * per]) for i in range(shards))
        return cls(
            jnp.zeros((batch, m, head_dim), dtype),
            jnp.zeros((batch, m, head_dim), dtype),
            jnp.full((batch, m), -1, jnp.int32),
            sink,
            rings,
            int(block),
            int(max_len),
            int(shards),
        )

    def holds_window(self, g: int, window: int) -> bool:
        """Whether KV head g's ring keeps every key a query head with this window needs, for
        sequences up to max_len (a ring capped at max_len - sink holds everything)."""
        return window <= self.rings[g] or self.rings[g] >= self.max_len - self.sink

    @property
    def num_kv_heads(self) -> int:
        return len(self.rings)

    @property
    def offsets(self) -> tuple[int, ...]:
        """First slot of each KV head's segment."""
        sizes = self.segment_sizes(self.sink, self.rings, self.block)
        per, stretch = self.num_kv_heads // self.shards, self.k.shape[1] // self.shards
        out = []
        for i in range(self.shards):
            group = sizes[i * per : (i + 1) * per]
            out += [i * stretch + int(x) for x in np.cumsum((0,) + group[:-1])]
        return tuple(out)

    def shard(self, i: int, k: jax.Array, v: jax.Array, pos: jax.Array) -> "SpanKVCache":
        """Shard i's own cache, over its slots k, v [B, M / shards, D] and pos."""
        per = self.num_kv_heads // self.shards
        return dataclasses.replace(
            self, k=k, v=v, pos=pos, rings=self.rings[i * per : (i + 1) * per], shards=1
        )

    def slot_heads(self) -> np.ndarray:
        """int [M]: the KV head owning each slot (padding slots: their group's last head)."""
        return self._slot_layout()[0]

    def logical_axes(self) -> "SpanKVCache":
        slots = "kv_slots" if self.shards > 1 else "seq"  # packed by head groups: split them
        return dataclasses.replace(
            self,
            k=("batch", slots, "head_dim"),
            v=("batch", slots, "head_dim"),
            pos=("batch", slots),
        )

    def _slot_layout(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per slot (numpy, [M]): owning KV head, kind (0 sink, 1 ring, 2 padding), index."""
        heads, kinds, index = [], [], []
        sizes = self.segment_sizes(self.sink, self.rings, self.block)
        per, stretch = self.num_kv_heads // self.shards, self.k.shape[1] // self.shards
        for g, (r, size) in enumerate(zip(self.rings, sizes)):
            heads += [g] * size
            kinds += [0] * self.sink + [1] * r + [2] * (size - self.sink - r)
            index += list(range(self.sink)) + list(range(r)) + [0] * (size - self.sink - r)
            if (g + 1) % per == 0:  # the group's stretch ends: pad it
                pad = (g + 1) // per * stretch - len(heads)
                heads += [g] * pad
                kinds += [2] * pad
                index += [0] * pad
        return (
            np.asarray(heads, np.int32),
            np.asarray(kinds, np.int32),
            np.asarray(index, np.int32),
        )

    def write(
        self, k: jax.Array, v: jax.Array, start: jax.Array, lengths: jax.Array | None = None
    ) -> "SpanKVCache":
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
        lengths = jnp.full((b,), t, jnp.int32) if lengths is None else lengths
        heads, kinds, index = (jnp.asarray(a) for a in self._slot_layout())
        rings = jnp.asarray(self.rings, jnp.int32)[heads]
        last = (start + lengths - 1)[:, None]  # [B, 1]
        # Newest position p <= last held by each ring slot: p = sink + i + R * n.
        n = jnp.floor_divide(last - self.sink - index[None], rings[None])
        ring_pos = self.sink + index[None] + rings[None] * n
        p = jnp.where(kinds[None] == 0, index[None], ring_pos)
        take = (
            (kinds[None] != 2)
            & (p <= last)
            & (p >= start[:, None])
            & ((kinds[None] == 0) | (p >= self.sink))
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

    def _append(self, k: jax.Array, v: jax.Array, position: jax.Array) -> "SpanKVCache":
        """One token per row ([B, Hkv, D] at position [B]) by an in-place scatter."""
        offsets = jnp.asarray(self.offsets, jnp.int32)
        rings = jnp.asarray(self.rings, jnp.int32)
        p = position[:, None]
        slot = offsets[None] + jnp.where(
            p < self.sink, p, self.sink + jnp.remainder(p - self.sink, rings[None])
        )
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

    def nbytes(self) -> int:
        return int(self.k.nbytes + self.v.nbytes + self.pos.nbytes)
