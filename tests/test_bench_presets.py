"""The benchmarks' presets of published models (`moa_jax.bench.random_model.HF_CONFIGS`): their
sizes against the published ones, their family switches, and the decode and profile
benchmarks on them: every program traced at full size (nothing allocated), and the CPU smoke
runs on the narrowed presets."""

import json

import pytest

from moa_jax.bench import decode as bench_decode
from moa_jax.bench import influence_profiling as bench_profile
from moa_jax.bench.decode_config import DecodeConfig
from moa_jax.bench.decode_variants import moa_plan
from moa_jax.bench.head_configs import kv_density
from moa_jax.bench.random_model import (
    HF_CONFIGS,
    PUBLISHED_PARAMS,
    SHAPE_NAMES,
    model_config,
    model_shape,
    param_count,
)

PRESETS = ["llama3.1-8b", "mistral-7b", "qwen2.5-7b", "qwen3-8b"]
# The CPU smoke runs (about 30 s each on 2 cores): by default on the preset whose structure the
# other tests' shapes do not have (GQA group 7 with q/k/v biases); the others under -m slow
# (Qwen3's q/k norms run in tests/test_families*.py).
SMOKE = [
    pytest.param("llama3.1-8b", marks=pytest.mark.slow),
    pytest.param("mistral-7b", marks=pytest.mark.slow),
    "qwen2.5-7b",
    pytest.param("qwen3-8b", marks=pytest.mark.slow),
]


def test_presets_are_listed():
    assert set(PRESETS) == set(HF_CONFIGS) == set(PUBLISHED_PARAMS)
    assert {"llama3-8b", "smollm2-135m", "tiny", *PRESETS} == set(SHAPE_NAMES)


@pytest.mark.parametrize("name", PRESETS)
def test_parameter_count_is_the_published_size(name):
    n = param_count(model_config(name))  # abstract model: nothing allocated
    assert abs(n / PUBLISHED_PARAMS[name] - 1) < 0.01, (name, n)


def test_family_switches_and_shapes():
    c = {name: model_config(name) for name in PRESETS}
    for name, cfg in c.items():
        assert cfg.head_dim == 128 and cfg.hidden_act == "silu" and not cfg.tie_word_embeddings
        assert not cfg.has_model_window and not cfg.o_bias and not cfg.mlp_bias, name
    llama, mistral, qwen2, qwen3 = (c[n] for n in PRESETS)
    assert (llama.family, llama.rope_scaling.rope_type, llama.rope_scaling.factor) == (
        "llama",
        "llama3",
        8.0,
    )
    assert llama.rope_theta == 500000.0 and llama.vocab_size == 128256
    assert mistral.family == "mistral" and mistral.rope_theta == 1e6 and mistral.vocab_size == 32768
    assert (qwen2.family, qwen2.qkv_bias, qwen2.qk_norm) == ("qwen2", True, False)
    assert (qwen2.num_layers, qwen2.num_heads, qwen2.num_kv_heads, qwen2.group_size) == (
        28,
        28,
        4,
        7,
    )
    assert (qwen2.hidden_size, qwen2.intermediate_size, qwen2.vocab_size) == (3584, 18944, 152064)
    assert (qwen3.family, qwen3.qkv_bias, qwen3.qk_norm) == ("qwen3", False, True)
    assert (qwen3.num_layers, qwen3.intermediate_size, qwen3.vocab_size) == (36, 12288, 151936)
    for cfg in (mistral, qwen2, qwen3):
        assert cfg.rope_scaling.rope_type == "default" and cfg.rope_theta == 1e6
    # JSON-ready fields (the profile benchmark's rows), and a layer override
    assert json.loads(json.dumps(model_shape("llama3.1-8b")))["rope_scaling"]["factor"] == 8.0
    assert model_config("qwen3-8b", 2).num_layers == 2


@pytest.mark.parametrize("name", PRESETS)
def test_synthetic_moa_plan_keeps_half_the_cache(name):
    """The decode benchmark's 'het:0.5' plan on the preset: every layer, a quarter of the heads
    dense as whole KV groups (Qwen2.5: one group of 7), KV density and cache 0.5 of dense."""
    cfg = model_config(name)
    s = DecodeConfig(contexts=[32768], steps=50).resolved().cache_len(32768)
    plan = moa_plan("het:0.5", cfg, s)
    assert (plan.num_layers, plan.num_heads) == (cfg.num_layers, cfg.num_heads)
    w, sk = plan.layer_windows(s, cfg.num_layers - 1), plan.layer_sinks(cfg.num_layers - 1)
    assert abs(kv_density(w, sk, s) - 0.5) < 0.01
    g = cfg.group_size
    kept = [min(s, int(wi) + int(si)) for wi, si in zip(w, sk)]
    groups = [kept[i * g : (i + 1) * g] for i in range(cfg.num_kv_heads)]
    assert all(len(set(grp)) == 1 for grp in groups)  # dense heads are whole KV groups
    cache = sum(max(grp) for grp in groups) / (cfg.num_kv_heads * s)
    assert abs(cache - 0.5) < 0.01


@pytest.mark.parametrize("name", PRESETS)
def test_decode_traces_at_full_size(name, tmp_path):
    """The GPU script's decode runs (MoA at 0.5 and the dense kernel, 32k), traced on the
    abstract full-size model: caches filled and the decode loop, nothing allocated."""
    out = tmp_path / "trace.json"
    argv = ["--shape", name, "--trace-only", "--method", "dense-kernel", "moa"]
    argv += ["--moa-densities", "0.5", "--contexts", "32768", "--batches", "max"]
    assert bench_decode.main([*argv, "--steps", "50", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["model"]["num_layers"] == model_config(name).num_layers
    by = {r["variant"]: r for r in rep["rows"]}
    assert set(by) == {"dense-kernel", "moa het:0.5"}
    assert all(r["status"] == "traced" for r in by.values())
    dense, moa = by["dense-kernel"], by["moa het:0.5"]
    assert abs(moa["kv_cache_gib"] / dense["kv_cache_gib"] - 0.5) < 0.02
    assert moa["max_batch_80gb"] >= 2 * dense["max_batch_80gb"] - 1 >= 1


@pytest.mark.parametrize("name", SMOKE)
def test_decode_smoke_run_of_the_narrowed_preset(name, tmp_path):
    out = tmp_path / "decode.json"
    argv = ["--tiny", "--shape", name, "--narrow", "--layers", "2", "--method", "dense-kernel"]
    argv += ["moa", "--moa-densities", "0.5", "--batches", "1", "--steps", "2"]
    assert bench_decode.main([*argv, "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    cfg = model_config(name)
    m = rep["model"]
    assert (m["family"], m["num_heads"], m["num_kv_heads"]) == (
        cfg.family,
        cfg.num_heads,
        cfg.num_kv_heads,
    )
    assert (m["qkv_bias"], m["qk_norm"]) == (cfg.qkv_bias, cfg.qk_norm)
    assert [r["status"] for r in rep["rows"]] == ["ok", "ok"]


@pytest.mark.parametrize("name", SMOKE)
def test_profile_smoke_run_of_the_narrowed_preset(name, tmp_path):
    out = tmp_path / "profile.json"
    argv = ["--shape", name, "--narrow", "--layers", "2", "--length", "128", "--items", "2"]
    argv += ["--answer-tokens", "16", "--dtype", "float32", "--estimator", "answer-copy"]
    assert bench_profile.main([*argv, "--remat-on-oom", "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["shape"] == name and row["family"] == model_config(name).family and row["narrow"]
    assert row["config"]["num_kv_heads"] == model_config(name).num_kv_heads
    assert row["steady_items"] == 1 and row["profile_stage_s"] > 0
