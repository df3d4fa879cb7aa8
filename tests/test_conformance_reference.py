"""The jnp references (`backend='reference'`) on the conformance suite, and the argument checks
every backend shares."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from moa_jax.pallas_kernels import sparse_attention

from kernel_conformance import HeadMajorDecodeSuite, PrefillSuite, SpanDecodeSuite


class TestPrefillReference(PrefillSuite):
    backend = "reference"
    # the prefill reference is the oracle itself: the default run checks how the arguments reach
    # it; its gradients (the oracle's, twice) and the model-sized head counts run under -m slow
    slow_cases = frozenset(
        {"grad_gqa3", "grad_offset_padding_lse", "grad_bf16_d128_backward_blocks", "grad_t100",
         "grad_t40", "grad_gqa7_h14_offset_padding_lse", "grad_gqa7_h28_bf16",
         "grad_gqa7_h14_default_blocks_bf16", "gqa4_h32_d128_bf16", "gqa7_h14_d128",
         "gqa7_h28_bf16_offset_padding", "gqa7_h28_default_blocks_padding"}
    )  # fmt: skip

    def unsupported(self, case):
        if case.slow:
            return "the grid sweeps the kernels' tilings; the reference has none"
        return super().unsupported(case)


class TestSpanDecodeReference(SpanDecodeSuite):
    backend = "reference"
    interpret = None
    # 32 query heads over 8: group 4 as in hkv2_group4 (the kernels run them by default)
    slow_cases = frozenset({"hkv8_group4_d128_f32", "hkv8_group4_d128_bf16"})


class TestHeadMajorDecodeReference(HeadMajorDecodeSuite):
    backend = "reference"
    interpret = None
    # 32 query heads over 8: group 4 as in the smaller cases (the kernels run them by default)
    slow_cases = frozenset({"full_hkv8_group4_d128_bf16", "gathered_new_max_hkv8_group4"})


def test_unknown_backend_is_an_error():
    q = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(ValueError, match="backend"):
        sparse_attention(q, q, q, windows=(8, 2), sink=0, backend="cuda")
