"""The jnp references (`backend='reference'`) on the conformance suite, and the argument checks
every backend shares."""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from kernel_conformance import HeadMajorDecodeSuite, PrefillSuite, SpanDecodeSuite

from moa_jax.pallas_kernels import sparse_attention


class TestPrefillReference(PrefillSuite):
    backend = "reference"

    def unsupported(self, case):
        if case.slow:
            return "the grid sweeps the kernels' tilings; the reference has none"
        return super().unsupported(case)


class TestSpanDecodeReference(SpanDecodeSuite):
    backend = "reference"
    interpret = None


class TestHeadMajorDecodeReference(HeadMajorDecodeSuite):
    backend = "reference"
    interpret = None


def test_unknown_backend_is_an_error():
    q = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(ValueError, match="backend"):
        sparse_attention(q, q, q, windows=(8, 2), sink=0, backend="cuda")
