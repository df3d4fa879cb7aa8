"""`KVCache`: what every layer cache of the package offers, whatever its layout.

The caches (`caches.dense.DenseKVCache`, `caches.span.SpanKVCache`, and the head-major
`caches.head_major` ones) differ in what they keep, but each one is a pytree with static shapes
and these four members, so code that only stores, shards, sizes or benchmarks caches (the memory
check of `generate`, the decode benchmark, `moa_jax.parallel.cache_shardings`) never asks which
cache it holds.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp


@runtime_checkable
class KVCache(Protocol):
    """One layer's KV cache (module docstring)."""

    def write(
        self, k: jax.Array, v: jax.Array, start: jax.Array, lengths: jax.Array | None = None
    ) -> KVCache:
        """The cache with the tokens k, v [B, T, Hkv, D] (after RoPE) at positions
        [start[b], start[b] + T) written wherever it keeps them; `lengths` int [B] (default T)
        marks the first lengths[b] tokens of row b as valid, the rest as padding."""
        ...

    def logical_axes(self) -> KVCache:
        """The cache with each array leaf replaced by its logical axis names
        (`moa_jax.parallel`)."""
        ...

    @property
    def nbytes(self) -> int:
        """Bytes of this cache's arrays (also of an abstract cache from `jax.eval_shape`)."""
        ...

    def filled(self, context: int, key: jax.Array) -> KVCache:
        """The cache as a prompt of `context` tokens leaves it: random keys and values, and a
        valid state for every field the decode step reads (the decode benchmark's caches)."""
        ...


def tree_nbytes(cache: Any) -> int:
    """Bytes of a pytree's array leaves, concrete or abstract (`jax.ShapeDtypeStruct`)."""
    return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(cache)))


def random_like(key: jax.Array, x: jax.Array) -> jax.Array:
    """Standard normal values of x's shape and dtype (drawn in float32)."""
    return jax.random.normal(key, x.shape, jnp.float32).astype(x.dtype)
