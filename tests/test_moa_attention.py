"""MoAAttention on a tiny random Llama: dense plan == DenseAttention, sparse plan == oracle."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moa_jax.models.attention import Attention, DenseAttention
from moa_jax.models.causal_lm import forward
from moa_jax.models.moa_attention import MoAAttention
from moa_jax.models.registry import init_random
from moa_jax.pallas_kernels.reference import mha_reference, window_sink_mask
from moa_jax.plan import Plan

from conftest import tiny_config


@dataclasses.dataclass(frozen=True)
class OracleWindowAttention(Attention):
    """The jnp oracle with fixed per-layer windows/sinks (no kernel involved)."""

    windows: tuple
    sinks: tuple

    def __call__(self, q, k, v, *, layer, positions, lengths=None):
        mask = window_sink_mask(
            positions, positions, jnp.asarray(self.windows[layer]), jnp.asarray(self.sinks[layer])
        )
        return mha_reference(q, k, v, mask)


def _setup(t=72, b=2, **over):
    cfg = tiny_config(**over)
    g, s = nnx.split(init_random(cfg, seed=3))
    rng = np.random.RandomState(0)
    tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (b, t)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return cfg, g, s, tokens, pos


def test_dense_plan_equals_dense_attention():
    cfg, g, s, tokens, pos = _setup()
    dense, _ = forward(g, s, tokens, pos, attention=DenseAttention())
    moa = MoAAttention(
        Plan.dense(cfg.num_layers, cfg.num_heads).validate(cfg), block_q=32, block_k=16
    )
    got, _ = forward(g, s, tokens, pos, attention=moa)
    np.testing.assert_allclose(np.asarray(got), np.asarray(dense), atol=1e-4, rtol=1e-4)


def test_sparse_plan_equals_oracle_masked_model():
    cfg, g, s, tokens, pos = _setup()
    # Per-head windows differ inside KV groups (GQA 2), sinks differ per layer.
    plan = Plan.from_windows([[1, 9, 30, 72], [20, 3, 72, 5]], sinks=[[0, 4, 4, 0], [8, 8, 0, 1]])
    moa = MoAAttention(plan.validate(cfg), block_q=32, block_k=16)
    got, _ = forward(g, s, tokens, pos, attention=moa)
    windows = tuple(tuple(int(w) for w in row) for row in plan.resolve(tokens.shape[1]))
    oracle = OracleWindowAttention(windows, tuple(tuple(r) for r in plan.sinks))
    want, _ = forward(g, s, tokens, pos, attention=oracle)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)
    dense, _ = forward(g, s, tokens, pos, attention=DenseAttention())
    assert np.abs(np.asarray(got) - np.asarray(dense)).max() > 1e-2  # the plan does bite


def test_elastic_plan_resolved_at_length_and_decode_matches_prefill():
    """A reference-style elastic plan; prefill+decode through the cache == one no-cache pass."""
    cfg, g, s, tokens, pos = _setup(t=40, b=1)
    plan = Plan(
        alphas=[[0.0, 8.0, 0.0, 16.0], [4.0, 0.0, 0.0, 0.0]],
        betas=[[0.25, 0.0, 1.0, 0.125], [0.0, 0.5, 0.75, 0.1]],
        sinks=[[2, 2, 0, 4], [4, 0, 1, 2]],
        granularity=4,
        min_span=8,
    )
    n = 48
    moa = MoAAttention(plan, length=n, block_q=16, block_k=16)
    full, _ = forward(g, s, tokens, pos, attention=moa)
    cache = moa.init_cache(cfg, 1, n, jnp.float32)
    first, cache = forward(g, s, tokens[:, :25], pos[:, :25], cache, attention=moa, mode="prefill")
    outs = [first]
    for i in range(25, 40):
        o, cache = forward(
            g, s, tokens[:, i : i + 1], pos[:, i : i + 1], cache, attention=moa, mode="decode"
        )
        outs.append(o)
    np.testing.assert_allclose(np.concatenate(outs, 1), np.asarray(full), atol=1e-4, rtol=1e-4)


def test_plan_mismatch_is_reported():
    cfg = tiny_config()
    moa = MoAAttention(Plan.uniform(3, 4, 8))
    with pytest.raises(ValueError, match="3 layers but the model has 2"):
        moa.init_cache(cfg, 1, 16)
    with pytest.raises(ValueError, match="windows are"):
        MoAAttention(Plan.uniform(2, 4, 8), windows=((1, 2),))
    hash(MoAAttention(Plan.uniform(2, 4, 8), windows=((1, 2, 3, 4), (5, 6, 7, 8))))
