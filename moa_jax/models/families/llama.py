"""Llama 1/2/3/3.1/3.2: the reference layout (`attention_bias` on all four projections,
optional `mlp_bias`, rope 'default', 'linear', 'llama3' or 'yarn')."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moa_jax.config import ModelConfig
from moa_jax.models.families.base import Family
from moa_jax.models.families.schema import BOOL


def read_hf(d: Mapping[str, Any]) -> dict[str, Any]:
    bias = bool(d.get("attention_bias", False))
    return {"qkv_bias": bias, "o_bias": bias, "mlp_bias": bool(d.get("mlp_bias", False))}


def write_hf(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.qkv_bias != cfg.o_bias:
        raise ValueError("a Llama config has one attention_bias for q, k, v and o")
    return {"attention_bias": cfg.qkv_bias, "mlp_bias": cfg.mlp_bias}


FAMILY = Family(
    name="llama",
    model_types=("llama",),
    hf_architecture="LlamaForCausalLM",
    gguf_arch="llama",
    differs="the reference layout; llama3 / linear / YaRN rope scaling",
    read_hf=read_hf,
    write_hf=write_hf,
    hf_defaults={"max_position_embeddings": 2048},
    hf_keys={"attention_bias": BOOL, "mlp_bias": BOOL},
)
