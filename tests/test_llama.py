"""The Flax Llama: RoPE against transformers, cache consistency, dtypes.

Logit parity with transformers' LlamaForCausalLM on loaded weights is in test_weights.py.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from moa_jax.models.attention import Attention, DenseAttention
from moa_jax.models.causal_lm import forward, stack_layers
from moa_jax.models.families import config_from_hf
from moa_jax.models.registry import init_random
from moa_jax.models.rotary import rotary_table

from conftest import tiny_config


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        {"rope_type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ],
)
def test_rope_frequencies_match_transformers(scaling):
    hf = LlamaConfig(
        hidden_size=256,
        num_attention_heads=2,
        rope_theta=500000.0,
        rope_scaling=scaling,
        max_position_embeddings=4096,
    )
    cfg = config_from_hf(hf.to_dict())
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        expected = 1.0 / (500000.0 ** (np.arange(0, 128, 2) / 128))
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[rope_type](hf, torch.device("cpu"))
        expected = expected.numpy()
    np.testing.assert_allclose(rotary_table(cfg).inv_freq, expected, rtol=1e-6)


def test_chunked_prefill_with_cache_equals_full_forward():
    cfg = tiny_config()
    model = init_random(cfg, seed=1)
    g, s = nnx.split(model)
    rng = np.random.RandomState(0)
    b, t = 2, 24
    tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (b, t)))
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    full, _ = forward(g, s, tokens, pos)
    att = DenseAttention()
    cache = att.init_cache(cfg, b, 32, jnp.float32)
    first, cache = forward(g, s, tokens[:, :10], pos[:, :10], cache, attention=att, mode="prefill")
    second, cache = forward(g, s, tokens[:, 10:], pos[:, 10:], cache, attention=att, mode="prefill")
    np.testing.assert_allclose(np.concatenate([first, second], 1), full, atol=2e-5, rtol=1e-5)
    # The cache holds exactly the t written tokens; the rest is untouched.
    assert np.abs(np.asarray(cache[0].k[:, t:])).max() == 0
    assert (
        np.abs(np.asarray(cache[0].k[:, :t])).min() >= 0
        and np.abs(np.asarray(cache[0].k[:, :t])).sum() > 0
    )


def test_logits_at_selects_rows():
    cfg = tiny_config()
    g, s = nnx.split(init_random(cfg, seed=2))
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, cfg.vocab_size, (3, 9)))
    pos = jnp.broadcast_to(jnp.arange(9), (3, 9))
    full, _ = forward(g, s, tokens, pos)
    idx = jnp.asarray([0, 4, 8])
    picked, _ = forward(g, s, tokens, pos, logits_at=idx)
    np.testing.assert_allclose(picked, full[jnp.arange(3), idx], atol=1e-6)


def test_bf16_compute_close_to_f32():
    cfg = tiny_config()
    m32 = init_random(cfg, seed=3)
    m16 = init_random(cfg, seed=3, dtype="bfloat16")
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, cfg.vocab_size, (2, 16)))
    pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
    a, _ = forward(*nnx.split(m32), tokens, pos)
    b, _ = forward(*nnx.split(m16), tokens, pos)
    assert m16.layers[0].self_attn.q_proj.kernel[...].dtype == jnp.float32  # master weights
    assert a.dtype == b.dtype == jnp.float32
    err = np.abs(np.asarray(a) - np.asarray(b)).max()
    assert 0 < err < 0.05 * np.abs(np.asarray(a)).max()


def test_tied_embeddings_have_no_head():
    cfg = tiny_config(tie_word_embeddings=True)
    model = init_random(cfg)
    assert not hasattr(model, "lm_head")
    tokens = jnp.zeros((1, 4), jnp.int32)
    logits, _ = forward(*nnx.split(model), tokens, jnp.arange(4)[None])
    h = model.embed_tokens.embedding[...]
    assert logits.shape == (1, 4, cfg.vocab_size) and h.shape == (cfg.vocab_size, cfg.hidden_size)


@functools.partial(jax.tree_util.register_dataclass, data_fields=("scale",), meta_fields=())
@dataclasses.dataclass(frozen=True)
class ScaledAttention(Attention):
    """Dense attention times one layer's scale [H] (per-layer data held as a field)."""

    scale: jax.Array
    layer_uniform = True

    def __call__(self, q, k, v, *, layer, positions, lengths=None):
        return DenseAttention()(q, k, v, layer=layer, positions=positions) * self.scale[:, None]

    def probe(self, q, k, v, *, layer, positions):
        return jnp.sum(DenseAttention()(q, k, v, layer=layer, positions=positions))


def test_forward_pieces_compose_to_call():
    """embed, layer i, logits (everywhere or at chosen rows) give `__call__`'s logits."""
    cfg = tiny_config()
    model = init_random(cfg, seed=4)
    tokens = jnp.asarray(np.random.RandomState(3).randint(0, cfg.vocab_size, (2, 12)))
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    full, cache = model(tokens, pos)
    assert cache is None
    x = model.embed(tokens)
    for i in range(cfg.num_layers):
        x, out = model.layer(i, x, pos, DenseAttention())
        assert out is None
    np.testing.assert_allclose(model.logits(x), full, atol=1e-6)
    at = jnp.asarray([[0, 5, 11], [3, 3, 7]])
    picked = model.logits(x, at=at)
    assert picked.shape == (2, 3, cfg.vocab_size) and picked.dtype == jnp.float32
    np.testing.assert_allclose(picked, full[jnp.arange(2)[:, None], at], atol=1e-6)
    np.testing.assert_allclose(model.logits(x, at=at[:, 1]), full[jnp.arange(2), at[:, 1]])


def test_per_layer_backends_in_the_loop_and_the_scan():
    """A tuple of per-layer backends (arrays as fields): layer i runs the i-th, in the layer
    loop and in the scan over stacked layers alike; their probes come back per layer."""
    cfg = tiny_config()
    model = init_random(cfg, seed=5)
    tokens = jnp.asarray(np.random.RandomState(4).randint(0, cfg.vocab_size, (2, 10)))
    pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
    scales = jnp.asarray(np.random.RandomState(5).uniform(0.5, 2.0, (cfg.num_layers, 4)))
    per_layer = tuple(ScaledAttention(s) for s in scales)
    loop, outs = model.hidden_states(tokens, pos, attention=per_layer)
    scan, stacked = model.hidden_states(
        tokens, pos, attention=per_layer, layer_stack=stack_layers(model)
    )
    np.testing.assert_allclose(scan, loop, rtol=1e-5, atol=1e-5)
    assert len(outs) == cfg.num_layers and stacked.shape == (cfg.num_layers,)
    np.testing.assert_allclose(stacked, jnp.stack(outs), rtol=1e-5)
    x = model.embed(tokens)
    for i in range(cfg.num_layers):
        x, _ = model.layer(i, x, pos, per_layer[i])
    np.testing.assert_allclose(x, loop, rtol=1e-6, atol=1e-6)
    plain, _ = model.hidden_states(tokens, pos)
    assert not np.allclose(loop, plain, atol=1e-3)  # the scales were applied


def test_mode_must_fit_the_cache_and_the_backend():
    """The mode is explicit: a cache in stateless mode, a cached mode without a cache, a
    stateless-only backend in a cached mode, or a decode step of several tokens are errors."""
    cfg = tiny_config()
    model = init_random(cfg, seed=6)
    tokens = jnp.zeros((1, 4), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(4), (1, 4))
    att = DenseAttention()
    cache = att.init_cache(cfg, 1, 8, jnp.float32)
    with pytest.raises(ValueError, match="stateless mode"):
        model(tokens, pos, cache, att)
    with pytest.raises(ValueError, match="needs a cache"):
        model(tokens, pos, None, att, mode="decode")
    with pytest.raises(ValueError, match="mode must be one of"):
        model(tokens, pos, cache, att, mode="train")
    with pytest.raises(ValueError, match="keeps no cache"):
        model(tokens, pos, cache, ScaledAttention(jnp.ones(4)), mode="prefill")
    with pytest.raises(ValueError, match="one token per row"):
        model(tokens, pos, cache, att, mode="decode")
    logits, cache = model(tokens, pos, cache, att, mode="prefill")
    assert logits.shape == (1, 4, cfg.vocab_size) and cache is not None
