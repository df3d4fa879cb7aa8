"""Qwen3 (dense): an RMSNorm over each head's query and key before RoPE; `head_dim` independent
of the hidden size; `attention_bias` on all four projections; Qwen2's optional window."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moa_jax.config import ModelConfig
from moa_jax.models.families.base import Family, layer_windows, window_hf
from moa_jax.models.families.schema import BOOL, WINDOW_KEYS


def read_hf(d: Mapping[str, Any]) -> dict[str, Any]:
    bias = bool(d.get("attention_bias", False))
    return {
        "qkv_bias": bias,
        "o_bias": bias,
        "qk_norm": True,
        **layer_windows(d, int(d["num_hidden_layers"])),
    }


def write_hf(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.qkv_bias != cfg.o_bias or cfg.mlp_bias or not cfg.qk_norm:
        raise ValueError("a Qwen3 model has q/k norms and one attention_bias for q, k, v and o")
    return {"attention_bias": cfg.qkv_bias, **window_hf(cfg)}


FAMILY = Family(
    name="qwen3",
    model_types=("qwen3",),
    hf_architecture="Qwen3ForCausalLM",
    gguf_arch="qwen3",
    differs="RMSNorm per head on q and k before RoPE; head_dim independent of hidden size",
    read_hf=read_hf,
    write_hf=write_hf,
    hf_defaults={"max_position_embeddings": 32768, "num_key_value_heads": 32, "head_dim": 128},
    hf_keys={"attention_bias": BOOL, **WINDOW_KEYS},
)
