"""The attention-method registry (`moa_jax.methods`): every command's one way to build a backend."""

import jax
import numpy as np
import pytest

from moa_jax.methods import (
    METHODS,
    AttentionConfig,
    H2OOptions,
    MoAOptions,
    RecycledOptions,
    StreamingOptions,
    TrainAttentionConfig,
    UniformOptions,
    build_attention,
    build_train_attention,
    parse_method_options,
)
from moa_jax.models.attention import DenseAttention
from moa_jax.models.registry import TINY_RANDOM_CONFIG as CFG
from moa_jax.plan import Plan


def _plan() -> Plan:
    return Plan.uniform(CFG.num_layers, CFG.num_heads, window=24, sink=4)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_builds_and_owns_its_cache(name):
    ac = AttentionConfig(config=CFG, plan=_plan(), impl="native", kernel_backend="reference")
    backend = build_attention(name, ac, 128)
    caches = backend.init_cache(CFG, 2, 128)
    assert len(caches) == CFG.num_layers
    assert {type(c).__name__ for c in caches} == {METHODS[name].cache}


def test_masked_impl_builds_exact_masks():
    ac = AttentionConfig(config=CFG, plan=_plan(), impl="masked")
    assert type(build_attention("moa", ac, 128)).__name__ == "MaskedAttention"
    assert type(build_attention("dense", ac, 128)).__name__ == "MaskedAttention"
    # decode methods run their kernels' jnp oracles under the masked implementation
    assert build_attention("h2o", ac, 128).kernel_backend == "reference"


def test_options_reach_the_backend():
    ac = AttentionConfig(
        config=CFG,
        impl="native",
        options={"recycled.k": "16", "recycled.s": "4", "streaming.sink": "2"},
        num_splits=3,
    )
    rec = build_attention("recycled", ac, 256)
    assert (rec.config.k, rec.config.stride, rec.num_splits) == (16, 4, 3)
    assert build_attention("streaming", ac, 256).sink == 2
    assert build_attention("h2o", ac, 256).k == 32  # K = length / 8 by default


def test_recycled_prefill_plan():
    plan = _plan()
    ac = AttentionConfig(config=CFG, plan=plan, impl="native", options={"recycled.prefill": "plan"})
    rec = build_attention("recycled", ac, 128)
    assert rec.prefill.plan == plan and rec.prefill.length == 128
    with pytest.raises(ValueError, match="recycled.prefill"):
        build_attention(
            "recycled", AttentionConfig(config=CFG, options={"recycled.prefill": "x"}), 128
        )


def test_unavailable_and_unknown_methods_are_errors():
    with pytest.raises(ValueError, match="needs --plan"):
        build_attention("moa", AttentionConfig(config=CFG), 128)
    with pytest.raises(ValueError, match="unknown method"):
        build_attention("magic", AttentionConfig(config=CFG), 128)
    with pytest.raises(ValueError, match="no training form"):
        build_train_attention("h2o", AttentionConfig(config=CFG), TrainAttentionConfig(), 64)


def test_train_forms():
    ac = AttentionConfig(config=CFG, plan=_plan())
    dense = build_train_attention("dense", ac, TrainAttentionConfig(segments=True), 64)
    assert dense.segments
    rec = build_train_attention(
        "recycled", ac, TrainAttentionConfig(prefix_len=32, tail_len=16, top_k=8), 48
    )
    assert type(rec).__name__ == "RecycledTrainAttention"
    moa = build_train_attention("moa", ac, TrainAttentionConfig(), 64)
    assert moa.length == 64 and moa.plan == ac.plan


def test_mesh_is_set_on_every_kernel_backend():
    mesh = jax.sharding.Mesh(
        np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor")
    )
    ac = AttentionConfig(config=CFG, plan=_plan(), impl="native", mesh=mesh)
    for name in ("moa", "recycled", "streaming", "h2o", "dense-kernel"):
        assert build_attention(name, ac, 128).mesh is mesh, name


def test_options_are_typed_and_parsed_once():
    opts = parse_method_options(
        ["recycled.k=16", "recycled.s=none", "uniform.match=heads", "moa.dense_when_full=false"]
    )
    assert opts["recycled"] == RecycledOptions(k=16, stride=None)
    assert opts["uniform"] == UniformOptions(match="heads")
    assert opts["moa"] == MoAOptions(dense_when_full=False)
    assert parse_method_options(["k=8"], default_method="h2o") == {"h2o": H2OOptions(k=8)}
    assert RecycledOptions(stride=0).stride is None  # 0: never refresh
    ac = AttentionConfig(config=CFG, options={"streaming": StreamingOptions(k=12, sink=2)})
    assert ac.options_for("streaming").k == 12 and ac.options_for("h2o") == H2OOptions()
    text = AttentionConfig(config=CFG, options={"streaming.k": "12", "streaming.sink": "2"})
    assert text.options == ac.options


@pytest.mark.parametrize(
    "entry, match",
    [
        ("recycled.k=abc", r"recycled\.k='abc': expected an integer"),
        ("recycled.kk=3", r"unknown option recycled\.kk .*k, stride, threshold, prefill"),
        ("recycled.prefill=x", r"recycled\.prefill='x': expected one of dense, plan"),
        ("recycled.threshold=0.9", r"options of 'recycled': .*check interval"),
        ("uniform.density=2", r"options of 'uniform': density must be in"),
        ("magic.k=1", "unknown method 'magic'"),
        ("dense.k=1", r"unknown option dense\.k \(options of 'dense': none\)"),
        ("k=1", "METHOD.KEY=VALUE"),
    ],
)
def test_option_errors_name_the_option(entry, match):
    settings = [entry] if entry != "recycled.threshold=0.9" else [entry, "recycled.s=none"]
    with pytest.raises(ValueError, match=match):
        parse_method_options(settings)


def test_moa_builder_runs_dense_where_the_plan_keeps_everything():
    full = Plan.uniform(CFG.num_layers, CFG.num_heads, window=4096, sink=0)
    ac = AttentionConfig(config=CFG, plan=full, impl="native")
    with pytest.warns(UserWarning, match="keeps every token at 128"):
        assert build_attention("moa", ac, 128) == DenseAttention()
    kept = AttentionConfig(
        config=CFG, plan=full, impl="native", options={"moa": MoAOptions(dense_when_full=False)}
    )
    assert type(build_attention("moa", kept, 128)).__name__ == "MoAAttention"
