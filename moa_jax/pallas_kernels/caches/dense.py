"""The dense KV cache: a pytree with static shapes, one per layer.

`DenseKVCache` holds keys (after RoPE) and values at their absolute positions, slot j holds token
j. Memory: 2 * B * S * Hkv * D * itemsize bytes per layer. (MoA's span cache is `SpanKVCache`
in `span.py`; the head-major caches are in `head_major.py`.)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moa_jax.pallas_kernels.caches.protocol import random_like, tree_nbytes


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DenseKVCache:
    """One layer's dense cache. k, v: [B, S, Hkv, D]; slot j holds the token at position j.
    A `moa_jax.pallas_kernels.caches.protocol.KVCache`."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(
        cls, batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype=jnp.bfloat16
    ) -> DenseKVCache:
        shape = (batch, max_len, num_kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    def logical_axes(self) -> DenseKVCache:
        """Logical axis names of each leaf (see `moa_jax.parallel`)."""
        axes = ("batch", "seq", "kv_heads", "head_dim")
        return DenseKVCache(axes, axes)

    @property
    def max_len(self) -> int:
        return self.k.shape[1]

    def write(
        self, k: jax.Array, v: jax.Array, start: jax.Array, lengths: jax.Array | None = None
    ) -> DenseKVCache:
        """Writes T new tokens per row at slots [start[b], start[b] + T).

        Args:
          k, v: [B, T, Hkv, D].
          start: int [B], the position of each row's first new token. Callers guarantee
            start + T <= max_len (checked on the host by `generate`), since XLA clamps
            out-of-range slices instead of failing.
          lengths: not needed: padding lands in the slots of the positions after a row's last
            valid token, which decoding overwrites in order before any query can see them.
        """

        def put(buf, new, s):
            return jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), s, axis=0)

        return DenseKVCache(jax.vmap(put)(self.k, k, start), jax.vmap(put)(self.v, v, start))

    @property
    def nbytes(self) -> int:
        """Bytes of this cache: 2 * B * S * Hkv * D * itemsize."""
        return tree_nbytes(self)

    def filled(self, context: int, key: jax.Array) -> DenseKVCache:
        """Random keys and values in every slot (the slots past `context` are never read)."""
        k1, k2, _, _ = jax.random.split(key, 4)
        return DenseKVCache(random_like(k1, self.k), random_like(k2, self.v))
