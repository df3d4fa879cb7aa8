"""Configuration dataclasses.

`ModelConfig` describes a Llama-family model. It is built from an HF `config.json` (both the
transformers 4.x shape with top-level `rope_theta`/`rope_scaling` and the 5.x shape with
`rope_parameters`) or from GGUF metadata (see `moa_jax.models.hf_weights`,
`moa_jax.models.gguf_weights`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

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


def parse_dtype(name: str | Any) -> jnp.dtype:
    """Maps a dtype name ('float32', 'bf16', ...) or a dtype to a `jnp.dtype`; clear error
    otherwise."""
    if not isinstance(name, str):
        try:
            return jnp.dtype(name)
        except TypeError as e:
            raise ValueError(f"not a dtype: {name!r}") from e
    try:
        return jnp.dtype(_DTYPES[name.lower()])
    except KeyError:
        raise ValueError(
            f"unknown dtype name {name!r}; expected one of {sorted(set(_DTYPES))}"
        ) from None


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `rope_type` is 'default', 'linear' or 'llama3'."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported rope_type {self.rope_type!r}; moa-jax supports {SUPPORTED_ROPE_TYPES}"
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Llama architecture hyper-parameters (hashable, so it can be a static jit argument)."""

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
    attention_bias: bool = False
    mlp_bias: bool = False
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

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Builds a config from an HF Llama `config.json` dict (transformers 4.x or 5.x layout)."""
        required = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        )
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"HF config is missing required keys {missing}")
        heads = int(d["num_attention_heads"])
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        # transformers 5.x nests theta and scaling in `rope_parameters`; 4.x keeps them top level.
        rope = dict(d.get("rope_parameters") or {})
        scaling = d.get("rope_scaling") or {}
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        params = {**scaling, **rope}
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        rope_scaling = RopeScaling(
            rope_type=rope_type,
            factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                params.get(
                    "original_max_position_embeddings", d.get("max_position_embeddings", 8192)
                )
            ),
        )
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=int(d.get("max_position_embeddings", 8192)),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            pad_token_id=d.get("pad_token_id"),
        )

    @classmethod
    def from_hf_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no HF config.json at {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        return cls.from_hf_dict(d)

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF `config.json` dict (transformers 4.x keys, which 5.x also reads)."""
        rs = self.rope_scaling
        d: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids)
            if len(self.eos_token_ids) != 1
            else self.eos_token_ids[0],
            "pad_token_id": self.pad_token_id,
        }
        if rs.rope_type != "default":
            d["rope_scaling"] = {
                "rope_type": rs.rope_type,
                "factor": rs.factor,
                **(
                    {
                        "low_freq_factor": rs.low_freq_factor,
                        "high_freq_factor": rs.high_freq_factor,
                        "original_max_position_embeddings": rs.original_max_position_embeddings,
                    }
                    if rs.rope_type == "llama3"
                    else {}
                ),
            }
        return d
