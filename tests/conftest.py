"""Shared test fixtures."""

from __future__ import annotations

import dataclasses

from moa_jax.config import ModelConfig


def tiny_config(**overrides) -> ModelConfig:
    """A small GQA Llama config for fast CPU tests (4 query heads, 2 KV heads)."""
    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                      eos_token_ids=(3,), pad_token_id=0)
    return dataclasses.replace(cfg, **overrides)
