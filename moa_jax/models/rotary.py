"""Rotary position embeddings with every scaling the supported families' configs use.

`rotary_table(cfg)` gives the inverse frequencies [head_dim // 2] and the cos/sin scale
(YaRN's attention factor, 1 otherwise), computed once in float64 numpy from the config;
`apply_rope` rotates queries or keys in HF's rotate-half layout.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from moa_jax.config import ModelConfig, RopeScaling


@dataclasses.dataclass(frozen=True, eq=False)
class RotaryTable:
    """inv_freq: float64 [head_dim // 2]; scale: multiplies cos and sin (YaRN)."""

    inv_freq: np.ndarray
    scale: float = 1.0


def _llama3(inv: np.ndarray, rs: RopeScaling) -> np.ndarray:
    old = rs.original_max_position_embeddings
    low_wavelen = old / rs.low_freq_factor
    high_wavelen = old / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(inv: np.ndarray, rs: RopeScaling, theta: float, dim: int) -> tuple[np.ndarray, float]:
    """YaRN (Peng et al., 2023): frequencies below the `beta_slow` rotation count over the
    original context are interpolated by `factor`, those above `beta_fast` kept, a linear ramp
    between; cos and sin are scaled by the attention factor."""
    if rs.attention_factor is not None:
        scale = float(rs.attention_factor)
    elif rs.mscale and rs.mscale_all_dim:
        scale = _yarn_mscale(rs.factor, rs.mscale) / _yarn_mscale(rs.factor, rs.mscale_all_dim)
    else:
        scale = _yarn_mscale(rs.factor)
    old = rs.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(rs.beta_fast), correction_dim(rs.beta_slow)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: extrapolate (the original frequency), 0: interpolate
    return (inv / rs.factor) * (1 - keep) + inv * keep, scale


def rotary_table(cfg: ModelConfig) -> RotaryTable:
    """The config's inverse frequencies and cos/sin scale (see `RopeScaling`)."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    rs = cfg.rope_scaling
    if rs.rope_type == "linear":
        return RotaryTable(inv / rs.factor)
    if rs.rope_type == "llama3":
        return RotaryTable(_llama3(inv, rs))
    if rs.rope_type == "yarn":
        return RotaryTable(*_yarn(inv, rs, cfg.rope_theta, d))
    return RotaryTable(inv)


def apply_rope(x: jax.Array, positions: jax.Array, table: RotaryTable) -> jax.Array:
    """Rotates x [B, T, N, D] by positions [B, T] (HF's rotate-half layout)."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(table.inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if table.scale != 1.0:
        cos, sin = cos * table.scale, sin * table.scale
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)
