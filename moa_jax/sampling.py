"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus), explicit PRNG key."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moa_jax.domains import FRACTION, NON_NEGATIVE, Float, checked


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick the next token. temperature 0 means greedy (top_k / top_p are then unused).

    top_k 0 keeps every token; top_p 1.0 keeps the whole distribution.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        """Raises `ConfigError` naming the field: temperature a finite number >= 0, top_k an
        integer >= 0, top_p a finite number in (0, 1]; stores them as float, int and float."""
        for name, domain in (
            ("temperature", Float(0.0)),
            ("top_k", NON_NEGATIVE),
            ("top_p", FRACTION),
        ):
            object.__setattr__(
                self, name, checked(f"SamplingConfig.{name}", getattr(self, name), domain)
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sample(logits: jax.Array, key: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Draws one token per row.

    Args:
      logits: float [B, V].
      key: PRNG key (unused when greedy).
    Returns:
      int32 [B].
    """
    if cfg.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / cfg.temperature
    neg = jnp.finfo(jnp.float32).min
    if cfg.top_k:
        kth = jax.lax.top_k(logits, min(cfg.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if cfg.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is
        # still below top_p (so the top token always stays).
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = mass_before < cfg.top_p
        keep = (
            jnp.zeros_like(keep_sorted)
            .at[jnp.arange(logits.shape[0])[:, None], order]
            .set(keep_sorted)
        )
        logits = jnp.where(keep, logits, neg)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
