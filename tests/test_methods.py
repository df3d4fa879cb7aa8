"""The attention-method registry (`moa_jax.methods`): every command's one way to build a backend."""

import jax
import numpy as np
import pytest

from moa_jax.methods import (
    METHODS,
    AttentionConfig,
    TrainAttentionConfig,
    build_attention,
    build_train_attention,
)
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
    assert rec.prefill_moa.plan == plan and rec.prefill_moa.length == 128
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
