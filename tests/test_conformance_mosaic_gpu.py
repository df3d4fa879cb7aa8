"""The Mosaic GPU prefill kernel (`backend='mgpu'`, sm90+) on the conformance suite. It has no
interpret mode: every test here needs a Hopper GPU (`python -m pytest -m gpu
tests/test_conformance_mosaic_gpu.py`)."""

from __future__ import annotations

import pytest
from kernel_conformance import PrefillSuite, on_hopper


class TestPrefillMosaicGPU(PrefillSuite):
    pytestmark = [
        pytest.mark.gpu,
        pytest.mark.skipif(not on_hopper(), reason="needs an sm90+ GPU"),
    ]
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

    def grad_runs(self, case):
        return self.block_runs(case)
