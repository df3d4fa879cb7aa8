"""Qwen2 / Qwen2.5: biases on the q, k and v projections (none on o); tied or untied
embeddings; `use_sliding_window` puts the window on the layers from `max_window_layers` on."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moa_jax.config import ModelConfig
from moa_jax.models.families.base import Family, layer_windows, window_hf
from moa_jax.models.families.schema import WINDOW_KEYS


def read_hf(d: Mapping[str, Any]) -> dict[str, Any]:
    return {"qkv_bias": True, "o_bias": False, **layer_windows(d, int(d["num_hidden_layers"]))}


def write_hf(cfg: ModelConfig) -> dict[str, Any]:
    if not cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias:
        raise ValueError("a Qwen2 model has biases on q, k and v only")
    return window_hf(cfg)


FAMILY = Family(
    name="qwen2",
    model_types=("qwen2",),
    hf_architecture="Qwen2ForCausalLM",
    gguf_arch="qwen2",
    differs="bias on q, k, v (not o); optional window from max_window_layers on",
    read_hf=read_hf,
    write_hf=write_hf,
    hf_defaults={"max_position_embeddings": 32768, "num_key_value_heads": 32},
    hf_keys=WINDOW_KEYS,
)
