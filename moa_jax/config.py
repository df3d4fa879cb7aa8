"""Configuration dataclasses.

`ModelConfig` describes a model of the Llama family (Llama, Mistral, Qwen2, Qwen3): the shared
decoder's sizes plus the few switches in which the families differ. It is built from an HF
`config.json` by the family's module (`moa_jax.models.families`) or from GGUF metadata
(`moa_jax.models.gguf_weights`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

from moa_jax.errors import ConfigError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ACTIVATIONS = ("silu",)

_DTYPES = {
    "float32": jnp.float32,
    "f32": jnp.float32,
    "fp32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
    "float16": jnp.float16,
    "f16": jnp.float16,
    "fp16": jnp.float16,
}
DTYPE_NAMES = tuple(_DTYPES)
"""The dtype names commands take (`--dtype`, `--param-dtype`)."""


def parse_dtype(name: str | Any, arg: str = "dtype") -> jnp.dtype:
    """Maps a dtype name ('float32', 'bf16', ...) or a floating dtype to a `jnp.dtype`; a
    `ConfigError` naming `arg` (the option, e.g. 'load_model: param_dtype') otherwise."""
    if isinstance(name, str):
        try:
            return jnp.dtype(_DTYPES[name.lower()])
        except KeyError:
            raise ConfigError(
                f"{arg}: unknown dtype name {name!r}; expected one of {sorted(set(_DTYPES))}"
            ) from None
    try:
        dtype = jnp.dtype(name)
    except TypeError:
        raise ConfigError(f"{arg}: not a dtype: {name!r}") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ConfigError(f"{arg} must be a floating dtype, got {dtype}")
    return dtype


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as transformers' `rope_parameters` give it.

    `rope_type`: 'default', 'linear' (positions divided by `factor`), 'llama3' (Llama 3.1's
    band-wise scaling: `factor`, `low_freq_factor`, `high_freq_factor`,
    `original_max_position_embeddings`) or 'yarn' (YaRN: `factor`, `beta_fast`, `beta_slow`,
    `original_max_position_embeddings`, `truncate`, and the cos/sin scale `attention_factor`,
    from `mscale` / `mscale_all_dim` when not given).
    """

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self):
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported rope_type {self.rope_type!r}; moa-jax supports "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        for name in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow"):
            x = float(getattr(self, name))
            if not (math.isfinite(x) and x > 0):
                raise ValueError(f"rope scaling {name} must be a positive finite number, got {x}")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(
                f"llama3 rope scaling needs high_freq_factor > low_freq_factor, got "
                f"{self.high_freq_factor} and {self.low_freq_factor}"
            )
        if int(self.original_max_position_embeddings) <= 0:
            raise ValueError(
                "rope scaling original_max_position_embeddings must be positive, got "
                f"{self.original_max_position_embeddings}"
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family model (hashable, so it can be a static jit argument).

    Every family runs the one decoder (`moa_jax.models.decoder`); these fields say where a
    family departs from Llama:
      family: 'llama' | 'mistral' | 'qwen2' | 'qwen3' (checkpoint export, plans, reports).
      qkv_bias / o_bias: biases on the q, k, v projections / on the output projection (Llama's
        `attention_bias` sets both; Qwen2 has q, k, v only).
      mlp_bias: biases on the MLP projections.
      qk_norm: an RMSNorm over each head's query and key before the rotary embedding (Qwen3).
      sliding_window: the model's own causal window in tokens (a query sees itself and the
        `sliding_window - 1` tokens before it), None for full attention (Mistral, Qwen2 with
        `use_sliding_window`).
      window_layers: the layers the window applies to (None: every layer; Qwen2's
        `max_window_layers` exempts the first layers).
      hidden_act: the MLP's activation; only 'silu' is implemented and anything else is refused.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 8192
    family: str = "llama"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    window_layers: tuple[int, ...] | None = None
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        ):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("rope_theta", "rms_norm_eps"):
            x = float(getattr(self, name))
            if not (math.isfinite(x) and x > 0):
                raise ValueError(f"ModelConfig.{name} must be a positive finite number, got {x}")
        if int(self.max_position_embeddings) <= 0:
            raise ValueError(
                f"ModelConfig.max_position_embeddings must be positive, got "
                f"{self.max_position_embeddings}"
            )
        if self.family not in FAMILIES:
            raise ValueError(
                f"ModelConfig.family must be one of {', '.join(FAMILIES)}, got {self.family!r}"
            )
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"hidden_act {self.hidden_act!r} is not supported; moa-jax's decoder runs "
                f"{', '.join(SUPPORTED_ACTIVATIONS)}"
            )
        if self.sliding_window is not None and int(self.sliding_window) <= 0:
            raise ValueError(
                f"ModelConfig.sliding_window must be positive or None, got {self.sliding_window}"
            )
        if self.window_layers is not None:
            layers = tuple(int(i) for i in self.window_layers)
            bad = [i for i in layers if not 0 <= i < self.num_layers]
            if bad:
                raise ValueError(
                    f"ModelConfig.window_layers {bad} are not layers of a "
                    f"{self.num_layers}-layer model"
                )
            object.__setattr__(self, "window_layers", tuple(sorted(set(layers))))

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    def model_window(self, layer: int) -> int | None:
        """The model's own window at `layer` (tokens a query sees, itself included), or None
        where the layer attends to the whole context."""
        if self.sliding_window is None:
            return None
        if self.window_layers is not None and layer not in self.window_layers:
            return None
        return int(self.sliding_window)

    @property
    def has_model_window(self) -> bool:
        """Whether any layer has the model's own sliding window."""
        return any(self.model_window(i) is not None for i in range(self.num_layers))

    @property
    def shape_summary(self) -> dict[str, int | str]:
        """What a plan records of the model it was searched on (family and attention shape)."""
        return {
            "family": self.family,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
        }
