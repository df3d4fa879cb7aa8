"""generate() with a MoA plan: block-sparse prefill + span-cache decode equals step-by-step full
recomputation under the same per-head masks; dense and uniform plans run on the same path."""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moa_jax.generate import generate
from moa_jax.methods import AttentionConfig, build_attention
from moa_jax.models.attention import DenseAttention
from moa_jax.models.causal_lm import forward
from moa_jax.models.moa_attention import MoAAttention
from moa_jax.models.registry import init_random
from moa_jax.plan import Plan

from conftest import tiny_config

CACHE_LEN = 128


def recompute_greedy(model, prompt, n, oracle):
    """Greedy decoding re-running the whole sequence (no cache) with the oracle-masked backend.

    The sequence lives in a fixed buffer of CACHE_LEN tokens (causal: trailing filler is unseen),
    so one compilation serves every step."""
    g, s = nnx.split(model)
    seq = list(prompt)
    pos = jnp.arange(CACHE_LEN)[None]
    for _ in range(n):
        buf = jnp.asarray([seq + [0] * (CACHE_LEN - len(seq))])
        logits, _ = forward(g, s, buf, pos, attention=oracle, logits_at=jnp.asarray([len(seq) - 1]))
        seq.append(int(jnp.argmax(logits[0])))
    return seq[len(prompt) :]


def _sparse_plan(cfg, seed):
    rng = np.random.RandomState(seed)
    windows = rng.choice([3, 8, 21, 40, 10**6], (cfg.num_layers, cfg.num_heads))
    sinks = rng.choice([0, 4], (cfg.num_layers, cfg.num_heads))
    return Plan.from_windows(windows.tolist(), sinks.tolist()).validate(cfg)


def test_tiny_model_batch_of_ragged_prompts():
    cfg = tiny_config()
    model = init_random(cfg, seed=5)
    plan = _sparse_plan(cfg, 0)
    rng = np.random.RandomState(1)
    prompts = [rng.randint(4, 128, n).tolist() for n in (9, 50, 33)]
    moa = MoAAttention(plan, block_q=16, block_k=16)
    out = generate(
        model, prompts, max_new_tokens=12, stop_ids=(), attention=moa, max_cache_len=CACHE_LEN
    )
    oracle = MoAAttention(plan, length=CACHE_LEN, kernel_backend="reference")
    for p, row in zip(prompts, out.rows()):
        assert row == recompute_greedy(model, p, 12, oracle)
    dense = generate(model, prompts, max_new_tokens=12, stop_ids=(), max_cache_len=CACHE_LEN)
    assert dense.rows() != out.rows()  # the plan changes the model's behaviour


def test_dense_plan_equals_dense_attention():
    """The MoA builder runs a plan that keeps every token as dense attention, with a warning;
    generate with the plan's kernels gives the same tokens."""
    cfg = tiny_config()
    model = init_random(cfg, seed=6)
    rng = np.random.RandomState(2)
    prompts = [rng.randint(4, 128, n).tolist() for n in (7, 30)]
    plan = Plan.dense(cfg.num_layers, cfg.num_heads)
    ac = AttentionConfig(config=cfg, plan=plan, impl="native")
    with pytest.warns(UserWarning, match="keeps every token at 74 tokens"):  # 64-bucket + 10
        assert build_attention("moa", ac, 74) == DenseAttention()
    moa = MoAAttention(plan, block_q=16, block_k=16)
    a = generate(model, prompts, max_new_tokens=10, stop_ids=(), attention=moa)
    b = generate(model, prompts, max_new_tokens=10, stop_ids=(), attention=DenseAttention())
    assert a.rows() == b.rows()


def test_plan_that_keeps_everything_at_this_length_runs_dense():
    """A 60-token window plan at a 40-token length resolves dense: the MoA builder returns the
    dense backend (no span cache) and warns; at a longer length it stays MoA, silently."""
    cfg = tiny_config()
    plan = Plan.uniform(cfg.num_layers, cfg.num_heads, window=60, sink=4)
    assert MoAAttention(plan).resolves_dense(40) and not MoAAttention(plan).resolves_dense(200)
    ac = AttentionConfig(config=cfg, plan=plan, impl="native")
    with pytest.warns(UserWarning, match="running dense attention"):
        assert isinstance(build_attention("moa", ac, 64), DenseAttention)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(build_attention("moa", ac, 200), MoAAttention)


def test_uniform_plan_cache_is_smaller():
    cfg = tiny_config()
    plan = Plan.uniform(cfg.num_layers, cfg.num_heads, window=60, sink=4)
    caches = MoAAttention(plan).init_cache(cfg, 2, 1024, jnp.float32)
    span_bytes = sum(c.nbytes for c in caches)
    dense_bytes = sum(c.nbytes for c in DenseAttention().init_cache(cfg, 2, 1024, jnp.float32))
    # Per KV head: roundup64(4 + 64) = 128 slots instead of 1024 (plus 4 bytes of position).
    assert span_bytes == cfg.num_layers * 2 * cfg.num_kv_heads * 128 * (2 * cfg.head_dim * 4 + 4)
    assert span_bytes < dense_bytes / 7


def test_plan_must_match_model():
    cfg = tiny_config()
    model = init_random(cfg)
    plan = Plan.uniform(cfg.num_layers + 1, cfg.num_heads, window=8)
    with pytest.raises(ValueError, match="layers"):
        generate(model, [[5, 6]], max_new_tokens=2, attention=MoAAttention(plan))


def teacher_forced_greedy(model, prompt, row, oracle):
    """The greedy tokens after each prefix of prompt + row, from one oracle forward over it.

    Attention is causal, so the logits at position i of the whole sequence are those of its
    prefix: the tokens equal `recompute_greedy`'s whenever row is the greedy continuation."""
    g, s = nnx.split(model)
    seq = list(prompt) + list(row)
    buf = jnp.asarray([seq + [0] * (CACHE_LEN - len(seq))])
    logits, _ = forward(g, s, buf, jnp.arange(CACHE_LEN)[None], attention=oracle)
    return np.asarray(jnp.argmax(logits[0], -1))[len(prompt) - 1 : len(seq) - 1].tolist()


# SmolLM2's 30 layers: one forward per prompt (teacher forcing, ~3 s) in the default run, one
# per generated token (~20 s) under -m slow.
@pytest.mark.parametrize(
    "recompute",
    [
        pytest.param(False, id="teacher-forced"),
        pytest.param(True, id="recompute", marks=pytest.mark.slow),
    ],
)
def test_smollm2_sparse_plan_matches_recomputation(smollm2, recompute):
    model, tok = smollm2
    cfg = model.config
    plan = _sparse_plan(cfg, 3)
    text = ["The quick brown fox jumps over the lazy dog. " * 3, "Once upon a time, there was"]
    prompts = [tok.encode(t) for t in text]
    out = generate(
        model,
        prompts,
        max_new_tokens=32,
        stop_ids=(),
        max_cache_len=CACHE_LEN,
        attention=MoAAttention(plan, block_q=32, block_k=32),
    )
    oracle = MoAAttention(plan, length=CACHE_LEN, kernel_backend="reference")
    for p, row in zip(prompts, out.rows()):
        if recompute:
            assert row == recompute_greedy(model, p, 32, oracle)
        else:
            assert row == teacher_forced_greedy(model, p, row, oracle)
