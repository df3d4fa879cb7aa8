"""The TPU kernels (`backend='tpu'`: splash attention for prefill, the Mosaic TPU decode kernels)
on the conformance suite: in interpret mode on any machine, compiled on a TPU (`-m gpu`, the
marker of the accelerator tests)."""

from __future__ import annotations

import pytest

from kernel_conformance import (
    HeadMajorDecodeSuite,
    PrefillSuite,
    SpanDecodeSuite,
    on_platform,
)

_ON_TPU = [
    pytest.mark.gpu,
    pytest.mark.skipif(not on_platform("tpu"), reason="needs a TPU"),
]


class TestPrefillSplash(PrefillSuite):
    backend = "tpu"
    sweep_examples = 3
    sweep_max_t = 80
    # the Triton kernel runs them by default
    slow_cases = frozenset({"default_blocks", "gqa4_h32_d128_bf16"})

    def unsupported(self, case):
        if case.blocks is not None:
            return "splash tiles are at least 128 wide: the case's small blocks would not run"
        if case.options:
            return "the case's options are the Triton kernel's"
        if case.grad_lse:
            return "splash's lse has no gradient"
        return super().unsupported(case)


class TestSpanDecodeTPU(SpanDecodeSuite):
    backend = "tpu"
    sweep_examples = 2


class TestSpanDecodeTPUCompiled(TestSpanDecodeTPU):
    pytestmark = _ON_TPU
    interpret = False
    sweep_examples = None
    tolerance_overrides = {"f32": dict(out=1e-4)}


class TestHeadMajorDecodeTPU(HeadMajorDecodeSuite):
    backend = "tpu"
    sweep_examples = 4


class TestHeadMajorDecodeTPUCompiled(TestHeadMajorDecodeTPU):
    pytestmark = _ON_TPU
    interpret = False
    sweep_examples = None
