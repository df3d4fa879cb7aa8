"""The Mosaic GPU kernels (`backend='mgpu'`, sm90+) on the conformance suite. They have no
interpret mode: every test here needs a Hopper GPU (`python -m pytest -m gpu
tests/test_conformance_mosaic_gpu.py`). Decode has no Mosaic GPU kernel: 'mgpu' runs the next
implementation in the dispatcher's order (the Triton kernel), which these classes check too."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from moa_jax.pallas_kernels import dispatch

from kernel_conformance import HeadMajorDecodeSuite, PrefillSuite, SpanDecodeSuite, on_hopper

_ON_HOPPER = [
    pytest.mark.gpu,
    pytest.mark.skipif(not on_hopper(), reason="needs an sm90+ GPU"),
]


class TestPrefillMosaicGPU(PrefillSuite):
    pytestmark = _ON_HOPPER
    backend = "mgpu"
    interpret = False
    # its lse is checked as a bf16 kernel's, whatever the case asks of others
    tolerance_overrides = {"bf16": dict(out=2e-2, lse=2e-2, lse_rtol=1e-3)}

    def unsupported(self, case):
        if case.dtype != "bf16":
            return "bf16 / f16 only"
        if case.blocks is not None:
            return "its query tiles are fixed and block_k is 64 or 128"
        if case.options:
            return "the case's options are the Triton kernel's"
        return None

    def block_runs(self, case):
        return [dict(block_k=128), dict(block_k=64)]

    @pytest.mark.parametrize("block_k", [64, 128])
    def test_dispatch_runs_the_mosaic_gpu_kernel(self, block_k):
        # A fallback would pass every case above on the Triton kernel: the cases must be this one's.
        case = dispatch.Case(dispatch.platform(), jnp.bfloat16, 128, None, block_k)
        impl = dispatch.select("prefill", dispatch.PREFILL_IMPLEMENTATIONS, "mgpu", case)
        assert impl.name == "mgpu"

    def grad_runs(self, case):
        return self.block_runs(case)


class TestSpanDecodeMosaicGPU(SpanDecodeSuite):
    pytestmark = _ON_HOPPER
    backend = "mgpu"
    interpret = False
    tolerance_overrides = {"f32": dict(out=1e-4)}


class TestHeadMajorDecodeMosaicGPU(HeadMajorDecodeSuite):
    pytestmark = _ON_HOPPER
    backend = "mgpu"
    interpret = False
