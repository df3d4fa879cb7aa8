"""Attention layers: the stateless role and the cached role.

Every attention layer of the model calls one attention object, in one of three modes chosen by
the caller (`moa_jax.models.causal_lm.CausalLM`'s `mode`, MaxText's model_mode):

    'stateless':  out = attention(q, k, v, layer=i, positions=positions)
    'prefill':    out, cache = attention.prefill(q, k, v, layer=i, positions=positions,
                                                 cache=cache, lengths=lengths)
    'decode':     out, cache = attention.decode_step(q, k, v, layer=i, positions=positions,
                                                     cache=cache)

with q [B, T, H, D], k/v [B, T, Hkv, D] (after RoPE; T = 1 for a decode step), positions int
[B, T] (absolute, contiguous per row) and `cache` the layer's cache pytree (one per layer, from
`init_cache`). Stateless attention (training, search, scoring, a prefill without a cache)
attends within the given tokens; `Attention` is that role. `CachedAttention` adds the cache:
the prompt's prefill (a right-padded chunk: `lengths` int [B] gives the valid tokens per row, so
caches whose slots are not simply positions, ring buffers, do not store the padding) and the
one-token decode step. A backend that wants the queries before RoPE (`wants_pre_rope_query`)
also gets them as `q_pre_rope=` [B, T, H, D] in the cached calls.

Backends are frozen dataclasses, so they are hashable and travel as static `jit` arguments.
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

MODES = ("stateless", "prefill", "decode")


class Attention(abc.ABC):
    """Stateless attention: the tokens of a call attend among themselves (module docstring)."""

    @abc.abstractmethod
    def __call__(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        *,
        layer: int,
        positions: jax.Array,
        lengths: jax.Array | None = None,
    ) -> jax.Array:
        """Causal attention of q to k/v of the same tokens; returns out [B, T, H, D]."""

    def probe(
        self, q: jax.Array, k: jax.Array, v: jax.Array, *, layer: int, positions: jax.Array
    ) -> Any:
        """What the backend reports of layer `layer` besides its output, returned per layer by
        `CausalLM.hidden_states` in stateless mode (e.g. the attention mass some rows put on some
        keys); None by default."""
        return None

    @property
    def wants_pre_rope_query(self) -> bool:
        """True when the backend's cached calls take `q_pre_rope=` (the queries before RoPE,
        [B, T, H, D]) and the model should pass them (Recycled Attention's dynamic refresh
        rule)."""
        return False

    @property
    def layer_uniform(self) -> bool:
        """True when the backend treats every layer alike (it ignores `layer`) and every layer's
        cache has one shape, so the decoder layers can run as one `lax.scan`
        (`moa_jax.models.decoder.scan_layers`)."""
        return False

    @property
    def applies_model_window(self) -> bool:
        """True when the backend applies the model's own sliding window
        (`ModelConfig.model_window`, Mistral's and Qwen2's `sliding_window`) where the model
        has one: the backends `moa_jax.methods.build_attention` makes for such a model. The
        decoder refuses any other backend on a windowed layer when the context is longer than
        the window (`causal_lm.check_model_window`)."""
        return False

    def on_mesh(self, mesh: Any) -> Attention:
        """This backend for arrays laid out on `mesh`. Backends that run Pallas kernels have a
        `mesh` field, set here, and run them under `shard_map` (`pallas_kernels.sharding`); jnp
        backends are partitioned by XLA and return themselves."""
        if dataclasses.is_dataclass(self) and any(
            f.name == "mesh" for f in dataclasses.fields(self)
        ):
            return dataclasses.replace(self, mesh=mesh)
        return self


class CachedAttention(Attention):
    """Attention with a KV cache: `init_cache`, the prompt's `prefill` and the one-token
    `decode_step` (module docstring), besides the stateless call."""

    @abc.abstractmethod
    def init_cache(
        self, cfg: ModelConfig, batch: int, max_len: int, dtype: Any = jnp.bfloat16
    ) -> tuple[Any, ...]:
        """Returns one empty cache per layer for `batch` rows of up to `max_len` tokens."""

    @abc.abstractmethod
    def prefill(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        *,
        layer: int,
        positions: jax.Array,
        cache: Any,
        lengths: jax.Array | None = None,
        q_pre_rope: jax.Array | None = None,
    ) -> tuple[jax.Array, Any]:
        """The prompt's tokens (q [B, T, H, D]) into the cache; returns out [B, T, H, D] and the
        updated cache."""

    @abc.abstractmethod
    def decode_step(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        *,
        layer: int,
        positions: jax.Array,
        cache: Any,
        q_pre_rope: jax.Array | None = None,
    ) -> tuple[jax.Array, Any]:
        """One new token per row (q [B, 1, H, D]) against the cache; returns out [B, 1, H, D]
        and the updated cache."""

    def decode_kv_tokens(self, cache: Any, live: float) -> float:
        """Mean KV tokens a decode step reads per row and KV head from one layer's `cache`
        when the rows hold `live` tokens (the memory-traffic floor of the decode benchmark).
        Every token, unless the backend keeps fewer."""
        return float(live)


@dataclasses.dataclass(frozen=True)
class DenseAttention(CachedAttention):
    """Full causal attention over a dense cache, computed by the jnp reference in float32."""

    layer_uniform = True

    def init_cache(self, cfg, batch, max_len, dtype=jnp.bfloat16):
        return tuple(
            DenseKVCache.zeros(batch, max_len, cfg.num_kv_heads, cfg.head_dim, dtype)
            for _ in range(cfg.num_layers)
        )

    def __call__(self, q, k, v, *, layer, positions, lengths=None):
        return mha_reference(q, k, v, causal_mask(positions, positions))

    def _cached(self, q, k, v, positions, cache):
        # Slot j holds position j, so padding written here is overwritten in order by decoding
        # and never visible to a real query (causal mask): `lengths` is not needed.
        cache = cache.write(k, v, positions[:, 0])
        mask = causal_mask(positions, jnp.arange(cache.max_len, dtype=positions.dtype))
        return mha_reference(q, cache.k, cache.v, mask), cache

    def prefill(self, q, k, v, *, layer, positions, cache, lengths=None, q_pre_rope=None):
        return self._cached(q, k, v, positions, cache)

    def decode_step(self, q, k, v, *, layer, positions, cache, q_pre_rope=None):
        return self._cached(q, k, v, positions, cache)
