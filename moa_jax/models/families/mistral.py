"""Mistral: Llama's layout without biases; the config's `sliding_window` (Mistral-7B v0.1:
4096; null from v0.2 on) is the model's own window on every layer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moa_jax.config import ModelConfig
from moa_jax.domains import POSITIVE
from moa_jax.models.families.base import Family, HFConfigError


def read_hf(d: Mapping[str, Any]) -> dict[str, Any]:
    if d.get("layer_types") is not None:
        raise HFConfigError(
            "layer_types (alternating window and full layers, Ministral) are not supported "
            "for model_type 'mistral'"
        )
    # MistralConfig's default window where config.json leaves the key out; null means none
    window = d["sliding_window"] if "sliding_window" in d else 4096
    return {"sliding_window": None if window is None else int(window)}


def write_hf(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.window_layers is not None:
        raise ValueError("a Mistral config's sliding_window applies to every layer")
    return {"sliding_window": cfg.sliding_window}


FAMILY = Family(
    name="mistral",
    model_types=("mistral",),
    hf_architecture="MistralForCausalLM",
    gguf_arch=None,  # llama.cpp writes Mistral GGUFs as architecture 'llama'
    differs="the config's sliding_window is the model's own window (v0.1: 4096)",
    read_hf=read_hf,
    write_hf=write_hf,
    hf_defaults={"max_position_embeddings": 131072, "num_key_value_heads": 8},
    hf_keys={"sliding_window": POSITIVE, "layer_types": None},
)
