"""The attention-method registry (`moa_jax.methods`): every command's one way to build a backend."""

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from moa_jax.errors import ConfigError, PlanError
from moa_jax.eval.__main__ import main as eval_main
from moa_jax.generate.__main__ import main as generate_main
from moa_jax.methods import (
    METHODS,
    AttentionConfig,
    H2OOptions,
    Method,
    MethodOptions,
    MoAOptions,
    RecycledOptions,
    StreamingOptions,
    TrainAttentionConfig,
    UniformOptions,
    build_attention,
    build_train_attention,
    parse_method_options,
    register_method,
)
from moa_jax.models.attention import DenseAttention
from moa_jax.models.registry import TINY_RANDOM_CONFIG as CFG
from moa_jax.plan import Plan
from moa_jax.train.config import ATTENTIONS
from moa_jax.train.config import parse_config as parse_train_config

DATA_DIR = Path(__file__).parent / "data"


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
    with pytest.raises(ValueError, match="needs --plan"):
        build_train_attention("moa", AttentionConfig(config=CFG), TrainAttentionConfig(), 64)


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


@dataclasses.dataclass(frozen=True)
class SlidingOptions(MethodOptions):
    window: int = 1024
    sink: int = 4


@pytest.fixture
def sliding():
    """A method registered by the test (docs/architecture.md, "Add a method"); the builds it
    saw, as (typed options, length)."""
    seen = []

    def build(ac, n):
        o = ac.options_for("sliding")
        seen.append((o, n))
        plan = Plan.uniform(ac.config.num_layers, ac.config.num_heads, o.window, o.sink)
        return ac.backend_for_plan(plan, n)

    register_method(
        Method(
            "sliding",
            "one sliding window + sinks for every head",
            build,
            kv_density=lambda ac, n: min(1.0, ac.options_for("sliding").window / n),
            cache="SpanKVCache",
            options=SlidingOptions,
        )
    )
    yield seen
    del METHODS["sliding"]


def test_a_registered_method_is_reachable_from_generate_and_eval(sliding, tmp_path, capsys):
    assert (
        generate_main(
            [
                "--model",
                "tiny-random",
                "--method",
                "sliding",
                "--method-opt",
                "window=24",
                "--method-opt",
                "sliding.sink=2",
                "--max-new-tokens",
                "2",
                "--prompt",
                "hi",
            ]
        )
        == 0
    )
    assert sliding[-1][0] == SlidingOptions(window=24, sink=2)
    with pytest.raises(ValueError, match=r"sliding\.window='x': expected an integer"):
        generate_main(["--model", "tiny-random", "--method", "sliding", "--method-opt", "window=x"])
    out = tmp_path / "eval"
    argv = ["--model", "tiny-random", "--fast", "--corpus", str(DATA_DIR), "--lengths", "512"]
    argv += ["--tasks", "retrieval", "--no-progress", "--no-plots", "--out", str(out)]
    assert eval_main(argv + ["--method", "sliding", "--method-opt", "sliding.window=32"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in res["records"]} == {"sliding"}
    assert res["methods"]["sliding"]["kv_density"]["512"] == pytest.approx(32 / 512)
    assert (SlidingOptions(window=32), 512) in sliding
    with pytest.raises(ValueError, match=r"unknown option sliding\.size .*window, sink"):
        eval_main(argv + ["--method", "sliding", "--method-opt", "sliding.size=3"])


def test_train_method_flag_is_the_attention():
    argv = ["--method", "recycled", "--prefix-len", "8", "--tail-len", "8", "--top-k", "4"]
    cfg = parse_train_config(argv)
    assert cfg.attention == "recycled" and cfg.method is None
    assert "moa" in ATTENTIONS and "h2o" not in ATTENTIONS  # the trainable methods


def test_generate_method_errors_come_before_the_weights(monkeypatch):
    from moa_jax.models import registry

    monkeypatch.setattr(registry, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(ValueError, match="--method moa cannot run: needs --plan"):
        generate_main(["--model", "tiny-random", "--method", "moa"])
    with pytest.raises(ValueError, match=r"unknown option dense\.k"):
        generate_main(["--model", "tiny-random", "--method-opt", "k=3"])
    with pytest.raises(SystemExit, match="for \\['h2o'\\], but the method is 'recycled'"):
        generate_main(["--model", "tiny-random", "--recycle-k", "16", "--method-opt", "h2o.k=3"])


def test_option_and_plan_errors_are_user_errors():
    with pytest.raises(ConfigError):
        parse_method_options(["recycled.k=abc"])
    with pytest.raises(PlanError, match="needs the model's layer and head counts"):
        Plan.load("dense")
    assert Plan.load("streaming:16:2", 2, 4) == Plan.uniform(2, 4, window=16, sink=2)
