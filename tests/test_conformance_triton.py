"""The Triton kernels (`backend='gpu'`) on the conformance suite: in interpret mode on any
machine, compiled on a GPU (`-m gpu`)."""

from __future__ import annotations

import pytest

from kernel_conformance import (
    HeadMajorDecodeSuite,
    PrefillSuite,
    SpanDecodeSuite,
    on_platform,
)

_ON_GPU = [
    pytest.mark.gpu,
    pytest.mark.skipif(not on_platform("gpu"), reason="needs a GPU"),
]


class TestPrefillTriton(PrefillSuite):
    backend = "gpu"
    sweep_examples = 8
    sweep_blocks = (16, 32)
    forward_options = dict(poison=True)  # output buffers start as NaN: an unwritten block fails
    # the TPU kernel's own cases (splash runs them by default)
    slow_cases = frozenset(
        {
            "head_groups_offset_padding",
            "repeated_windows",
            "short_padded",
            "single_query",
            "bf16_lse_d128",
            "bf16_lse_d32",
            "grad_t100",
            "grad_t40",
        }
    )


class TestPrefillTritonGPU(TestPrefillTriton):
    pytestmark = _ON_GPU
    interpret = False
    sweep_examples = None
    slow_cases = frozenset()

    def unsupported(self, case):
        if case.slow:
            return "the grid sweeps tilings in interpret mode; the long cases run them here"
        return super().unsupported(case)

    def block_runs(self, case):
        if case.blocks is None:  # the tiles the GPU runs at, and half of them
            pairs = ((128, 64), (64, 32)) if case.dtype == "bf16" else ((64, 32), (32, 32))
            return [dict(block_q=bq, block_k=bk) for bq, bk in pairs]
        return super().block_runs(case)

    def grad_runs(self, case):
        if case.blocks is None:  # separate backward tiles
            fwd = self.block_runs(case)[0]
            bq, bk = fwd["block_q"], fwd["block_k"]
            return [dict(fwd, block_q_dq=bq // 2, block_k_dq=bk, block_q_dkv=32, block_k_dkv=bk)]
        return super().grad_runs(case)


class TestSpanDecodeTriton(SpanDecodeSuite):
    backend = "gpu"
    sweep_examples = 2

    def runs(self, case):  # split-K: one block per program, three, and the default
        return [dict(per_split=1), dict(per_split=3), {}]


class TestSpanDecodeTritonGPU(TestSpanDecodeTriton):
    pytestmark = _ON_GPU
    interpret = False
    sweep_examples = None
    tolerance_overrides = {"f32": dict(out=1e-4)}

    def runs(self, case):
        return [dict(per_split=1), dict(per_split=4), {}]


class TestHeadMajorDecodeTriton(HeadMajorDecodeSuite):
    backend = "gpu"
    sweep_examples = 4

    def runs(self, case):  # split-K over 3 programs; one program too with one query per KV head
        return [dict(num_splits=3)] + (
            [dict(num_splits=1)] if case.kind == "full" and case.group == 1 else []
        )


class TestHeadMajorDecodeTritonGPU(TestHeadMajorDecodeTriton):
    pytestmark = _ON_GPU
    interpret = False
    sweep_examples = None

    def runs(self, case):
        return [{}]
