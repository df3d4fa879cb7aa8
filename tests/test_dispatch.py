"""The kernel dispatchers (`pallas_kernels.dispatch`): every backend name works for every
operation, an implementation that cannot run a case hands it to the next one in its table, and
the platform / interpret defaults come from one place."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moa_jax.generate import generate
from moa_jax.methods import AttentionConfig, build_attention
from moa_jax.models.llama import init_random

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
        attention=build_attention(method, ac, 32),
        max_cache_len=32,
    )
    return out.rows()


@pytest.mark.parametrize("method", DECODE_METHODS)
def test_mgpu_decodes_every_method(model, method):
    """`kernel_backend='mgpu'` has no decode kernel of its own: decoding falls back to the next
    implementation in the table (Triton), with the same tokens as asking for it directly."""
    assert _tokens(model, method, "mgpu") == _tokens(model, method, "gpu")
