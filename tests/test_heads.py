"""Retrieval heads and the oracle plan (moa_jax.eval.heads)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moa_jax.eval.heads import NeedleMassAttention, _needle_mass, compare, oracle_plan
from moa_jax.models.registry import TINY_RANDOM_CONFIG, init_random
from moa_jax.models.rotary import rotary_table


def test_needle_mass_is_attention_probability_on_the_marked_keys():
    cfg = TINY_RANDOM_CONFIG
    model = init_random(cfg, seed=0)
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    n = 64
    tokens = jnp.asarray(rng.integers(1, cfg.vocab_size, (2, n)), jnp.int32)
    rows = jnp.asarray([[40, 41, 42], [60, 61, 62]], jnp.int32)
    w = jnp.ones((2, 3), jnp.float32)
    att = NeedleMassAttention(q_chunk=32)
    everything = _needle_mass(
        graphdef, state, tokens, rows, w, jnp.ones((2, n), bool), attention=att
    )
    np.testing.assert_allclose(np.asarray(everything), 1.0, rtol=1e-5)  # rows sum to one
    marked = np.zeros((2, n), bool)
    marked[:, 10:14] = True
    mass = np.asarray(
        _needle_mass(graphdef, state, tokens, rows, w, jnp.asarray(marked), attention=att)
    )
    assert mass.shape == (2, cfg.num_layers, cfg.num_heads)
    assert np.all((mass > 0) & (mass < 1))
    # layer 0 by hand: its input is the embedding, so q/k come from the first layer alone
    layer = model.layers[0]
    x = layer.input_layernorm(model.embed_tokens(tokens))
    captured = {}

    class Capture(NeedleMassAttention):
        def __call__(self, q, k, v, **kw):
            captured["qk"] = (q, k)
            return super().__call__(q, k, v, **kw)

    pos = jnp.broadcast_to(jnp.arange(n), (2, n))
    capture = Capture(rows=rows, row_w=w, key_mask=jnp.asarray(marked))
    layer.self_attn(x, pos, rotary_table(cfg), None, capture, 0)
    q, k = captured["qk"]
    g = cfg.num_heads // cfg.num_kv_heads
    logits = jnp.einsum("bqhd,bshd->bhqs", q, jnp.repeat(k, g, 2)) * cfg.head_dim**-0.5
    logits = jnp.where(jnp.tril(jnp.ones((n, n), bool)), logits, -1e30)
    p = np.asarray(jax.nn.softmax(logits, axis=-1))
    want = np.stack([p[b][:, np.asarray(rows[b])][..., 10:14].sum(-1).mean(-1) for b in range(2)])
    np.testing.assert_allclose(mass[:, 0], want, rtol=1e-4)


def test_oracle_plan_keeps_top_groups_dense_at_the_cache_budget():
    rng = np.random.default_rng(0)
    scores = rng.random((6, 8)) * 0.1
    scores[2, 5] = scores[4, 0] = 0.9  # KV groups (2, 2) and (4, 0) of 4 x 2
    plan = oracle_plan(scores, num_kv_heads=4, density=0.5, dense_fraction=2 / 24, sink=16)
    w = plan.resolve(4096)
    assert (w[2, 4:6] >= 4096).all() and (w[4, 0:2] >= 4096).all()
    assert (w >= 4096).sum() == 4  # two whole groups of two query heads
    for n in (1024, 2048, 8192):  # spans round up to 64-token granularity
        assert 0.5 - 1e-9 <= plan.kv_cache_density(n, 4) <= 0.5 + 64 / n
    for layer in range(6):  # at most two rules per layer
        assert len(set(zip(plan.alphas[layer], plan.betas[layer]))) <= 2
    with pytest.raises(ValueError, match="does not fit"):
        oracle_plan(scores, 4, density=0.1, dense_fraction=0.5)
    rep = compare(scores, plan, {}, 4096, top=2)
    assert {(h["layer"], h["head"]) for h in rep["top_heads"]} == {(2, 5), (4, 0)}
    assert rep["plan_top_kept_ge_0.9"] == 1.0
