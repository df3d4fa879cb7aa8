"""MoA attention backend: per-head sliding windows plus sinks from a `Plan`.

Each layer's plan is resolved once into a `MoASchedule` (`schedule`: windows and sinks per query
head, the span cache's layout, the decode kernels' tables), which is passed on:

- Stateless (scoring, training, profiling): the block-sparse Pallas kernel
  (`moa_jax.pallas_kernels.sparse_attention`) with the schedule's windows and sinks. The tokens of
  a call are taken to sit at positions [0, T) (as `forward` gives them without a cache), since
  sinks are absolute positions.
- Cached (`generate`): a `SpanKVCache` per layer laid out by the schedule, which it carries: for
  each KV head only the sink tokens and a ring of the largest window of its query group.
  `prefill` (positions [0, T), an empty cache) runs the block-sparse kernel, then the chunk
  write that keeps each head's sinks and last span (skipping right padding through `lengths`).
  `decode_step` appends the token, then runs the split-K span decode kernel
  (`moa_jax.pallas_kernels.span_decode`), which reads the cache's schedule.

Windows are resolved at `length` if given, else at the length of the call (T without a cache,
the cache's max_len with one, i.e. prompt + new tokens as in the reference), so prefill and
decode use the same windows and the decode cache footprint equals the prefill window.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from moa_jax.config import ModelConfig
from moa_jax.models.attention import CachedAttention
from moa_jax.pallas_kernels.caches.schedule import MoASchedule
from moa_jax.pallas_kernels.caches.span import SpanKVCache
from moa_jax.pallas_kernels.sharding import (
    head_shards,
    span_decode_on_mesh,
    sparse_attention_on_mesh,
)
from moa_jax.plan import Plan


@dataclasses.dataclass(frozen=True)
class MoAAttention(CachedAttention):
    """Args:
    plan: the compression plan ([layers][query heads] rules and sinks).
    length: input length N at which the plan is resolved (None: the call's length).
    windows: explicit resolved windows [layers][heads] (overrides plan.resolve; static tuple).
    block_q, block_k: kernel block sizes (None: the kernel's defaults).
    kernel_backend: 'auto' | 'gpu' (Triton) | 'mgpu' (Mosaic GPU prefill, Triton decode) |
      'tpu' | 'reference' (see `sparse_attention`).
    interpret: Pallas interpret mode (None: automatic, True on CPU).
    mesh: device mesh: the prefill and decode kernels run under `shard_map`, rows over
      data x fsdp and heads over tensor, each device with its heads' windows, and the span
      cache is packed by device (`pallas_kernels.sharding`); set by `generate(mesh=...)`.
    """

    plan: Plan
    length: int | None = None
    windows: tuple[tuple[int, ...], ...] | None = None
    block_q: int | None = None
    block_k: int | None = None
    kernel_backend: str = "auto"
    interpret: bool | None = None
    mesh: Mesh | None = None

    def __post_init__(self):
        if self.windows is not None:
            w = tuple(tuple(int(x) for x in row) for row in self.windows)
            if (len(w), len(w[0])) != self.plan.shape:
                raise ValueError(
                    f"windows are {len(w)}x{len(w[0])} but the plan is "
                    f"{self.plan.shape[0]}x{self.plan.shape[1]}"
                )
            object.__setattr__(self, "windows", w)

    def layer_windows(self, layer: int, n: int) -> tuple[int, ...]:
        if self.windows is not None:
            return self.windows[layer]
        return self.plan.layer_windows(self.length or n, layer)

    def schedule(self, layer: int, max_len: int, num_kv_heads: int, shards: int = 1) -> MoASchedule:
        """Layer `layer`'s schedule for sequences of up to max_len tokens (resolved at `length`
        if set, else at max_len)."""
        # Mosaic TPU blocks need 128 lanes; 64 is the reference's granularity elsewhere.
        block = 128 if jax.default_backend() == "tpu" else 64
        if self.windows is not None:
            return MoASchedule.build(
                self.windows[layer],
                self.plan.layer_sinks(layer),
                num_kv_heads,
                max_len,
                block=block,
                shards=shards,
            )
        return self.plan.schedule(
            self.length or max_len,
            layer,
            num_kv_heads,
            max_len=max_len,
            block=block,
            shards=shards,
        )

    @property
    def applies_model_window(self) -> bool:
        """True when the plan is composed with the model's own sliding window
        (`Plan.within_model_window`) and its windows are not overridden."""
        return self.plan.model_windows is not None and self.windows is None

    def resolves_dense(self, n: int) -> bool:
        """Whether every head of every layer keeps all of a length-n input (window >= n)."""
        return all(min(self.layer_windows(layer, n)) >= n for layer in range(self.plan.shape[0]))

    def init_cache(self, cfg: ModelConfig, batch: int, max_len: int, dtype: Any = jnp.bfloat16):
        self.plan.validate(cfg)
        if self.plan.model_windows is not None and self.plan.within_model_window(cfg) != self.plan:
            raise ValueError(
                f"the plan is composed with model windows {self.plan.model_windows}, which "
                "are not this model's"
            )
        shards = head_shards(self.mesh, cfg.num_kv_heads)
        return tuple(
            SpanKVCache.zeros(
                batch, self.schedule(layer, max_len, cfg.num_kv_heads, shards), cfg.head_dim, dtype
            )
            for layer in range(cfg.num_layers)
        )

    def _check_heads(self, q: jax.Array) -> None:
        h = q.shape[2]
        if h != self.plan.num_heads:
            raise ValueError(f"plan has {self.plan.num_heads} heads, the model {h}")

    def _sparse(self, q, k, v, sched: MoASchedule) -> jax.Array:
        return sparse_attention_on_mesh(
            q,
            k,
            v,
            self.mesh,
            windows=sched.windows,
            sinks=sched.sinks,
            backend=self.kernel_backend,
            interpret=self.interpret,
            block_q=self.block_q,
            block_k=self.block_k,
        )

    def __call__(self, q, k, v, *, layer, positions, lengths=None):
        self._check_heads(q)
        return self._sparse(q, k, v, self.schedule(layer, q.shape[1], k.shape[2]))

    def prefill(self, q, k, v, *, layer, positions, cache, lengths=None, q_pre_rope=None):
        self._check_heads(q)
        out = self._sparse(q, k, v, cache.schedule)
        return out, cache.write(k, v, positions[:, 0], lengths)

    def decode_kv_tokens(self, cache: SpanKVCache, live: float) -> float:
        # the filled slots: each KV head's sinks and ring, never more than its span
        rows, heads = cache.pos.shape[0], cache.num_kv_heads
        return float(np.asarray(cache.pos >= 0).sum()) / (rows * heads)

    def decode_step(self, q, k, v, *, layer, positions, cache, q_pre_rope=None):
        self._check_heads(q)
        cache = cache.write(k, v, positions[:, 0])
        out = span_decode_on_mesh(
            q[:, 0],
            cache,
            positions[:, 0],
            self.mesh,
            backend=self.kernel_backend,
            interpret=self.interpret,
        )
        return out[:, None], cache
