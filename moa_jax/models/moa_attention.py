"""MoA attention backend: per-head sliding windows plus sinks from a `Plan`.

- No cache (prefill, training, scoring): the block-sparse Pallas kernel
  (`moa_jax.pallas_kernels.sparse_attention`) with the layer's resolved windows and sinks. The
  tokens of a call are taken to sit at positions [0, T) (as `forward` gives them without a cache),
  since sinks are absolute positions.
- With a cache (decode, chunked prefill): a simple, correct fallback: the dense cache of
  `DenseAttention`, then the jnp reference attention under `window_sink_mask` with the same windows.
  The memory-saving per-head cache and its decode kernel are separate work.

Windows are resolved once per backend (static): at `length` if given, else at the length of the
call (T without a cache, the cache's max_len with one). Give `length` when prefill and decode must
use the same windows, as MoA does (windows for the whole sequence, prompt + new tokens).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from moa_jax.config import ModelConfig
from moa_jax.models.attention import AttentionBackend
from moa_jax.models.kv_cache import DenseKVCache
from moa_jax.pallas_kernels import sparse_attention
from moa_jax.pallas_kernels.reference import mha_reference, window_sink_mask
from moa_jax.plan import Plan


@dataclasses.dataclass(frozen=True)
class MoAAttention(AttentionBackend):
    """Args:
      plan: the compression plan ([layers][query heads] rules and sinks).
      length: input length N at which the plan is resolved (None: the call's length).
      windows: explicit resolved windows [layers][heads] (overrides plan.resolve; static tuple).
      block_q, block_k: kernel block sizes (None: the kernel's defaults).
      kernel_backend: 'auto' | 'gpu' | 'tpu' | 'reference' (see `sparse_attention`).
      interpret: Pallas interpret mode (None: automatic, True on CPU).
    """

    plan: Plan
    length: int | None = None
    windows: tuple[tuple[int, ...], ...] | None = None
    block_q: int | None = None
    block_k: int | None = None
    kernel_backend: str = "auto"
    interpret: bool | None = None

    def __post_init__(self):
        if self.windows is not None:
            w = tuple(tuple(int(x) for x in row) for row in self.windows)
            if (len(w), len(w[0])) != self.plan.shape:
                raise ValueError(f"windows are {len(w)}x{len(w[0])} but the plan is "
                                 f"{self.plan.shape[0]}x{self.plan.shape[1]}")
            object.__setattr__(self, "windows", w)

    def layer_windows(self, layer: int, n: int) -> tuple[int, ...]:
        if self.windows is not None:
            return self.windows[layer]
        return self.plan.layer_windows(self.length or n, layer)

    def init_cache(self, cfg: ModelConfig, batch: int, max_len: int, dtype: Any = jnp.bfloat16):
        self.plan.validate(cfg)
        return tuple(DenseKVCache.zeros(batch, max_len, cfg.num_kv_heads, cfg.head_dim, dtype)
                     for _ in range(cfg.num_layers))

    def __call__(self, q, k, v, *, layer, positions, cache):
        h = q.shape[2]
        if h != self.plan.num_heads:
            raise ValueError(f"plan has {self.plan.num_heads} heads, the model {h}")
        sinks = self.plan.layer_sinks(layer)
        if cache is None:
            windows = self.layer_windows(layer, q.shape[1])
            out = sparse_attention(q, k, v, windows=windows, sink=sinks,
                                   backend=self.kernel_backend, interpret=self.interpret,
                                   block_q=self.block_q, block_k=self.block_k)
            return out, None
        cache = cache.write(k, v, positions[:, 0])
        windows = self.layer_windows(layer, cache.max_len)
        kpos = jnp.arange(cache.max_len, dtype=positions.dtype)
        mask = window_sink_mask(positions, kpos, jnp.asarray(np.asarray(windows, np.int32)),
                                jnp.asarray(np.asarray(sinks, np.int32)))
        return mha_reference(q, cache.k, cache.v, mask), cache
