"""The shared base of the backends over head-major caches (`pallas_kernels.caches.head_major`):
Recycled Attention (`recycled_attention`), StreamingLLM and H2O (`eviction_attention`), and
`FullCacheAttention`, dense decoding through the same cache and kernel.

`HeadMajorBackend` holds their kernel options and runs every Pallas call they make on the
backend's mesh (rows over data x fsdp, KV heads over tensor, `pallas_kernels.sharding`): the
prompt's prefill (dense or a MoA plan's windows), the full step over a full cache and the step
over K gathered slots plus the current token.

The model's own sliding window (`ModelConfig.model_window`, field `model_windows`, set by
`moa_jax.methods` for a windowed model) is applied by every one of these calls on a windowed
layer: the prefill sees at most the last W tokens (the plan's windows capped at W, no sinks,
as `Plan.within_model_window`), and the decode kernels' `window` argument keeps the full step
to the last W positions (q_pos - W < j <= q_pos) and the gathered step to its slots inside
that range.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from moa_jax.config import ModelConfig
from moa_jax.models.attention import CachedAttention
from moa_jax.models.moa_attention import MoAAttention
from moa_jax.pallas_kernels.caches.head_major import HeadMajorKVCache, default_block
from moa_jax.pallas_kernels.dispatch import full_step_decode, recycled_decode
from moa_jax.pallas_kernels.sharding import same_kernel_on_mesh, sparse_attention_on_mesh


def chunk_info(
    q: jax.Array, positions: jax.Array, lengths: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(start [B], lengths [B], last position [B], rows [B]) of a prefill chunk q [B, T, H, D]."""
    b, t = q.shape[:2]
    lengths = jnp.full((b,), t, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
    start = positions[:, 0].astype(jnp.int32)
    return start, lengths, start + lengths - 1, jnp.arange(b)


def slot_after(slot: jax.Array, out: jax.Array) -> jax.Array:
    """`slot` unchanged, but computed from `out`: a cache write at `slot` then depends on the
    attention that read the cache, so XLA orders the write after the read and updates the
    buffer in place; without the dependence it copies the whole buffer every step. (Zero for
    finite outputs; a NaN output would shift the slot by one, but then the step is lost.)"""
    return slot + (out.reshape(-1)[0] * 0 != 0).astype(slot.dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeadMajorBackend(CachedAttention):
    """Keyword-only options of the head-major-cache backends (recycled, dense kernel,
    StreamingLLM, H2O), and their kernel calls.

    Args:
      prefill_moa: a `MoAAttention` whose plan windows the prompt's prefill uses
        (its resolution length, or the cache's max_len; its kernel blocks), or None for full
        causal attention. The full cache stays dense, and the seed selection scores the whole
        prompt.
      kernel_backend: 'auto' | 'mgpu' | 'gpu' | 'tpu' | 'reference' (`pallas_kernels.dispatch`).
      interpret: Pallas interpret mode (None: automatic, True off the kernel's platform).
      block: cache padding granularity in tokens (None: 128 on TPU, 64 elsewhere).
      num_splits: GPU split-K factor of the decode kernels (None: automatic).
      mesh: device mesh: the kernels run under `shard_map`, rows over data x fsdp and KV heads
        over tensor (`pallas_kernels.sharding`); set by `generate(mesh=...)`.
      model_windows: per layer the model's own sliding window (`ModelConfig.model_window`,
        None where a layer has none), applied by prefill and decode (module docstring); None:
        the model has no window (`moa_jax.methods` sets it from the config).
    """

    prefill_moa: MoAAttention | None = None
    kernel_backend: str = "auto"
    interpret: bool | None = None
    block: int | None = None
    num_splits: int | None = None
    mesh: Mesh | None = None
    model_windows: tuple[int | None, ...] | None = None

    @property
    def applies_model_window(self) -> bool:
        return self.model_windows is not None

    def layer_window(self, layer: int) -> int | None:
        """The model's own window at `layer` (None: none)."""
        return None if self.model_windows is None else self.model_windows[layer]

    def validate_prefill(self, cfg: ModelConfig) -> None:
        """Raises ValueError when the prefill plan or the model windows do not match the model
        `cfg`."""
        if self.prefill_moa is not None:
            self.prefill_moa.plan.validate(cfg)
        if self.model_windows is not None:
            want = tuple(cfg.model_window(i) for i in range(cfg.num_layers))
            if tuple(self.model_windows) != want:
                raise ValueError(
                    f"{type(self).__name__} was built for model windows {self.model_windows}, "
                    f"the model has {want}"
                )

    @property
    def cache_block(self) -> int:
        """The cache padding granularity in tokens."""
        return self.block or default_block()

    def prefill_windows(
        self, layer: int, h: int, t: int, max_len: int
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per-query-head (windows, sinks) of the prompt's prefill: dense, or the plan's;
        on a layer with a model window W, windows capped at W and no sinks."""
        if self.prefill_moa is None:
            windows, sinks = (max(t, 1),) * h, (0,) * h
        else:
            plan = self.prefill_moa.plan
            if plan.num_heads != h:
                raise ValueError(f"prefill plan has {plan.num_heads} heads, the model {h}")
            windows = self.prefill_moa.layer_windows(layer, max_len)
            sinks = plan.layer_sinks(layer)
        w = self.layer_window(layer)
        if w is None:
            return windows, sinks
        return tuple(min(x, w) for x in windows), (0,) * h

    def prefill_attention(
        self, q: jax.Array, k: jax.Array, v: jax.Array, layer: int, max_len: int
    ) -> jax.Array:
        """Causal attention of a prompt at positions [0, T) (q [B, T, H, D], k/v [B, T, Hkv, D]):
        dense or the plan's windows."""
        h, t = q.shape[2], q.shape[1]
        windows, sinks = self.prefill_windows(layer, h, t, max_len)
        return sparse_attention_on_mesh(
            q,
            k,
            v,
            self.mesh,
            windows=windows,
            sinks=sinks,
            backend=self.kernel_backend,
            interpret=self.interpret,
            block_q=None if self.prefill_moa is None else self.prefill_moa.block_q,
            block_k=None if self.prefill_moa is None else self.prefill_moa.block_k,
        )

    def __call__(self, q, k, v, *, layer, positions, lengths=None):
        """Stateless: the prompt's prefill attention (dense or the plan's windows) over the
        call's tokens at positions [0, T)."""
        return self.prefill_attention(q, k, v, layer, q.shape[1])

    def _kernel_kw(self) -> dict:
        return dict(
            backend=self.kernel_backend, interpret=self.interpret, num_splits=self.num_splits
        )

    def full_step(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        q_positions: jax.Array,
        scores: str | None,
        layer: int,
    ):
        """`full_step_decode` (q [B, H, D], a full cache k/v [B, Hkv, N, D]) on the mesh, within
        layer `layer`'s model window."""
        fn = functools.partial(
            full_step_decode, scores=scores, window=self.layer_window(layer), **self._kernel_kw()
        )
        return same_kernel_on_mesh(
            fn, self.mesh, (q, k, v, q_positions), (1, 1, 1, None), 1, k.shape[1]
        )

    def gathered_step(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        pos: jax.Array,
        q_positions: jax.Array,
        k_new: jax.Array,
        v_new: jax.Array,
        scores: str | None = None,
        *,
        layer: int,
    ):
        """`recycled_decode` (q [B, H, D], K gathered slots k/v [B, Hkv, Kp, D] at positions
        pos [B, Hkv, Kp], the current token k_new/v_new [B, Hkv, D]) on the mesh, within layer
        `layer`'s model window."""
        fn = functools.partial(
            recycled_decode, scores=scores, window=self.layer_window(layer), **self._kernel_kw()
        )
        return same_kernel_on_mesh(
            fn,
            self.mesh,
            (q, k, v, pos, q_positions, k_new, v_new),
            (1, 1, 1, 1, None, 1, 1),
            1,
            k.shape[1],
        )


@dataclasses.dataclass(frozen=True)
class FullCacheAttention(HeadMajorBackend):
    """Dense decoding with the full-step kernel (no selection) over a head-major dense cache:
    the dense baseline of this machinery (options: `HeadMajorBackend`)."""

    def init_cache(self, cfg, batch, max_len, dtype=jnp.bfloat16):
        self.validate_prefill(cfg)
        return tuple(
            HeadMajorKVCache.zeros(
                batch, max_len, cfg.num_kv_heads, cfg.head_dim, dtype, self.cache_block
            )
            for _ in range(cfg.num_layers)
        )

    def prefill(self, q, k, v, *, layer, positions, cache, lengths=None, q_pre_rope=None):
        out = self.prefill_attention(q, k, v, layer, cache.max_len)
        return out, cache.write(k, v, positions[:, 0].astype(jnp.int32), lengths)

    def decode_step(self, q, k, v, *, layer, positions, cache, q_pre_rope=None):
        pos = positions[:, 0].astype(jnp.int32)
        rows = jnp.arange(q.shape[0])
        ck = cache.k.at[rows, :, pos].set(k[:, 0].astype(cache.k.dtype))
        cv = cache.v.at[rows, :, pos].set(v[:, 0].astype(cache.v.dtype))
        out = self.full_step(q[:, 0], ck, cv, pos, None, layer)
        return out[:, None], dataclasses.replace(cache, k=ck, v=cv)
