"""moa_jax.eval: generators are deterministic and sized, scorers right on hand-made answers,
methods and the masked attention backend exact against the reference."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moa_jax.corpora import Document
from moa_jax.eval import GROUPS, TASKS, TaskContext, resolve_tasks
from moa_jax.eval.tasks import (
    digit_accuracy,
    extract_numbers,
    fit_units,
    insert_at_depths,
    normalise_text,
    recall,
    score_number,
)
from moa_jax.methods import (
    METHODS,
    AttentionConfig,
    MaskedAttention,
    Method,
    UniformOptions,
    register_method,
    resolve_methods,
    uniform_plan,
)
from moa_jax.models.tokenizer import byte_level_tokenizer
from moa_jax.pallas_kernels.reference import causal_mask, mha_reference, window_sink_mask
from moa_jax.plan import Plan

from conftest import tiny_config

DATA = Path(__file__).parent / "data" / "pride_and_prejudice_opening.txt"
LENGTH = 768
GEN_TASKS = [t for t in TASKS.values() if t.kind == "generate"]


@pytest.fixture(scope="module")
def ctx() -> TaskContext:
    docs = [Document("P&P", DATA.read_text()), Document("P&P again", DATA.read_text()[::-1])]
    return TaskContext(
        byte_level_tokenizer(), docs=docs, depths=(0.0, 0.5, 1.0), max_length=LENGTH, ppl_tail=32
    )


# ----------------------------------------------------------------------------- generators
@pytest.mark.parametrize("name", sorted(TASKS))
def test_generators_are_deterministic(ctx, name):
    task = TASKS[name]
    a = task.make_items(ctx, LENGTH, 3, seed=7)
    b = task.make_items(ctx, LENGTH, 3, seed=7)
    assert a == b and [x.meta for x in a] == [x.meta for x in b]
    # An item does not depend on how many items are asked for.
    assert task.make_items(ctx, LENGTH, 2, seed=7) == a[:2]
    c = task.make_items(ctx, LENGTH, 3, seed=8)
    key = (lambda it: it.token_ids) if task.kind == "lm" else (lambda it: it.prompt)
    assert [key(x) for x in c] != [key(x) for x in a]


@pytest.mark.parametrize("name", sorted(t.name for t in GEN_TASKS))
def test_prompts_fit_one_bucket(ctx, name):
    task = TASKS[name]
    items = task.make_items(ctx, LENGTH, 3, seed=0)
    budget = LENGTH - task.max_new_tokens
    for it in items:
        n = ctx.count(it.prompt, it.answer_prefix)
        assert budget - 64 < n <= budget, (n, budget)
        assert it.answer and it.targets
        if name != "common_words":
            for t in it.targets:  # every gold value is in the context
                assert t in it.prompt


def test_retrieval_queries_the_line_at_its_depth(ctx):
    items = TASKS["retrieval"].make_items(ctx, LENGTH, 3, seed=1)
    for it, depth in zip(items, ctx.depths):
        assert it.depth == depth
        lines = [ln for ln in it.prompt.splitlines() if ln.startswith("line ")]
        key = it.meta["key"]
        hit = [i for i, ln in enumerate(lines) if ln.startswith(f"line {key}:")]
        assert hit == [it.meta["line"]]
        assert lines[hit[0]].endswith(f"<{it.answer}>")
        assert hit[0] == round(depth * (len(lines) - 1))
        assert it.answer_prefix.endswith("is <") and key in it.prompt.splitlines()[-1]


def test_needle_depth_and_haystack(ctx):
    items = TASKS["needle"].make_items(ctx, LENGTH, 3, seed=2)
    for it in items:
        body = it.prompt.split("\n\n", 1)[1].rsplit("\n\n", 1)[0]
        pos = body.find(f"The pass key is {it.answer}.")
        assert pos >= 0
        assert abs(pos / len(body) - it.depth) < 0.25
    assert items[0].prompt.split("\n\n")[1].startswith("The pass key is")  # depth 0: at the start
    assert "Bennet" in "".join(it.prompt for it in items)  # real book text


def test_multi_needles_and_chain(ctx):
    mk = TASKS["mk_needle"].make_items(ctx, 1536, 1, seed=3)[0]
    assert mk.prompt.count("special magic numbers for") == 4
    assert mk.answer not in mk.meta["distractors"]
    mv = TASKS["mv_needle"].make_items(ctx, 1536, 1, seed=3)[0]
    assert len(set(mv.targets)) == 4 and mv.answer == " " + ", ".join(mv.targets)
    vt = TASKS["var_track"].make_items(ctx, 1536, 1, seed=3)[0]
    names = vt.targets
    pos = [vt.prompt.find(f"VAR {n} =") for n in names]
    assert all(p >= 0 for p in pos) and pos == sorted(pos)  # the chain keeps its order
    assert f"VAR {names[0]} = {vt.meta['value']}." in vt.prompt
    cw = TASKS["common_words"].make_items(ctx, 1536, 1, seed=3)[0]
    words = [w for w in cw.prompt.split() if w.isalpha() and w.islower()]
    counts = {w: words.count(w) for w in set(words)}
    top = sorted(counts, key=counts.get, reverse=True)[: len(cw.targets)]
    assert set(top) == set(cw.targets)
    assert min(counts[w] for w in cw.targets) > max(
        c for w, c in counts.items() if w not in cw.targets
    )


def test_perplexity_windows_share_their_tail(ctx):
    task = TASKS["perplexity"]
    short = task.make_items(ctx, 256, 2, seed=0)
    long = task.make_items(ctx, LENGTH, 2, seed=0)
    for s, lg in zip(short, long):
        assert len(s.token_ids) == 256 and len(lg.token_ids) == LENGTH
        assert lg.token_ids[-256:] == s.token_ids


# ----------------------------------------------------------------------------- scorers
def test_digit_accuracy_hand_made():
    assert digit_accuracy("12345", "12345") == 1.0
    assert digit_accuracy("12945", "12345") == pytest.approx(0.8)
    assert digit_accuracy("123", "12345") == pytest.approx(0.6)  # partial answer
    assert digit_accuracy("1234567", "12345") == 1.0  # extra digits ignored
    assert digit_accuracy("", "12345") == 0.0 and digit_accuracy(None, "12345") == 0.0
    assert digit_accuracy("52341", "12345") == pytest.approx(0.6)  # 2, 3, 4 in place
    with pytest.raises(ValueError):
        digit_accuracy("1", "")


def test_number_scoring_hand_made():
    assert score_number("12345>", "12345") == {"acc": 1.0, "digit_acc": 1.0}
    assert score_number(" 12345. Is there anything else?", "12345")["acc"] == 1.0
    r = score_number("19847> and 12345", "12345")  # only the first number counts
    assert r["acc"] == 0.0 and r["digit_acc"] == pytest.approx(0.4)
    assert score_number("I do not know.", "12345") == {"acc": 0.0, "digit_acc": 0.0}
    assert score_number("1234", "12345") == {"acc": 0.0, "digit_acc": 0.8}
    assert extract_numbers("a 12, b 3.5 and 0042") == ["12", "3", "5", "0042"]


def test_task_scorers_hand_made(ctx):
    mv = TASKS["mv_needle"].make_items(ctx, 1536, 1, seed=0)[0]
    a, b, c, d = mv.targets
    score = TASKS["mv_needle"].score
    assert score(mv, f" {a}, {b}, {c}, {d}")["recall"] == 1.0
    assert score(mv, f" {b} and {a} and 99999")["recall"] == 0.5
    assert score(mv, f" {a}, {a}, {a}")["recall"] == 0.25
    vt = TASKS["var_track"].make_items(ctx, 1536, 1, seed=0)[0]
    n = vt.targets
    assert TASKS["var_track"].score(vt, " " + " ".join(n))["recall"] == 1.0
    assert TASKS["var_track"].score(vt, f" {n[0]}, {n[1]}, ABCDE")["recall"] == pytest.approx(0.4)
    assert TASKS["var_track"].score(vt, f" {n[0].lower()}")["recall"] == 0.0
    cw = TASKS["common_words"].make_items(ctx, 1536, 1, seed=0)[0]
    w = cw.targets
    assert TASKS["common_words"].score(cw, " " + ", ".join(x.upper() for x in w))["recall"] == 1.0
    assert TASKS["common_words"].score(cw, f" {w[0]}, zzz")["recall"] == pytest.approx(1 / len(w))
    r = TASKS["retrieval"].make_items(ctx, LENGTH, 1, seed=0)[0]
    assert TASKS["retrieval"].score(r, r.answer + ">") == {"acc": 1.0, "digit_acc": 1.0}
    assert recall(["a", "b"], ["a", "c"]) == 0.5


def test_helpers():
    text = "One two. Three four! Five six? Seven."
    assert insert_at_depths(text, ["X."], [0.0]) == "X. " + text
    assert insert_at_depths(text, ["X."], [1.0]) == text + " X."
    mid = insert_at_depths(text, ["X."], [0.5])
    assert mid == "One two. Three four! X. Five six? Seven."
    both = insert_at_depths(text, ["A.", "B."], [0.3, 0.3])
    assert both.count("A.") == 1 and both.count("B.") == 1
    assert normalise_text("a\nb\n\n\n\nc  d\r\n") == "a b\n\nc d"
    u, out = fit_units(lambda u: "x" * u, len, budget=10, hi=100)
    assert (u, out) == (10, "x" * 10)
    with pytest.raises(ValueError):
        fit_units(lambda u: "x" * (u + 20), len, budget=10, hi=100)


def test_resolve_tasks_and_groups():
    assert [t.name for t in resolve_tasks("ruler")] == list(GROUPS["ruler"])
    assert len(resolve_tasks("all")) == len(TASKS)
    assert [t.name for t in resolve_tasks("needle,retrieval,needle")] == ["needle", "retrieval"]
    with pytest.raises(ValueError, match="unknown task"):
        resolve_tasks("nope")


# ----------------------------------------------------------------------------- methods
def test_method_registry_and_uniform_density():
    cfg = tiny_config()
    ctx = AttentionConfig(
        config=cfg, impl="masked", options={"uniform": UniformOptions(density=0.5, sink=16)}
    )
    assert METHODS["moa"].unavailable(ctx) == "needs --plan FILE"
    for name in ("dense", "uniform", "recycled", "streaming", "h2o"):
        assert METHODS[name].unavailable(ctx) is None
    assert [m for m in METHODS if METHODS[m].decode_only] == ["recycled", "streaming", "h2o"]
    assert METHODS["recycled"].kv_density(ctx, 4096) == 0.125
    rec = METHODS["recycled"].build(
        AttentionConfig(config=cfg, impl="masked", options={"recycled.k": "64", "recycled.s": "4"}),
        512,
    )
    assert (rec.config.k, rec.config.stride, rec.kernel_backend) == (64, 4, "reference")

    with pytest.raises(ValueError, match="already registered"):
        register_method(Method("dense", "again", None))
    assert Method("later", "placeholder", None).unavailable(ctx) == "not implemented yet"
    for n in (512, 1000, 4096):
        p = uniform_plan(cfg, n, 0.5, 16)
        assert abs(p.kv_density(n) - 0.5) <= 1 / n
        assert METHODS["uniform"].kv_density(ctx, n) == pytest.approx(p.kv_density(n))
    b = METHODS["uniform"].build(ctx, 512)
    assert isinstance(b, MaskedAttention) and b.windows[0] == (240,) * cfg.num_heads
    assert b.sinks[0] == (16,) * cfg.num_heads
    # With a plan, uniform matches the plan's decode-cache size at every length (with GQA the
    # group's largest span), or with uniform.match=heads its mean span over query heads.
    plan = Plan(
        alphas=[[64.0, 64.0, 64.0, 64.0]] * cfg.num_layers,
        betas=[[0.0, 0.25, 0.5, 1.0]] * cfg.num_layers,
        sinks=64,
    )
    pctx = AttentionConfig(config=cfg, plan=plan, impl="masked")
    hctx = dataclasses.replace(pctx, options={"uniform.match": "heads"})
    assert METHODS["moa"].unavailable(pctx) is None
    for n in (1024, 2048):
        cache = plan.kv_cache_density(n, cfg.num_kv_heads)
        assert cache > plan.kv_density(n) + 0.05
        assert METHODS["uniform"].kv_density(pctx, n) == pytest.approx(cache, abs=1 / n)
        assert METHODS["uniform"].kv_density(hctx, n) == pytest.approx(
            plan.kv_density(n), abs=1 / n
        )
    with pytest.raises(ValueError, match="uniform.match"):
        METHODS["uniform"].kv_density(
            dataclasses.replace(pctx, options={"uniform.match": "x"}), 1024
        )
    assert [m.name for m in resolve_methods("dense,moa")] == ["dense", "moa"]
    with pytest.raises(ValueError, match="unknown method"):
        resolve_methods("dense,magic")


def test_load_plan_both_formats(tmp_path):
    ref = tmp_path / "x.moa.json"
    ref.write_text(json.dumps({"alphas": [[1024, 0]] * 2, "betas": [[0.0, 0.5]] * 2}))
    p = Plan.load(ref)
    assert p.shape == (2, 2) and p.sinks[0][0] == 64
    ours = Plan.uniform(2, 4, window=32, sink=4).save(tmp_path / "plan.json")
    assert Plan.load(ours).resolve(128).tolist() == [[32] * 4] * 2
    with pytest.raises(FileNotFoundError):
        Plan.load(tmp_path / "missing.json")


def _qkv(b=2, t=96, h=4, hkv=2, d=16, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, t, h, d))
    k = jax.random.normal(ks[1], (b, t, hkv, d))
    v = jax.random.normal(ks[2], (b, t, hkv, d))
    return q, k, v


@pytest.mark.parametrize("windows", [None, ((5, 17, 40, 96),), ((8, 8, 8, 8),)])
def test_masked_attention_matches_reference(windows):
    q, k, v = _qkv()
    b, t = q.shape[:2]
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    sinks = None if windows is None else ((3, 0, 3, 7),)
    if windows is None:
        mask = causal_mask(pos, pos)
    else:
        mask = window_sink_mask(pos, pos, jnp.asarray(windows[0]), jnp.asarray(sinks[0]))
    want = mha_reference(q, k, v, mask)
    att = MaskedAttention(windows=windows, sinks=sinks, q_chunk=16)
    got = jax.jit(lambda q, k, v, pos: att(q, k, v, layer=0, positions=pos))(q, k, v, pos)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # Through a cache: prefill (fast path), a continued chunk (general path), decode steps.
    cfg = tiny_config(num_layers=1)
    cache = att.init_cache(cfg, b, t + 8, jnp.float32)[0]
    steps = [(0, 80), (80, 92)] + [(i, i + 1) for i in range(92, t)]
    prefill = jax.jit(lambda *a: att.prefill(*a[:3], layer=0, positions=a[3], cache=a[4]))
    decode = jax.jit(lambda *a: att.decode_step(*a[:3], layer=0, positions=a[3], cache=a[4]))
    for s, e in steps:
        call = prefill if e - s > 1 else decode
        out, cache = call(q[:, s:e], k[:, s:e], v[:, s:e], pos[:, s:e], cache)
        np.testing.assert_allclose(out, want[:, s:e], atol=1e-5, err_msg=f"tokens {s}:{e}")


def test_summary_and_paired_deltas_hand_made():
    from moa_jax.eval.report import paired_deltas, summarize

    recs = []
    for i, (d_acc, u_acc, d_nll, u_nll) in enumerate(
        [(1, 0, 0.5, 1.5), (1, 1, 0.2, 0.4), (0, 0, 1.0, 1.0)]
    ):
        recs.append(
            {
                "task": "retrieval",
                "length": 64,
                "method": "dense",
                "index": i,
                "acc": d_acc,
                "digit_acc": d_acc,
                "nll": d_nll,
                "seconds": 1.0,
            }
        )
        recs.append(
            {
                "task": "retrieval",
                "length": 64,
                "method": "uniform",
                "index": i,
                "acc": u_acc,
                "digit_acc": u_acc,
                "nll": u_nll,
                "seconds": 1.0,
            }
        )
    recs += [
        {"task": "perplexity", "length": 64, "method": m, "index": 0, "nll": v, "seconds": 1.0}
        for m, v in (("dense", np.log(4.0)), ("uniform", np.log(5.0)))
    ]
    rows = {(r["task"], r["method"]): r for r in summarize(recs)}
    assert rows[("retrieval", "dense")]["value"] == pytest.approx(2 / 3)
    assert rows[("retrieval", "uniform")]["nll"] == pytest.approx(2.9 / 3)
    assert rows[("perplexity", "uniform")]["value"] == pytest.approx(5.0)
    deltas = {r["task"]: r for r in paired_deltas(recs)}
    r = deltas["retrieval"]
    assert r["n"] == 3 and r["delta_primary"] == pytest.approx(-1 / 3)
    assert r["delta_nll"] == pytest.approx(1.2 / 3)
    assert r["se_nll"] == pytest.approx(np.std([1.0, 0.2, 0.0], ddof=1) / np.sqrt(3))
    assert deltas["perplexity"]["delta_nll"] == pytest.approx(np.log(5 / 4))


def test_teacher_forcing_through_decoding_matches_forward():
    """decode_logprobs (prefill + forced decode steps) equals the one-pass target_logprobs for
    dense masks, and Recycled Attention with K >= the sequence equals dense (its exact limit)."""
    from flax import nnx

    from moa_jax.eval.runner import decode_logprobs, target_logprobs
    from moa_jax.models.recycled_attention import RecycleConfig, RecycledAttention
    from moa_jax.models.registry import init_random

    cfg = tiny_config()
    graphdef, state = nnx.split(init_random(cfg, seed=1))
    rng = np.random.default_rng(0)
    ctx_len, a = 50, 6
    seq = rng.integers(1, cfg.vocab_size, size=ctx_len + a).astype(np.int32)
    tokens = np.zeros((1, 64), np.int32)
    tokens[0, :ctx_len] = seq[:ctx_len]
    forced = seq[None, ctx_len:]
    full = np.zeros((1, 64), np.int32)
    full[0, : ctx_len + a] = seq
    at = np.arange(ctx_len - 1, ctx_len + a - 1)[None]
    want, want_hit = target_logprobs(
        graphdef,
        state,
        jnp.asarray(full),
        jnp.asarray(at),
        jnp.asarray(forced),
        attention=MaskedAttention(q_chunk=16),
    )
    for backend in (
        MaskedAttention(q_chunk=16),
        RecycledAttention(RecycleConfig(k=128, stride=2), kernel_backend="reference"),
    ):
        got, hit = decode_logprobs(
            graphdef,
            state,
            jnp.asarray(tokens),
            jnp.asarray([ctx_len], jnp.int32),
            jnp.asarray(forced),
            attention=backend,
            cache_len=64 + a,
        )
        np.testing.assert_allclose(got, want, atol=2e-4, err_msg=type(backend).__name__)
        np.testing.assert_array_equal(hit, want_hit)
    # A small recycled cache does change the scores (the decode path is really exercised).
    small, _ = decode_logprobs(
        graphdef,
        state,
        jnp.asarray(tokens),
        jnp.asarray([ctx_len], jnp.int32),
        jnp.asarray(forced),
        attention=RecycledAttention(RecycleConfig(k=4, stride=None), kernel_backend="reference"),
        cache_len=64 + a,
    )
    assert np.abs(np.asarray(small)[0, 1:] - np.asarray(want)[0, 1:]).max() > 1e-3
    np.testing.assert_allclose(small[0, 0], want[0, 0], atol=2e-4)  # from the dense prefill
