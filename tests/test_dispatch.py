"""The kernel dispatchers (`pallas_kernels.dispatch`): every backend name works for every
operation, an implementation that cannot run a case hands it to the next one in its table, and
the platform / interpret defaults come from one place."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moa_jax.bench import program_hashes
from moa_jax.errors import ConfigError
from moa_jax.generate import generate
from moa_jax.methods import AttentionConfig, build_attention
from moa_jax.models.registry import init_random
from moa_jax.pallas_kernels import dispatch, full_step_decode, sparse_attention

from conftest import tiny_config

DECODE_METHODS = ("recycled", "dense-kernel", "streaming", "h2o")


@pytest.fixture(scope="module")
def model():
    return init_random(tiny_config(), seed=3)


def _tokens(model, method, kernel_backend):
    ac = AttentionConfig(
        model.config, impl="native", kernel_backend=kernel_backend, interpret=True, block=16
    )
    prompts = [[5, 9, 11, 40, 7, 8, 2, 30, 31], [4, 6, 90, 100, 12]]
    out = generate(
        model,
        prompts,
        max_new_tokens=3,
        stop_ids=(),
        attention=build_attention(method, ac, 96),  # recycled: K = 96 // 8 >= its stride 10
        max_cache_len=32,
    )
    return out.rows()


@pytest.mark.parametrize("method", DECODE_METHODS)
def test_mgpu_decodes_every_method(model, method):
    """`kernel_backend='mgpu'` has no decode kernel of its own: decoding falls back to the next
    implementation in the table (Triton), with the same tokens as asking for it directly."""
    assert _tokens(model, method, "mgpu") == _tokens(model, method, "gpu")


def _case(**kw):
    return dispatch.Case(**{"platform": "cpu", "dtype": jnp.bfloat16, "head_dim": 64, **kw})


def test_tables_fall_back_in_order_and_say_why(caplog, monkeypatch):
    monkeypatch.setattr(dispatch, "_logged", set())
    with caplog.at_level(logging.INFO, logger="moa_jax.pallas_kernels.dispatch"):
        for op, table in (
            ("span decode", dispatch.SPAN_DECODE_IMPLEMENTATIONS),
            ("head-major decode", dispatch.HEAD_MAJOR_DECODE_IMPLEMENTATIONS),
        ):
            assert dispatch.select(op, table, "mgpu", _case()).name == "gpu"
            assert "no 'mgpu' kernel" in caplog.text
        prefill = dispatch.PREFILL_IMPLEMENTATIONS
        assert dispatch.select("prefill", prefill, "mgpu", _case()).name == "gpu"
        assert "no interpret mode" in caplog.text
        # compiled (not interpreted) kernels need their platform: on a CPU only jnp is left
        assert dispatch.select("prefill", prefill, "gpu", _case(interpret=False)).name == (
            "reference"
        )
        assert "it needs a gpu (this is a cpu)" in caplog.text
    for name in ("gpu", "tpu", "reference"):  # a request that runs is taken as is
        assert dispatch.select("prefill", prefill, name, _case()).name == name
    assert dispatch.select("prefill", prefill, "auto", _case()).name == "gpu"  # CPU: interpret
    # 'auto' on a TPU or GPU machine takes only that platform's kernels
    assert dispatch.select("prefill", prefill, "auto", _case(platform="tpu")).name == "tpu"
    assert dispatch.select("prefill", prefill, "auto", _case(platform="gpu")).name == "gpu"
    monkeypatch.setattr(dispatch.mosaic_gpu, "available", lambda: True)
    assert dispatch.select("prefill", prefill, "auto", _case(platform="gpu")).name == "mgpu"
    for bad in (dict(dtype=jnp.float32), dict(head_dim=192), dict(block_k=32)):
        assert dispatch.select("prefill", prefill, "mgpu", _case(platform="gpu", **bad)).name == (
            "gpu"
        )
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.select("prefill", prefill, "cuda", _case())


def test_one_interpret_default():
    here = dispatch.platform()
    assert here in ("cpu", "gpu", "tpu")
    for kernel in ("gpu", "tpu"):
        assert dispatch.resolve_interpret(kernel, None) == (kernel != here)
        assert dispatch.resolve_interpret(kernel, True) and not dispatch.resolve_interpret(
            kernel, False
        )
    assert not dispatch.resolve_interpret(None, None)  # jnp code


def test_fallback_drops_options_the_kernel_does_not_take():
    """Mosaic GPU options reach Triton only when Triton was not asked for by name (asked for
    by name, an option it does not take is an error)."""
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 32, 2, 16), jnp.float32)
    k = v = q[:, :, :1]
    kw = dict(windows=(8, 32), sink=2)
    got = sparse_attention(q, k, v, backend="mgpu", num_stages_dkv=3, **kw)
    want = sparse_attention(q, k, v, backend="gpu", **kw)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ConfigError, match=r"the 'gpu' kernel does not take .*num_stages_dkv"):
        sparse_attention(q, k, v, backend="gpu", num_stages_dkv=3, **kw)


def test_lowering_for_a_gpu_picks_its_compiled_kernels():
    q, k = jnp.zeros((1, 4, 64)), jnp.zeros((1, 2, 128, 64))

    def step(q, k):
        return full_step_decode(q, k, k, jnp.zeros(1, jnp.int32), backend="gpu", interpret=False)

    assert "pallas_call" not in str(jax.make_jaxpr(step)(q, k))  # CPU: the reference runs
    with dispatch.lowering_for("gpu"):  # a new function: jit reuses the trace of `step`
        assert "pallas_call" in str(jax.make_jaxpr(lambda q, k: step(q, k))(q, k))
    with pytest.raises(ValueError, match="'gpu' or 'tpu'"):
        with dispatch.lowering_for("cuda"):
            pass


def test_program_hashes_are_stable_and_name_every_program(capsys):
    assert program_hashes.main([]) == 0
    first = capsys.readouterr().out.splitlines()
    assert len(first) == 6 and len({line.split()[0] for line in first}) == 6
    assert program_hashes.main([]) == 0
    assert capsys.readouterr().out.splitlines() == first
