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
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

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


def _nbytes(cache: Any) -> int:
    return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(cache)))


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
    ) -> "HeadMajorKVCache":
        shape = (batch, num_kv_heads, round_up(max_len, block), head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), int(max_len))

    def logical_axes(self) -> "HeadMajorKVCache":
        return dataclasses.replace(self, k=KV_AXES, v=KV_AXES)

    def nbytes(self) -> int:
        return _nbytes(self)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("k", "v", "kp", "vp", "idx", "ptr", "step", "ref_q"),
    meta_fields=("top_k", "max_len"),
)
@dataclasses.dataclass
class RecycledKVCache:
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
    def zeros(
        cls,
        batch: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        top_k: int,
        dtype: Any = jnp.bfloat16,
        block: int = 64,
    ) -> "RecycledKVCache":
        full = HeadMajorKVCache.zeros(batch, max_len, num_kv_heads, head_dim, dtype, block)
        sel = SelectedKVCache.zeros(batch, max_len, num_kv_heads, head_dim, top_k, dtype, block)
        return cls(
            full.k,
            full.v,
            sel.kp,
            sel.vp,
            sel.idx,
            jnp.zeros((batch,), jnp.int32),
            jnp.zeros((), jnp.int32),
            jnp.zeros((batch, head_dim), jnp.float32),
            int(top_k),
            int(max_len),
        )

    def logical_axes(self) -> "RecycledKVCache":
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

    def nbytes(self) -> int:
        return _nbytes(self)

    def selected(self) -> jax.Array:
        """int32 [B, Hkv, K]: positions held by the live C_p entries (-1 empty)."""
        return self.idx[..., : self.top_k]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("kp", "vp", "idx", "acc"),
    meta_fields=("top_k", "max_len"),
)
@dataclasses.dataclass
class SelectedKVCache:
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
    def zeros(
        cls,
        batch: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        top_k: int,
        dtype: Any = jnp.bfloat16,
        block: int = 64,
        with_scores: bool = False,
    ) -> "SelectedKVCache":
        sel = (batch, num_kv_heads, round_up(top_k, block), head_dim)
        acc = jnp.full(sel[:3], -jnp.inf, jnp.float32) if with_scores else None
        return cls(
            jnp.zeros(sel, dtype),
            jnp.zeros(sel, dtype),
            jnp.full(sel[:3], -1, jnp.int32),
            acc,
            int(top_k),
            int(max_len),
        )

    def logical_axes(self) -> "SelectedKVCache":
        return dataclasses.replace(
            self,
            kp=KV_AXES,
            vp=KV_AXES,
            idx=SLOT_AXES,
            acc=None if self.acc is None else SLOT_AXES,
        )

    def nbytes(self) -> int:
        return _nbytes(self)

    def selected(self) -> jax.Array:
        """int32 [B, Hkv, K]: positions held by the live slots (-1 empty)."""
        return self.idx[..., : self.top_k]
