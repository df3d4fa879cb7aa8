"""Retrieval heads and the oracle plan (moa_jax.eval.heads)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moa_jax.cli import run
from moa_jax.eval.heads import NeedleMassAttention, _needle_mass, compare, oracle_plan
from moa_jax.models.registry import TINY_RANDOM_CONFIG, init_random
from moa_jax.models.rotary import rotary_table
from moa_jax.plan import Plan

from test_bad_input import _one_line_error


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


# ------------------------------------------------------------------------------------ the CLI
def _heads(tmp_path, capsys, monkeypatch, argv, *words) -> str:
    """`python -m moa_jax.eval.heads` refusing `argv` before the weights load: exit 2, one
    error line with `words`, no --out folder."""
    import moa_jax.eval.heads as heads

    monkeypatch.setattr(heads, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    out = tmp_path / "heads"
    code = run(heads.main, ["--model", "tiny-random", "--out", str(out), "--no-progress", *argv])
    line = _one_line_error(capsys, code, 2, *words)
    assert not out.exists(), "a refused run left its output folder"
    return line


def _scores_file(tmp_path, shape=(2, 4), **extra) -> str:
    rng = np.random.default_rng(0)
    report = {"scores": {"256": rng.random(shape).tolist()}, "num_items": 3, "seed": 7, **extra}
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps(report))
    return str(path)


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--lengths", "512", "512"], ["--lengths", "512 twice"]),
        (["--lengths", "32"], ["--lengths", ">= 64"]),
        (["--num-items", "0"], ["--num-items", ">= 1"]),
        (["--density", "0"], ["--density", "(0, 1]"]),
        (["--dense-fraction", "1"], ["--dense-fraction", "[0, 1)"]),
        (["--dense-fraction", "0.9"], ["--dense-fraction", "--density", "4 of 4 kv groups"]),
        (["--sink", "-1"], ["--sink", ">= 0"]),
        (["--seed", "-1"], ["--seed", ">= 0"]),
        (["--top", "0"], ["--top", ">= 1"]),
        (["--top", "9"], ["--top 9", "8 heads"]),
        (["--corpus", ""], ["--corpus", "non-empty"]),
    ],
)
def test_cli_refuses_bad_options(tmp_path, capsys, monkeypatch, argv, words):
    _heads(tmp_path, capsys, monkeypatch, argv, *words)


def test_cli_refuses_bad_inputs(tmp_path, capsys, monkeypatch):
    scores = _scores_file(tmp_path)
    argv = ["--scores", scores, "--lengths", "512"]
    _heads(tmp_path, capsys, monkeypatch, argv, "--lengths", "not with --scores")
    bad = tmp_path / "bad.json"
    bad.write_text('{"scores": {}}')
    _heads(tmp_path, capsys, monkeypatch, ["--scores", str(bad)], "--scores", "not a heads.json")
    other = _scores_file(tmp_path, shape=(3, 4))
    _heads(tmp_path, capsys, monkeypatch, ["--scores", other], "--scores", "2 layers x 4 heads")
    _heads(
        tmp_path,
        capsys,
        monkeypatch,
        ["--profile-dir", str(tmp_path / "none")],
        "--profile-dir",
        "no .npz",
    )
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"title": "no text"}\n')
    _heads(tmp_path, capsys, monkeypatch, ["--corpus", str(corpus)], "c.jsonl: line 1", "'text'")


def test_cli_reuses_earlier_scores_without_the_weights(tmp_path, capsys, monkeypatch):
    import moa_jax.eval.heads as heads

    monkeypatch.setattr(heads, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    out = tmp_path / "heads"
    argv = ["--model", "tiny-random", "--scores", _scores_file(tmp_path), "--out", str(out)]
    assert heads.main(argv + ["--density", "0.75", "--dense-fraction", "0.5"]) == 0
    report = json.loads((out / "heads.json").read_text())
    assert (report["lengths"], report["num_items"], report["seed"]) == ([256], 3, 7)
    assert len(report["compare"]["top_heads"]) == 8  # the default 20, capped at 2 x 4 heads
    oracle = Plan.load(out / "oracle_plan.json")
    assert oracle.shape == (2, 4) and oracle.metadata["dense_kv_groups"] == 2
