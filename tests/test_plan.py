"""Plan: span -> window resolution, exact densities, reference files, JSON round trip, checks."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moa_jax.config import ModelConfig
from moa_jax.errors import PlanError
from moa_jax.pallas_kernels.prefill.block_tables import MaskSpec
from moa_jax.plan import Plan, kept_entries

REF_DIR = Path("/work/shared/reference_plans")
if not REF_DIR.is_dir():
    REF_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference_plans"
REF_FILES = sorted(REF_DIR.glob("*.json")) if REF_DIR.is_dir() else []


def _cfg(layers, heads, kv=None):
    return ModelConfig(
        vocab_size=32,
        hidden_size=heads * 8,
        intermediate_size=16,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv or heads,
        head_dim=8,
    )


def _brute_mask(w, s, n):
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    return (j <= i) & ((i - j < w) | (j < s))


def test_resolve_exact_values():
    p = Plan(
        alphas=[[0.0, 1024.0, -1024.0, 0.0, 0.0]], betas=[[0.5, 0.0, 0.875, 1.0, 0.01]], sinks=64
    )
    n = 4096
    # spans: 2048, 1024, 2560, 4096 (dense), 40.96 -> min span 128
    assert p.resolve(n)[0].tolist() == [2048 - 64, 1024 - 64, 2560 - 64, n, 128 - 64]
    # Rounding up to 64: span 500 -> 512.
    assert Plan(alphas=[[500.0]], betas=[[0.0]], sinks=64).resolve(n)[0, 0] == 512 - 64
    # Short inputs: everything dense.
    assert (p.resolve(100) == 100).all()
    # Span >= N in cache terms is canonicalised to N, and masks are identical anyway.
    q = Plan(alphas=[[0.0]], betas=[[0.5]], sinks=64)
    assert q.resolve(200)[0, 0] == 64  # span 100 -> 128 slots < 200 -> 64 window
    assert q.resolve(250, granularity=1, min_span=0)[0, 0] == 125 - 64


def test_resolved_mask_equals_reference_cache_semantics():
    """Window + sink from resolve keeps exactly sink + (C - sink) keys for late queries and is
    identical to 'sinks ∪ last C-sink tokens' (the reference decode cache)."""
    p = Plan(alphas=[[0.0, 0.0, -1024.0]], betas=[[0.25, 0.5, 0.875]], sinks=64)
    n = 2000
    for w, span in zip(p.resolve(n)[0], p.spans(n)[0]):
        cache = 64 * int(np.ceil(max(np.ceil(span), 128) / 64))
        mask = _brute_mask(w, 64, n)
        if cache >= n:
            assert mask.sum() == n * (n + 1) // 2
        else:
            assert mask[-1].sum() == cache
            assert (mask[-1, :64]).all() and mask[-1, n - (cache - 64) :].all()


def test_uniform_dense_from_windows():
    u = Plan.uniform(3, 4, window=100, sink=4)
    assert (u.resolve(1000) == 100).all() and (u.sink_array() == 4).all()
    assert (u.resolve(50) == 50).all()
    d = Plan.dense(2, 3)
    assert (d.resolve(777) == 777).all()
    assert d.kv_density(777) == 1.0 and d.attention_density(777) == 1.0
    f = Plan.from_windows([[1, 5], [7, 1000]], sinks=[[0, 2], [3, 0]])
    assert f.resolve(300).tolist() == [[1, 5], [7, 300]]
    assert f.sink_array().tolist() == [[0, 2], [3, 0]]
    with pytest.raises(ValueError):
        Plan.uniform(1, 1, window=0)


@settings(max_examples=60, deadline=None)
@given(w=st.integers(1, 80), s=st.integers(0, 70), n=st.integers(1, 90))
def test_kept_entries_exact(w, s, n):
    assert kept_entries(w, s, n) == _brute_mask(w, s, n).sum()
    spec = MaskSpec((w,), (s,), n, n)
    assert spec.kept_entries() == _brute_mask(w, s, n).sum()


@settings(max_examples=30, deadline=None)
@given(w=st.integers(1, 80), s=st.integers(0, 70), t=st.integers(1, 40), off=st.integers(0, 50))
def test_kept_entries_with_offset(w, s, t, off):
    n = off + t
    spec = MaskSpec((w,), (s,), t, n, q_offset=off)
    assert spec.kept_entries() == _brute_mask(w, s, n)[off:].sum()


def test_densities():
    n = 4096
    half = Plan.uniform(1, 1, window=n // 2, sink=0)
    assert half.kv_density(n) == 0.5
    # Span N/2 keeps 75% of the causal triangle (METHODS.md), N/4 about 44%.
    assert abs(half.attention_density(n) - 0.75) < 1e-3
    quarter = Plan.uniform(1, 1, window=n // 4, sink=0)
    assert abs(quarter.attention_density(n) - 0.4375) < 1e-3
    p = Plan.from_windows([[100, 1000]], sinks=[[64, 0]])
    per = p.kv_density(n, per_head=True)
    assert per.tolist() == [[164 / n, 1000 / n]]
    ad = p.attention_density(500, per_head=True)
    for h, (w, s) in enumerate([(100, 64), (500, 0)]):
        assert ad[0, h] == _brute_mask(w, s, 500).sum() / (500 * 501 / 2)


@pytest.mark.skipif(not REF_FILES, reason="reference plans not available")
@pytest.mark.parametrize("path", REF_FILES, ids=lambda p: p.name)
def test_reference_plans_load(path):
    raw = json.loads(path.read_text())
    p = Plan.from_moa_json(path)
    assert p.shape == (len(raw["alphas"]), len(raw["alphas"][0]))
    assert np.allclose(np.asarray(p.alphas), raw["alphas"])
    assert np.allclose(np.asarray(p.betas), raw["betas"])
    streaming = "streamingllm" in path.name
    assert (p.sink_array() == (4 if streaming else 64)).all()
    assert p.metadata["kind"] == ("streamingllm" if streaming else "moa")
    for n in (2048, 8192, 32768):
        w = p.resolve(n)
        assert w.min() >= 1 and w.max() <= n
        if streaming:  # alpha 0, beta 0.5: half the KV kept
            assert abs(p.kv_density(n) - 0.5) < 0.02
    assert Plan.load(path) == p  # load() recognises the reference format too
    hash(p)


@pytest.mark.skipif(not REF_FILES, reason="reference plans not available")
def test_llama3_8b_mean_span():
    """DESIGN.md: mean span of the Llama-3-8B plan is about 4.0k at 8k and 16.2k at 32k."""
    p = Plan.from_moa_json(REF_DIR / "gradientai--Llama-3-8B-Instruct-262k.moa.json")
    assert abs(p.spans(8192).mean() - 4000) < 300
    assert abs(p.spans(32768).mean() - 16200) < 800
    assert 0.4 < p.kv_density(8192) <= 0.55
    p.validate(_cfg(32, 32, 8))


def test_save_load_roundtrip(tmp_path):
    p = Plan(
        alphas=[[0.0, 1024.0], [2048.0, -1024.0]],
        betas=[[0.5, 0.0], [0.125, 1.0]],
        sinks=[[64, 64], [4, 0]],
        metadata={"model": "x/y", "density_budget": 0.5, "profile_lengths": [2048, 4096]},
    )
    path = p.save(tmp_path / "sub" / "plan.json")
    d = json.loads(path.read_text())
    assert d["schema_version"] == 1 and d["metadata"]["model"] == "x/y"
    q = Plan.load(path)
    assert q == p and hash(q) == hash(p)
    assert q.metadata == p.metadata
    assert (q.resolve(5000) == p.resolve(5000)).all()
    d["schema_version"] = 99
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="newer"):
        Plan.load(tmp_path / "bad.json")
    del d["schema_version"]
    d.pop("alphas")
    with pytest.raises(ValueError, match="schema_version"):
        Plan.from_dict(d)


def test_hashable_static():
    a = Plan.uniform(2, 2, 10, 4)
    b = Plan.uniform(2, 2, 10, 4, metadata={"note": "other"})
    assert a == b and hash(a) == hash(b)
    assert a != Plan.uniform(2, 2, 11, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.granularity = 3


def test_validate_errors():
    p = Plan.uniform(2, 4, 10)
    p.validate(_cfg(2, 4, 2))
    with pytest.raises(ValueError, match="2 layers but the model has 3"):
        p.validate(_cfg(3, 4))
    with pytest.raises(ValueError, match="4 query heads per layer but the model has 8"):
        p.validate(_cfg(2, 8))


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="ragged"):
        Plan(alphas=[[0.0], [0.0, 1.0]], betas=0.0, sinks=0)
    with pytest.raises(ValueError, match="shape"):
        Plan(alphas=[[0.0, 1.0]], betas=[[0.0]], sinks=0)
    (tmp_path / "x.json").write_text('{"foo": 1}')
    with pytest.raises(ValueError, match="not a MoA plan"):
        Plan.from_moa_json(tmp_path / "x.json")


def _plan_dict() -> dict:
    return Plan.uniform(2, 3, window=8, sink=2).to_dict()


@pytest.mark.parametrize(
    "change, words",
    [
        ({"sinkz": 4}, "unknown key(s) ['sinkz']"),
        ({"format": "other-plan"}, "format must be one of moa-jax-plan, got 'other-plan'"),
        ({"schema_version": "1"}, "schema_version must be an integer >= 1, got '1'"),
        ({"granularity": 0}, "granularity must be an integer >= 1, got 0"),
        ({"min_span": 1.5}, "min_span must be an integer >= 0, got 1.5"),
        ({"sinks": float("inf")}, "sinks must be an integer >= 0, got inf"),
        ({"sinks": [[1, 2, 2.5], [0, 0, 0]]}, "sinks[0][2] must be an integer >= 0, got 2.5"),
        ({"alphas": [[1.0, "x", 1.0], [1.0, 1.0, 1.0]]}, "alphas[0][1] must be a finite number"),
        ({"betas": [[0.0, 0.0, float("nan")], [0, 0, 0]]}, "betas[0][2] must be a finite number"),
        ({"alphas": "12"}, "alphas must be a list of rows"),
        ({"alphas": [[1.0, 2.0], [1.0]]}, "alphas is ragged"),
        ({"metadata": [1]}, "metadata must be an object"),
        ({"num_heads": 4}, "num_heads=4 but its arrays have 3"),
    ],
)
def test_plan_schema_refuses_naming_the_field(tmp_path, change, words):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({**_plan_dict(), **change}))
    with pytest.raises(PlanError) as e:
        Plan.load(path)
    assert str(path) in str(e.value) and words in str(e.value), str(e.value)


def test_reference_plan_with_unknown_keys_or_bad_entries_is_refused(tmp_path):
    path = tmp_path / "m.moa.json"
    path.write_text(json.dumps({"alphas": [[1.0]], "betas": [[0.5]], "sink": 4}))
    with pytest.raises(PlanError, match=r"unknown key\(s\) \['sink'\]"):
        Plan.load(path)
    path.write_text('{"alphas": [[Infinity]], "betas": [[0.5]]}')
    with pytest.raises(PlanError, match=r"alphas\[0\]\[0\] must be a finite number"):
        Plan.load(path)
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(path)
