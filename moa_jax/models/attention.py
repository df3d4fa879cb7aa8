"""Pluggable attention backends.

Every attention layer of the model calls one backend object:

    out, new_cache = backend(q, k, v, layer=i, positions=positions, cache=cache)

with q [B, T, H, D], k/v [B, T, Hkv, D] (after RoPE), positions int [B, T] (absolute, contiguous
per row) and `cache` the layer's cache pytree or None (no cache: attend within the given tokens).
A right-padded chunk (generate's prefill) also passes `lengths=` int [B], the valid tokens per
row; caches whose slots are not simply positions (ring buffers) must not store the padding.
Backends are frozen dataclasses, so they are hashable and travel as static `jit` arguments; the
sparse backends (MoA plans, recycled attention) implement the same two methods.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from moa_jax.config import ModelConfig
from moa_jax.pallas_kernels.caches.dense import DenseKVCache
from moa_jax.pallas_kernels.reference import causal_mask, mha_reference


class AttentionBackend(abc.ABC):
    """Interface of an attention backend (see module docstring)."""

    @abc.abstractmethod
    def init_cache(
        self, cfg: ModelConfig, batch: int, max_len: int, dtype: Any = jnp.bfloat16
    ) -> tuple[Any, ...]:
        """Returns one empty cache per layer for `batch` rows of up to `max_len` tokens."""

    @abc.abstractmethod
    def __call__(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        *,
        layer: int,
        positions: jax.Array,
        cache: Any | None,
        lengths: jax.Array | None = None,
    ) -> tuple[jax.Array, Any | None]:
        """Attends q to k/v (and the cache); returns out [B, T, H, D] and the updated cache."""

    @property
    def wants_pre_rope_query(self) -> bool:
        """True when the backend's `__call__` takes `q_pre_rope=` (the queries before RoPE, [B, T,
        H, D]) and the model should pass them (Recycled Attention's dynamic refresh rule)."""
        return False

    @property
    def layer_uniform(self) -> bool:
        """True when the backend treats every layer alike (it ignores `layer`) and every layer's
        cache has one shape, so the decoder layers can run as one `lax.scan`
        (`moa_jax.models.llama.scan_layers`)."""
        return False

    def on_mesh(self, mesh: Any) -> "AttentionBackend":
        """This backend for arrays laid out on `mesh`. Backends that run Pallas kernels have a
        `mesh` field, set here, and run them under `shard_map` (`head_sharding`); jnp backends
        are partitioned by XLA and return themselves."""
        if dataclasses.is_dataclass(self) and any(
            f.name == "mesh" for f in dataclasses.fields(self)
        ):
            return dataclasses.replace(self, mesh=mesh)
        return self


@dataclasses.dataclass(frozen=True)
class DenseAttention(AttentionBackend):
    """Full causal attention over a dense cache, computed by the jnp reference in float32."""

    layer_uniform = True

    def init_cache(self, cfg, batch, max_len, dtype=jnp.bfloat16):
        return tuple(
            DenseKVCache.zeros(batch, max_len, cfg.num_kv_heads, cfg.head_dim, dtype)
            for _ in range(cfg.num_layers)
        )

    def __call__(self, q, k, v, *, layer, positions, cache, lengths=None):
        # Slot j holds position j, so padding written here is overwritten in order by decoding
        # and never visible to a real query (causal mask): `lengths` is not needed.
        if cache is None:
            return mha_reference(q, k, v, causal_mask(positions, positions)), None
        cache = cache.write(k, v, positions[:, 0])
        mask = causal_mask(positions, jnp.arange(cache.max_len, dtype=positions.dtype))
        return mha_reference(q, cache.k, cache.v, mask), cache
