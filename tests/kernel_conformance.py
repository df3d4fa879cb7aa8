"""The kernel conformance suite: one case table per kernel operation, and the checks of every
case against an oracle that is not the implementation under test.

Operations: prefill (`sparse_attention`), span decode (`span_decode` over a `SpanKVCache`) and
head-major decode (`full_step_decode`, the full step with selection scores, and
`recycled_decode`, a gathered K-slot buffer plus the current token). Each implementation (the
Triton kernel in interpret mode and compiled, the Mosaic GPU kernel, the TPU kernels in interpret
mode and compiled, and the jnp reference) has one test class per operation in
tests/test_conformance_<implementation>.py that subclasses the operation's suite below and
declares only what it does not support (`unsupported`) and how it is launched.

Oracles:
  prefill: `mha_reference` under `window_sink_mask` over the whole sequence, and `jax.grad` of it;
  span decode: the same over the whole sequence before it is written to the cache;
  head-major decode: masked attention in float64 numpy (probabilities and scores).

Tolerances (absolute, unit-variance inputs; the oracle computes in float32 or float64 from the same
bf16 values, and the kernels round probabilities to bf16 before P @ V as flash attention does):
  float32: outputs 2e-5, lse 1e-4, gradients 1e-4 (absolute and relative), selection scores 1e-5;
  bfloat16: outputs 2e-2, lse 2e-2 (1e-3 relative), gradients 5e-2 of the gradient's largest
  magnitude, selection scores 1e-2. A case or an implementation may tighten or loosen one.

Default runs check every case an implementation supports; `-m slow` adds the grid sweeps and the
1000-example property sweeps; `-m gpu` runs the compiled kernels on a GPU (or TPU).
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moa_jax.pallas_kernels import (
    MoASchedule,
    SpanKVCache,
    full_step_decode,
    mha_reference,
    recycled_decode,
    span_decode,
    sparse_attention,
    window_sink_mask,
)

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
TOLERANCES = {
    "f32": dict(out=2e-5, lse=1e-4, lse_rtol=1e-4, grad=1e-4, scores=1e-5, scores_rtol=0.0),
    "bf16": dict(out=2e-2, lse=2e-2, lse_rtol=1e-3, grad=5e-2, scores=1e-2, scores_rtol=1e-2),
}


def on_platform(*platforms: str) -> bool:
    try:
        return jax.default_backend() in platforms
    except RuntimeError:  # pragma: no cover
        return False


def on_hopper() -> bool:
    """An NVIDIA GPU of compute capability 9.0 or newer (the Mosaic GPU kernel's)."""
    try:
        dev = jax.devices()[0]
        return dev.platform == "gpu" and float(getattr(dev, "compute_capability", 0)) >= 9.0
    except (RuntimeError, TypeError, ValueError):  # pragma: no cover
        return False


def examples(default: int):
    """The property sweeps' example counts: `default` in the default run, 1000 under -m slow."""
    return [
        pytest.param(default, id=f"{default}ex"),
        pytest.param(1000, id="1000ex", marks=pytest.mark.slow),
    ]


def sweep_settings(n: int):
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=n < 100,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def sweep_groups(n: int, *groups: int) -> tuple[int, ...]:
    """The GQA groups a sweep of n examples draws: `groups`, and under -m slow also 7 (a group
    that is not a power of two, Qwen2.5-7B's), which the case tables cover in the default run."""
    return groups + ((7,) if n >= 100 else ())


_examples_run = [0]


def fresh_caches(n: int) -> None:
    """Long sweeps compile a program per example shape; a 1000-example span-decode sweep died
    after several hundred with LLVM's "Cannot allocate memory" on the CPU, so the slow sweeps
    drop jax's compilation caches every 50 examples."""
    _examples_run[0] += 1
    if n >= 100 and _examples_run[0] % 50 == 0:
        jax.clear_caches()


def _close(got, want, atol, rtol, msg=""):
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), atol=atol, rtol=rtol, err_msg=msg
    )


class Suite:
    """What every implementation's class sets. `pytest_generate_tests` gives each test taking a
    `case` the cases of `table(test name)` that this implementation supports."""

    backend = "reference"
    interpret: bool | None = True
    # property-sweep examples in the default run (None: this implementation has no sweep)
    sweep_examples: int | None = None
    tolerance_overrides: dict[str, dict[str, float]] = {}
    # cases this implementation runs only under -m slow (they cost interpret-mode minutes and
    # another implementation covers them in the default run)
    slow_cases: frozenset[str] = frozenset()

    def unsupported(self, case) -> str | None:
        """Why this implementation does not run `case` (None: it does)."""
        return None

    def table(self, test: str) -> list:
        raise NotImplementedError

    def tol(self, case, kind: str) -> float:
        over = getattr(case, "tolerances", None) or {}
        imp = self.tolerance_overrides.get(case.dtype, {})
        return imp.get(kind, over.get(kind, TOLERANCES[case.dtype][kind]))

    def pytest_generate_tests(self, metafunc):
        if "case" in metafunc.fixturenames:
            cases = [c for c in self.table(metafunc.function.__name__) if not self.unsupported(c)]
            metafunc.parametrize(
                "case",
                [
                    pytest.param(
                        c,
                        id=c.name,
                        marks=[pytest.mark.slow] if c.slow or c.name in self.slow_cases else [],
                    )
                    for c in cases
                ],
            )
        if "n" in metafunc.fixturenames:
            n = self.sweep_examples
            none = pytest.param(0, id="none", marks=pytest.mark.skip(reason="no sweep here"))
            metafunc.parametrize("n", [none] if n is None else examples(n))


# ================================================================================== prefill
@dataclasses.dataclass(frozen=True)
class PrefillCase:
    """q [b, t, h, d] at positions [q_offset, q_offset + t), k/v [b, s, hkv, d]."""

    name: str
    b: int
    t: int
    s: int
    h: int
    hkv: int
    d: int
    windows: tuple[int, ...]
    sinks: tuple[int, ...]
    dtype: str = "f32"
    q_offset: int = 0
    kv_lengths: tuple[int, ...] | None = None
    # forward block sizes (block_q, block_k) the case is about; None: the implementation's own
    blocks: tuple[tuple[int, int], ...] | None = None
    forward: bool = True  # check outputs and lse
    grad: bool = False  # check dq, dk, dv
    grad_lse: bool = False  # the gradient's loss also reads the lse
    plain: bool = False  # also the output without return_lse
    options: tuple[tuple[str, Any], ...] = ()  # Triton backward block sizes
    tolerances: dict[str, float] | None = None
    large: bool = False  # GPU-sized (long, or a model's head counts): compiled runs only
    slow: bool = False
    seed: int | None = None

    def inputs(self):
        seed = zlib.crc32(self.name.encode()) if self.seed is None else self.seed
        rng = np.random.RandomState(seed % 2**32)
        dt = DTYPES[self.dtype]
        q = jnp.asarray(rng.randn(self.b, self.t, self.h, self.d), jnp.float32).astype(dt)
        k = jnp.asarray(rng.randn(self.b, self.s, self.hkv, self.d), jnp.float32).astype(dt)
        v = jnp.asarray(rng.randn(self.b, self.s, self.hkv, self.d), jnp.float32).astype(dt)
        w = jnp.asarray(rng.randn(self.b, self.t, self.h, self.d), jnp.float32)
        kvl = None if self.kv_lengths is None else jnp.asarray(self.kv_lengths, jnp.int32)
        return q, k, v, w, kvl

    def oracle(self, q, k, v, kvl):
        qpos = jnp.broadcast_to(self.q_offset + jnp.arange(self.t), (self.b, self.t))
        kpos = jnp.arange(self.s)
        valid = None if kvl is None else kpos[None] < kvl[:, None]
        mask = window_sink_mask(
            qpos, kpos, jnp.asarray(self.windows), jnp.asarray(self.sinks), valid
        )
        with jax.default_matmul_precision("highest"):  # no TF32 in the oracle on a GPU
            return mha_reference(q, k, v, mask, return_lse=True)


def _prefill(**kw) -> PrefillCase:
    return PrefillCase(**kw)


PREFILL_CASES = [
    # ---- block tiling at small blocks (GQA 1 to 4, windows of 1 and beyond T, sinks beyond W)
    _prefill(name="mha_window1_dense", b=1, t=100, s=100, h=2, hkv=2, d=64,
             windows=(1, 1000), sinks=(0, 3), blocks=((32, 16),)),
    _prefill(name="gqa3_d128", b=1, t=77, s=77, h=6, hkv=2, d=128,
             windows=(1, 5, 16, 40, 77, 200), sinks=(64, 0, 3, 17, 0, 64), blocks=((32, 16),)),
    _prefill(name="gqa4_bf16_batch2", b=2, t=130, s=130, h=8, hkv=2, d=64, dtype="bf16",
             windows=(1, 2, 31, 64, 65, 100, 130, 999), sinks=(64,) * 8, blocks=((32, 16),)),
    _prefill(name="mqa4_bf16_d128", b=1, t=96, s=96, h=4, hkv=1, d=128, dtype="bf16",
             windows=(8, 96, 33, 1), sinks=(0, 0, 64, 5), blocks=((32, 16),)),
    _prefill(name="query_offset", b=2, t=40, s=130, h=6, hkv=2, d=64, q_offset=90,
             windows=(1, 7, 50, 130, 20, 3), sinks=(0, 64, 10, 0, 4, 64), blocks=((32, 16),)),
    # rows whose window holds only padding see nothing (out 0, lse -inf)
    _prefill(name="padding_empty_rows", b=3, t=130, s=130, h=4, hkv=2, d=64,
             windows=(1, 10, 70, 130), sinks=(0, 0, 5, 64), kv_lengths=(130, 57, 1),
             blocks=((32, 16),)),
    _prefill(name="grad_gqa3", b=1, t=70, s=70, h=6, hkv=2, d=64, windows=(1, 4, 17, 70, 33, 128),
             sinks=(0, 64, 0, 0, 5, 2), blocks=((32, 16),), forward=False, grad=True),
    _prefill(name="grad_offset_padding_lse", b=2, t=48, s=112, h=4, hkv=1, d=64, q_offset=64,
             windows=(1, 30, 112, 9), sinks=(3, 0, 0, 64), kv_lengths=(112, 80),
             blocks=((32, 16),), forward=False, grad=True, grad_lse=True),
    _prefill(name="grad_bf16_d128_backward_blocks", b=1, t=64, s=64, h=4, hkv=2, d=128,
             dtype="bf16", windows=(1, 16, 64, 40), sinks=(64, 0, 0, 4), blocks=((32, 32),),
             forward=False, grad=True,
             options=(("block_q_dq", 16), ("block_k_dq", 32), ("block_q_dkv", 32),
                      ("block_k_dkv", 16))),
    # ---- GQA 7 (Qwen2.5-7B: 28 query heads over 4 KV heads, D 128): a group that is not a
    # power of two; windows and sinks differ within each KV group
    _prefill(name="gqa7_h14_d128", b=1, t=100, s=100, h=14, hkv=2, d=128,
             windows=(1, 5, 16, 40, 100, 200, 33, 7, 7, 64, 1, 1000, 50, 20),
             sinks=(0, 64, 3, 0, 17, 0, 4, 0, 4, 0, 64, 0, 1, 2), blocks=((32, 16),)),
    _prefill(name="gqa7_h28_bf16_offset_padding", large=True, b=2, t=40, s=130, h=28, hkv=4, d=128,
             dtype="bf16", q_offset=90, kv_lengths=(130, 71),
             windows=(1, 7, 50, 130, 20, 3, 999) * 4, sinks=(0, 64, 10, 0, 4, 64, 0) * 4,
             blocks=((32, 16),)),
    _prefill(name="grad_gqa7_h14_offset_padding_lse", b=2, t=48, s=112, h=14, hkv=2, d=128,
             q_offset=64, kv_lengths=(112, 80),
             windows=(1, 30, 112, 9, 64, 17, 2, 5, 5, 200, 1, 40, 40, 3),
             sinks=(3, 0, 0, 64, 16, 0, 1, 0, 64, 0, 0, 16, 16, 2),
             blocks=((32, 16),), forward=False, grad=True, grad_lse=True),
    _prefill(name="grad_gqa7_h28_bf16", large=True,
             b=1, t=64, s=64, h=28, hkv=4, d=128, dtype="bf16",
             windows=(1, 16, 64, 40, 3, 100, 8) * 4, sinks=(64, 0, 0, 4, 1, 0, 16) * 4,
             blocks=((32, 32),), forward=False, grad=True),
    # ---- the implementation's own block sizes
    _prefill(name="default_blocks", b=1, t=200, s=200, h=4, hkv=2, d=64,
             windows=(3, 50, 128, 200), sinks=(64, 0, 2, 0)),
    # heads grouped by (window, sink): (40, 16) spans two KV heads, (1, 0) and (200, 64) one each
    _prefill(name="head_groups_offset_padding", b=2, t=72, s=200, h=4, hkv=2, d=64,
             q_offset=128, windows=(1, 40, 40, 200), sinks=(0, 16, 16, 64),
             kv_lengths=(200, 150)),
    _prefill(name="repeated_windows", b=1, t=130, s=130, h=6, hkv=2, d=64,
             windows=(7, 7, 7, 130, 64, 64), sinks=(0, 0, 0, 0, 3, 3)),
    # short sequences (<= 64 keys: a generate prompt bucket) and a single decode-sized query
    _prefill(name="short_padded", b=2, t=64, s=64, h=4, hkv=2, d=64, windows=(8, 8, 64, 64),
             sinks=(0, 4, 0, 4), kv_lengths=(64, 37)),
    _prefill(name="single_query", b=1, t=1, s=9, h=2, hkv=1, d=64, q_offset=8, windows=(3, 9),
             sinks=(1, 0)),
    # bf16 with a logit scale that is not a power of two (head_dim 128): the lse stays within
    # float32 rounding of the oracle's
    *[
        _prefill(name=f"bf16_lse_d{d}", b=1, t=200, s=200, h=4, hkv=2, d=d, dtype="bf16",
                 windows=(1, 40, 40, 200), sinks=(0, 16, 16, 64), plain=True,
                 tolerances=dict(lse=1e-4, lse_rtol=0.0, out=1e-2))
        for d in (128, 32)
    ],
    # GQA 7 and Llama-3.1-8B / Qwen3-8B / Mistral-7B heads (32 over 8, D 128) at the
    # implementation's own tiles
    _prefill(name="gqa7_h28_default_blocks_padding", large=True,
             b=2, t=130, s=130, h=28, hkv=4, d=128,
             kv_lengths=(130, 45), windows=(1, 40, 40, 130, 7, 200, 16) * 4,
             sinks=(0, 16, 16, 64, 0, 0, 4) * 4),
    _prefill(name="grad_gqa7_h14_default_blocks_bf16", large=True, b=1, t=100, s=100, h=14, hkv=2,
             d=128, dtype="bf16", windows=(1, 40, 40, 200, 7, 64, 16) * 2,
             sinks=(0, 16, 16, 64, 0, 0, 4) * 2, forward=False, grad=True),
    _prefill(name="gqa4_h32_d128_bf16", large=True,
             b=1, t=64, s=64, h=32, hkv=8, d=128, dtype="bf16",
             windows=(1, 8, 64, 16, 33, 4096, 2, 40) * 4, sinks=(0, 4, 0, 64, 0, 1, 16, 0) * 4,
             grad=True),
    # 40: shorter than one 128-wide tile
    *[
        _prefill(name=f"grad_t{t}", b=1, t=t, s=t, h=4, hkv=2, d=64, windows=(1, 40, 40, 200),
                 sinks=(0, 16, 16, 64), forward=False, grad=True)
        for t in (100, 40)
    ],
    # ---- GPU-sized: long sequences, GQA 1 to 4, head dim 96 (padded), windows beyond T
    *[
        _prefill(name=f"{name}_{dt}", dtype=dt, large=True, grad=True, grad_lse=True, **kw)
        for dt in ("bf16", "f32")
        for name, kw in [
            ("long_gqa4", dict(b=2, t=1000, s=1000, h=8, hkv=2, d=128,
                               windows=(1, 64, 100, 1000, 333, 2000, 7, 512),
                               sinks=(64, 0, 4, 0, 64, 0, 1, 64))),
            ("long_offset", dict(b=1, t=300, s=1324, h=6, hkv=2, d=64, q_offset=1024,
                                 windows=(1324, 256, 1, 1000, 17, 64), sinks=(0, 64, 64, 3, 0, 8))),
            ("long_padding", dict(b=2, t=777, s=777, h=4, hkv=1, d=128, kv_lengths=(777, 401),
                                  windows=(777, 128, 50, 3), sinks=(0, 64, 0, 64))),
            ("long_d96_gqa3", dict(b=1, t=512, s=512, h=9, hkv=3, d=96,
                                   windows=(512, 4096, 1, 200, 64, 65, 128, 300, 7),
                                   sinks=(0, 0, 300, 4, 100, 0, 64, 1, 0))),
            ("long_2048", dict(b=1, t=2048, s=2048, h=4, hkv=4, d=128,
                               windows=(2048, 1024, 256, 2048), sinks=(0, 64, 64, 0))),
            # Qwen2.5-7B heads (GQA 7), ragged rows and a query offset
            ("long_gqa7_h28", dict(b=2, t=700, s=1212, h=28, hkv=4, d=128, q_offset=512,
                                   kv_lengths=(1212, 901),
                                   windows=(1, 64, 100, 1212, 333, 2000, 7) * 4,
                                   sinks=(64, 0, 4, 0, 64, 0, 1) * 4)),
            # Llama-3.1-8B / Qwen3-8B / Mistral-7B heads (32 over 8)
            ("long_gqa4_h32", dict(b=1, t=1500, s=1500, h=32, hkv=8, d=128,
                                   windows=(1500, 256, 1, 1000, 17, 64, 4096, 512) * 4,
                                   sinks=(0, 64, 64, 3, 0, 8, 0, 64) * 4)),
        ]
    ],
]  # fmt: skip


def _grid_case(dtype: str, group: int, d: int, t: int) -> PrefillCase:
    windows = (1, 2, 15, 16, 17, 64, t - 1, t, 4 * t)
    h = (len(windows) // group) * group
    return _prefill(
        name=f"grid_{dtype}_group{group}_d{d}_t{t}",
        b=1, t=t, s=t, h=h, hkv=h // group, d=d, dtype=dtype, windows=windows[:h],
        sinks=tuple((0, 1, 4, 64)[i % 4] for i in range(h)),
        blocks=((16, 16), (32, 64), (64, 16)), grad=True, slow=True,
    )  # fmt: skip


# -m slow: every window class at T around the block sizes, three tilings, forward and gradients
PREFILL_GRID = [
    _grid_case(dt, g, d, t)
    for dt in ("f32", "bf16")
    for g in (1, 3, 4, 7)
    for d in (64, 128)
    for t in (63, 129, 256)
]


@st.composite
def prefill_cases(draw, max_t: int = 96, groups: tuple[int, ...] = (1, 2, 3, 4)):
    """Random shapes, windows from 1 to beyond the sequence, sinks, GQA `groups`, query offsets,
    ragged lengths, float32 and bfloat16."""
    hkv = draw(st.integers(1, 2))
    h = hkv * draw(st.sampled_from(groups))
    t = draw(st.integers(1, max_t))
    off = draw(st.integers(0, 40))
    s = t + off
    b = draw(st.integers(1, 2))
    ragged = draw(st.booleans())
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    return PrefillCase(
        name="drawn",
        b=b,
        t=t,
        s=s,
        h=h,
        hkv=hkv,
        d=draw(st.sampled_from([16, 32, 64])),
        dtype=dtype,
        windows=tuple(draw(st.lists(st.integers(1, 2 * s + 1), min_size=h, max_size=h))),
        sinks=tuple(draw(st.lists(st.sampled_from([0, 1, 4, 17, 64]), min_size=h, max_size=h))),
        q_offset=off,
        kv_lengths=tuple(draw(st.integers(1, s)) for _ in range(b)) if ragged else None,
        # the logits come from the same bf16 q and k in float32 in every path (splash's q is
        # pre-scaled in two bf16 parts when the lse is asked for): bf16's lse is close to f32's
        tolerances=dict(lse=1e-3, lse_rtol=1e-3) if dtype == "bf16" else None,
        seed=draw(st.integers(0, 2**16)),
    )


class PrefillSuite(Suite):
    """`sparse_attention(..., backend=self.backend)` against the masked oracle."""

    sweep_max_t = 96
    # the sweep draws these forward block sizes (None: the implementation's own)
    sweep_blocks: tuple[int, ...] | None = None
    forward_options: dict[str, Any] = {}  # e.g. poisoned output buffers

    def unsupported(self, case: PrefillCase) -> str | None:
        if case.large and self.interpret is not False:
            return "GPU-sized: compiled runs only (slow in interpret mode)"
        return None

    def table(self, test):
        if test == "test_forward":
            return [c for c in PREFILL_CASES + PREFILL_GRID if c.forward]
        if test == "test_grads":
            return [c for c in PREFILL_CASES + PREFILL_GRID if c.grad]
        return []

    def block_runs(self, case: PrefillCase) -> list[dict[str, Any]]:
        """The forward launches of `case`: one per block size it names, else the defaults."""
        if case.blocks is None:
            return [{}]
        return [dict(block_q=bq, block_k=bk) for bq, bk in case.blocks]

    def grad_runs(self, case: PrefillCase) -> list[dict[str, Any]]:
        return [dict(self.block_runs(case)[0], **dict(case.options))]

    def run(self, case, q, k, v, kvl, return_lse=True, **options):
        return sparse_attention(
            q,
            k,
            v,
            windows=case.windows,
            sink=case.sinks,
            q_offset=case.q_offset,
            kv_lengths=kvl,
            backend=self.backend,
            interpret=self.interpret,
            return_lse=return_lse,
            **options,
        )

    def check_forward(self, case: PrefillCase, blocks: dict[str, Any]):
        q, k, v, _, kvl = case.inputs()
        ref, ref_lse = case.oracle(q, k, v, kvl)
        msg = f"{case} {blocks}"
        out, lse = self.run(case, q, k, v, kvl, **blocks, **self.forward_options)
        assert out.shape == q.shape and out.dtype == q.dtype, msg
        assert lse.shape == (case.b, case.h, case.t), msg
        assert not np.isnan(np.asarray(out, np.float32)).any(), f"unwritten output: {msg}"
        tol = self.tol(case, "out")
        _close(out, ref, tol, tol, msg)
        fin = np.isfinite(np.asarray(ref_lse))
        np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), fin, err_msg=msg)
        np.testing.assert_allclose(
            np.asarray(lse)[fin],
            np.asarray(ref_lse)[fin],
            atol=self.tol(case, "lse"),
            rtol=self.tol(case, "lse_rtol"),
            err_msg=msg,
        )
        if case.plain:
            plain = self.run(case, q, k, v, kvl, return_lse=False, **blocks)
            _close(plain, ref, 2 * tol, 2 * tol, msg)

    def test_forward(self, case):
        for blocks in self.block_runs(case):
            self.check_forward(case, blocks)

    def test_grads(self, case):
        q, k, v, w, kvl = case.inputs()

        def loss(fn):
            def f(q, k, v):
                out, lse = fn(q, k, v)
                val = jnp.sum(out.astype(jnp.float32) * w)
                if case.grad_lse:
                    val = val + jnp.sum(jnp.where(jnp.isfinite(lse), jnp.sin(lse), 0.0))
                return val

            return f

        def kernel(q, k, v, options):
            if case.grad_lse:
                return self.run(case, q, k, v, kvl, **options)
            return self.run(case, q, k, v, kvl, return_lse=False, **options), None

        with jax.default_matmul_precision("highest"):
            want = jax.grad(loss(lambda q, k, v: case.oracle(q, k, v, kvl)), (0, 1, 2))(q, k, v)
        for options in self.grad_runs(case):
            got = jax.grad(loss(lambda q, k, v, o=options: kernel(q, k, v, o)), (0, 1, 2))(q, k, v)
            for name, g, r in zip("qkv", got, want):
                g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
                msg = f"d{name} {case} {options}"
                assert g.shape == r.shape and not np.isnan(g).any(), msg
                tol = self.tol(case, "grad")
                if case.dtype == "f32":
                    np.testing.assert_allclose(g, r, atol=tol, rtol=tol, err_msg=msg)
                else:
                    scale = max(1.0, float(np.abs(r).max()))
                    np.testing.assert_allclose(g, r, atol=tol * scale, rtol=0, err_msg=msg)

    def test_sweep(self, n):
        blocks = (
            st.just(None)
            if self.sweep_blocks is None
            else st.tuples(st.sampled_from(self.sweep_blocks), st.sampled_from(self.sweep_blocks))
        )

        @sweep_settings(n)
        @given(case=prefill_cases(self.sweep_max_t, sweep_groups(n, 1, 2, 3, 4)), blocks=blocks)
        def check(case, blocks):
            fresh_caches(n)
            if self.unsupported(case):
                return
            runs = [{}] if blocks is None else [dict(block_q=blocks[0], block_k=blocks[1])]
            self.check_forward(case, runs[0])

        check()

    def test_rejects_bad_arguments(self):
        q = jnp.zeros((1, 8, 4, 16))
        k = jnp.zeros((1, 8, 2, 16))
        with pytest.raises(ValueError, match="2 windows for 4 query heads"):
            sparse_attention(q, k, k, windows=(1, 2), sink=0, backend=self.backend)
        with pytest.raises(ValueError, match="3 sinks for 4 query heads"):
            sparse_attention(q, k, k, windows=(1,) * 4, sink=(0, 0, 0), backend=self.backend)


# ============================================================================== span decode
@dataclasses.dataclass(frozen=True)
class SpanCase:
    """b rows of random length in [1, max_len] written to a span cache, one query each at its
    row's last position; windows drawn from 1 to dense, sinks up to `sink` per head."""

    name: str
    hkv: int
    group: int
    d: int
    dtype: str = "f32"
    max_len: int = 150
    sink: int | None = None  # None: drawn from 0, 4, 16
    b: int = 3
    seed: int = 0
    empty: bool = False  # nothing written: every row sees nothing and is 0
    large: bool = False
    slow: bool = False
    tolerances: dict[str, float] | None = None

    def build(self):
        rng = np.random.RandomState(self.seed)
        dt = DTYPES[self.dtype]
        h = self.hkv * self.group
        windows = tuple(int(x) for x in rng.choice([1, 5, 17, 40, 64, 100, 10**6], h))
        sink = int(rng.choice([0, 4, 16])) if self.sink is None else self.sink
        sinks = tuple(int(x) for x in rng.randint(0, sink + 1, h))
        lengths = rng.randint(1, self.max_len + 1, self.b)
        k = jnp.asarray(rng.randn(self.b, self.max_len, self.hkv, self.d), dt)
        v = jnp.asarray(rng.randn(self.b, self.max_len, self.hkv, self.d), dt)
        q = jnp.asarray(rng.randn(self.b, h, self.d), dt)
        return span_inputs(q, k, v, windows, sinks, lengths, write=not self.empty)


def span_inputs(q, k, v, windows, sinks, lengths, write=True):
    """(q, cache, q_positions, dense oracle output [B, H, D])."""
    b, max_len, hkv, d = k.shape
    sched = MoASchedule.build(windows, sinks, hkv, max_len, block=16)
    cache = SpanKVCache.zeros(b, sched, head_dim=d, dtype=k.dtype)
    if write:
        cache = cache.write(k, v, jnp.zeros(b, jnp.int32), jnp.asarray(lengths))
    qpos = jnp.asarray(lengths - 1)
    kpos = jnp.arange(max_len)
    mask = window_sink_mask(
        qpos[:, None],
        kpos,
        jnp.asarray(windows),
        jnp.asarray(sinks),
        kpos[None] < jnp.asarray(lengths)[:, None],
    )
    with jax.default_matmul_precision("highest"):
        dense = mha_reference(q[:, None], k, v, mask)[:, 0]
    return q, cache, qpos, dense


SPAN_CASES = [
    *[
        SpanCase(name=f"hkv{hkv}_group{g}_d{d}_{dt}", hkv=hkv, group=g, d=d, dtype=dt,
                 seed=hkv * 10 + g)
        for hkv, g, d in [(2, 1, 64), (1, 3, 64), (2, 4, 128), (2, 7, 128)]
        for dt in ("f32", "bf16")
    ],
    *[
        SpanCase(name=f"hkv8_group4_d128_{dt}", hkv=8, group=4, d=128, dtype=dt, seed=84,
                 large=True)
        for dt in ("f32", "bf16")
    ],
    # Qwen2.5-7B heads (28 over 4): sinks up to 16, short rows of a few blocks
    SpanCase(name="hkv4_group7_d128_bf16_sinks", large=True, hkv=4, group=7, d=128, dtype="bf16",
             max_len=100, sink=16, seed=47),
    SpanCase(name="empty_cache", hkv=1, group=2, d=64, sink=0, empty=True),
    # GPU-sized: 3000 slots, ragged rows, 1 to many splits
    *[
        SpanCase(name=f"long_hkv{hkv}_group{g}_d{d}_{dt}", hkv=hkv, group=g, d=d, dtype=dt,
                 max_len=3000, sink=64, seed=7 * hkv + g, large=True)
        for hkv, g, d in [(2, 4, 128), (1, 3, 64), (4, 7, 128), (8, 4, 128)]
        for dt in ("f32", "bf16")
    ],
]  # fmt: skip


class SpanDecodeSuite(Suite):
    """`span_decode(..., backend=self.backend)` against dense attention over the sequence."""

    def unsupported(self, case: SpanCase) -> str | None:
        if case.large and self.interpret is not False:
            return "GPU-sized: compiled runs only (slow in interpret mode)"
        return None

    def table(self, test):
        return SPAN_CASES if test == "test_decode" else []

    def runs(self, case) -> list[dict[str, Any]]:
        """The launches of each case (e.g. split-K work per program)."""
        return [{}]

    def check(self, case, q, cache, qpos, dense):
        tol = self.tol(case, "out")
        for options in self.runs(case):
            out = span_decode(
                q, cache, qpos, backend=self.backend, interpret=self.interpret, **options
            )
            assert out.shape == q.shape and out.dtype == q.dtype
            if case.empty:
                assert np.all(np.asarray(out) == 0), options
            else:
                _close(out, dense, tol, tol, f"{case} {options}")

    def test_decode(self, case):
        self.check(case, *case.build())

    def test_sweep(self, n):
        @sweep_settings(n)
        @given(
            hkv=st.integers(1, 2),
            group=st.sampled_from(sweep_groups(n, 1, 2, 3, 4)),
            max_len=st.integers(1, 130),
            dtype=st.sampled_from(sorted(DTYPES)),
            seed=st.integers(0, 2**16),
            data=st.data(),
        )
        def check(hkv, group, max_len, dtype, seed, data):
            fresh_caches(n)
            h = hkv * group
            windows = tuple(
                data.draw(st.lists(st.integers(1, 2 * max_len + 1), min_size=h, max_size=h))
            )
            sink = data.draw(st.sampled_from([0, 1, 4, 16]))
            sinks = tuple(data.draw(st.lists(st.integers(0, sink), min_size=h, max_size=h)))
            rng = np.random.RandomState(seed)
            b, d, dt = 2, 32, DTYPES[dtype]
            lengths = rng.randint(1, max_len + 1, b)
            k = jnp.asarray(rng.randn(b, max_len, hkv, d), dt)
            v = jnp.asarray(rng.randn(b, max_len, hkv, d), dt)
            q = jnp.asarray(rng.randn(b, h, d), dt)
            case = SpanCase(name="drawn", hkv=hkv, group=group, d=d, dtype=dtype)
            self.check(case, *span_inputs(q, k, v, windows, sinks, lengths))

        check()


# ======================================================================== head-major decode
@dataclasses.dataclass(frozen=True)
class HeadMajorCase:
    """q [b, hkv * group, d] over k/v [b, hkv, n, d].

    full: `full_step_decode`, slot j holds position j (visible iff j <= q position), with
    selection scores. gathered: `recycled_decode`, slots in any order at random positions in
    [0, pos_max), a share `empty` of them empty (-1), optionally the current token (`new`).
    """

    name: str
    kind: str  # "full" or "gathered"
    b: int
    hkv: int
    group: int
    n: int
    d: int
    q_positions: tuple[int, ...]
    dtype: str = "f32"
    scores: str | None = "max"
    new: bool = False
    empty: float = 0.3
    pos_max: int = 200
    lone_new: bool = False  # row 0's KV head 0 has only the current token
    block_k: int | None = 16
    seed: int = 0
    large: bool = False
    slow: bool = False
    tolerances: dict[str, float] | None = None

    def build(self):
        rng = np.random.RandomState(self.seed)
        dt = DTYPES[self.dtype]
        b, hkv, n, d = self.b, self.hkv, self.n, self.d
        q = jnp.asarray(rng.randn(b, hkv * self.group, d), dt)
        k = jnp.asarray(rng.randn(b, hkv, n, d), dt)
        v = jnp.asarray(rng.randn(b, hkv, n, d), dt)
        kn = jnp.asarray(rng.randn(b, hkv, d), dt) if self.new else None
        vn = jnp.asarray(rng.randn(b, hkv, d), dt) if self.new else None
        if self.kind == "full":
            pos = None
        else:
            p = rng.randint(0, self.pos_max, (b, hkv, n))
            p[rng.rand(b, hkv, n) < self.empty] = -1
            if self.lone_new:
                p[0, 0] = -1
            pos = jnp.asarray(p)
        return q, k, v, pos, jnp.asarray(self.q_positions), kn, vn


def head_major_oracle(q, k, v, pos, qpos, kn=None, vn=None, scores=None):
    """float64 numpy: out [B, H, D] and, with `scores`, the slot scores [B, Hkv, N] and the new
    token's [B, Hkv] (or None): max or sum over a KV group's query heads of the probabilities."""
    qf, kf, vf = (np.asarray(x, np.float64) for x in (q, k, v))
    b, h, d = qf.shape
    hkv, n = kf.shape[1], kf.shape[2]
    g = h // hkv
    p_np = np.broadcast_to(np.arange(n), (b, hkv, n)) if pos is None else np.asarray(pos)
    keep = (p_np >= 0) & (p_np <= np.asarray(qpos)[:, None, None])
    if kn is not None:
        kf = np.concatenate([kf, np.asarray(kn, np.float64)[:, :, None]], 2)
        vf = np.concatenate([vf, np.asarray(vn, np.float64)[:, :, None]], 2)
        keep = np.concatenate([keep, np.ones((b, hkv, 1), bool)], -1)
    lg = np.einsum("bhd,bhnd->bhn", qf, np.repeat(kf, g, 1)) / np.sqrt(d)
    lg = np.where(np.repeat(keep, g, 1), lg, -np.inf)
    m = lg.max(-1, keepdims=True)
    p = np.exp(lg - np.where(np.isfinite(m), m, 0))
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
    out = np.einsum("bhn,bhnd->bhd", p, np.repeat(vf, g, 1))
    if scores is None:
        return out, None, None
    agg = (np.max if scores == "max" else np.sum)(p.reshape(b, hkv, g, -1), axis=2)
    return out, agg[..., :n], (agg[..., n] if kn is not None else None)


HEAD_MAJOR_CASES = [
    *[
        HeadMajorCase(name=f"full_hkv{hkv}_group{g}_d{d}_{dt}", kind="full", b=3, hkv=hkv,
                      group=g, n=48, d=d, dtype=dt, q_positions=(0, 21, 47), seed=hkv * 7 + g,
                      large=hkv * g >= 28)
        for hkv, g, d, dt in [(2, 1, 32, "f32"), (1, 3, 16, "bf16"), (2, 4, 32, "f32"),
                              (2, 7, 128, "f32"), (4, 7, 128, "bf16"), (8, 4, 128, "bf16")]
    ],
    *[
        HeadMajorCase(name=f"gathered_new_{s}_hkv{hkv}_group{g}", kind="gathered", b=2, hkv=hkv,
                      group=g, n=32, d=d, q_positions=(300, 301), scores=s, new=True,
                      lone_new=True, seed=hkv + 10 * g, large=hkv * g >= 28)
        for hkv, g, d, s in [(2, 2, 16, "max"), (1, 4, 32, "sum"), (2, 7, 128, "max"),
                             (4, 7, 128, "sum"), (8, 4, 128, "max")]
    ],
    HeadMajorCase(name="gathered_bf16_hkv4_group7_future_slots", large=True,
                  kind="gathered", b=2, hkv=4,
                  group=7, n=64, d=128, dtype="bf16", q_positions=(60, 95), scores=None,
                  empty=0.5, pos_max=90, block_k=32, seed=17),
    # some slots lie after the query (invisible)
    HeadMajorCase(name="gathered_bf16_future_slots", kind="gathered", b=2, hkv=2, group=2, n=64,
                  d=32, dtype="bf16", q_positions=(60, 95), scores=None, empty=0.5, pos_max=90,
                  block_k=32, seed=5),
    HeadMajorCase(name="gathered_empty", kind="gathered", b=2, hkv=1, group=2, n=16, d=16,
                  q_positions=(0, 0), empty=1.0, block_k=None),
    # GPU-sized: Llama-3-8B heads (8 KV heads, group 4) and Qwen2.5-7B heads (4 KV heads,
    # group 7) over 4096 slots
    *[
        HeadMajorCase(name=f"long_{kind}_{s}_{dt}{tag}", kind=kind, b=2, hkv=hkv, group=g,
                      n=4096, d=128, dtype=dt, q_positions=qp, scores=s, new=kind == "gathered",
                      empty=0.1, pos_max=5000, block_k=None, large=True,
                      tolerances=dict(out=1e-4 if dt == "f32" else 2e-2, scores=1e-3,
                                      scores_rtol=2e-2))
        for tag, hkv, g in [("", 8, 4), ("_group7", 4, 7)]
        for dt in ("bf16", "f32")
        for kind, s, qp in [("full", "max", (1000, 4095)), ("gathered", None, (2000, 5095)),
                            ("gathered", "sum", (2000, 5095))]
    ],
]  # fmt: skip


class HeadMajorDecodeSuite(Suite):
    """`full_step_decode` / `recycled_decode(..., backend=self.backend)` against float64 numpy."""

    def unsupported(self, case: HeadMajorCase) -> str | None:
        if case.large and self.interpret is not False:
            return "GPU-sized: compiled runs only (slow in interpret mode)"
        return None

    def table(self, test):
        return HEAD_MAJOR_CASES if test == "test_decode" else []

    def runs(self, case) -> list[dict[str, Any]]:
        """The launches of each case (e.g. split-K factors)."""
        return [{}]

    def check(self, case: HeadMajorCase, q, k, v, pos, qpos, kn, vn, runs=None):
        out_w, sc_w, new_w = head_major_oracle(q, k, v, pos, qpos, kn, vn, case.scores)
        tol, sc_tol = self.tol(case, "out"), self.tol(case, "scores")
        sc_rtol = self.tol(case, "scores_rtol")
        b, hkv, n = k.shape[:3]
        blocks = {} if case.block_k is None else dict(block_k=case.block_k)
        for options in self.runs(case) if runs is None else runs:
            kw = dict(
                scores=case.scores,
                backend=self.backend,
                interpret=self.interpret,
                **blocks,
                **options,
            )
            if case.kind == "full":
                res = full_step_decode(q, k, v, qpos, **kw)
                out, sc, new = (res, None, None) if case.scores is None else (*res, None)
            else:
                res = recycled_decode(q, k, v, pos, qpos, kn, vn, **kw)
                out, sc, new = (res, None, None) if case.scores is None else res
            msg = f"{case} {options}"
            assert out.shape == q.shape and out.dtype == q.dtype, msg
            if case.empty >= 1:  # rows that see nothing are exactly 0
                assert np.all(np.asarray(out) == 0), msg
                assert sc is None or np.all(np.asarray(sc) == 0), msg
            _close(out, out_w, tol, tol, msg)
            if case.scores is None:
                continue
            assert sc.shape == (b, hkv, n), msg
            _close(sc, sc_w, sc_tol, sc_rtol, msg)
            if new_w is None:
                assert new is None, msg
            else:
                _close(new, new_w, sc_tol, sc_rtol, msg)
            if case.kind == "full":  # slots after the query score exactly 0
                future = np.arange(n)[None, None] > np.asarray(qpos)[:, None, None]
                assert float(np.max(np.where(future, np.asarray(sc), 0.0))) == 0.0, msg

    def test_decode(self, case):
        self.check(case, *case.build())

    def test_sweep(self, n):
        """Full step (with scores) and gathered slots in any order, some empty, optionally the
        current token. The kernels take buffers of a multiple of 16 slots (as the caches are)."""

        @sweep_settings(n)
        @given(
            hkv=st.integers(1, 2),
            group=st.sampled_from(sweep_groups(n, 1, 2, 4)),
            n_slots=st.integers(1, 5).map(lambda m: 16 * m),
            dtype=st.sampled_from(sorted(DTYPES)),
            seed=st.integers(0, 2**16),
            new=st.booleans(),
        )
        def check(hkv, group, n_slots, dtype, seed, new):
            fresh_caches(n)
            rng = np.random.RandomState(seed)
            qpos = tuple(int(x) for x in rng.randint(0, n_slots, 2))
            shape = dict(b=2, hkv=hkv, group=group, n=n_slots, d=16, dtype=dtype, seed=seed)
            full = HeadMajorCase(name="drawn", kind="full", q_positions=qpos, **shape)
            self.check(full, *full.build(), runs=[{}])
            gathered = HeadMajorCase(
                name="drawn",
                kind="gathered",
                q_positions=(600, 601),
                scores=None,
                new=new,
                pos_max=500,
                **dict(shape, seed=seed + 1),
            )
            self.check(gathered, *gathered.build(), runs=[{}])

        check()
