"""Property-based sweep of every attention kernel against masked dense attention (hypothesis).

Random shapes, windows from 1 to beyond the sequence, sinks, GQA ratios, query offsets, ragged
lengths, float32 and bfloat16, for the prefill kernels (Pallas Triton and splash/Mosaic TPU, both
in interpret mode here), the MoA span decode and the Recycled Attention full-step and gathered
decode kernels. The oracle is `mha_reference` over the whole sequence with the equivalent mask
(or its float64 numpy twin), never the kernel's own reference.

The default run draws a few examples per kernel with a fixed seed (`derandomize`); the `slow`
variant draws 1000 per kernel (`python -m pytest -m slow tests/test_kernel_sweep.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from moa_jax.pallas_kernels import sparse_attention
from moa_jax.pallas_kernels.caches.span import SpanKVCache
from moa_jax.pallas_kernels import span_decode
from moa_jax.pallas_kernels.caches.schedule import MoASchedule
from moa_jax.pallas_kernels import full_step_decode, recycled_decode
from moa_jax.pallas_kernels.reference import mha_reference, window_sink_mask

DTYPES = {"f32": (jnp.float32, 2e-5), "bf16": (jnp.bfloat16, 2e-2)}


def examples(default: int):
    return [
        pytest.param(default, id=f"{default}ex"),
        pytest.param(1000, id="1000ex", marks=pytest.mark.slow),
    ]


def _settings(n: int):
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=n < 100,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def _fresh_caches(n: int) -> None:
    """Long sweeps compile a program per example shape; a 1000-example span-decode sweep died
    after several hundred with LLVM's "Cannot allocate memory" on the CPU, so the slow sweeps
    drop jax's compilation caches every 50 examples."""
    _fresh_caches.count = getattr(_fresh_caches, "count", 0) + 1
    if n >= 100 and _fresh_caches.count % 50 == 0:
        jax.clear_caches()


@st.composite
def prefill_case(draw, max_t: int = 96):
    hkv = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 3, 4]))
    h = hkv * group
    t = draw(st.integers(1, max_t))
    off = draw(st.integers(0, 40))
    s = t + off
    windows = tuple(draw(st.lists(st.integers(1, 2 * s + 1), min_size=h, max_size=h)))
    sinks = tuple(draw(st.lists(st.sampled_from([0, 1, 4, 17, 64]), min_size=h, max_size=h)))
    b = draw(st.integers(1, 2))
    ragged = draw(st.booleans())
    kv_lengths = tuple(draw(st.integers(1, s)) for _ in range(b)) if ragged else None
    return dict(
        b=b,
        t=t,
        s=s,
        h=h,
        hkv=hkv,
        d=draw(st.sampled_from([16, 32, 64])),
        dtype=draw(st.sampled_from(sorted(DTYPES))),
        windows=windows,
        sinks=sinks,
        off=off,
        kv_lengths=kv_lengths,
        seed=draw(st.integers(0, 2**16)),
    )


def _check_prefill(c, backend: str, **blocks):
    dtype, tol = DTYPES[c["dtype"]]
    rng = np.random.RandomState(c["seed"])
    q = jnp.asarray(rng.randn(c["b"], c["t"], c["h"], c["d"]), dtype)
    k = jnp.asarray(rng.randn(c["b"], c["s"], c["hkv"], c["d"]), dtype)
    v = jnp.asarray(rng.randn(c["b"], c["s"], c["hkv"], c["d"]), dtype)
    kvl = None if c["kv_lengths"] is None else jnp.asarray(c["kv_lengths"])
    out, lse = sparse_attention(
        q,
        k,
        v,
        windows=c["windows"],
        sink=c["sinks"],
        q_offset=c["off"],
        kv_lengths=kvl,
        backend=backend,
        return_lse=True,
        **blocks,
    )
    qpos = jnp.broadcast_to(c["off"] + jnp.arange(c["t"]), (c["b"], c["t"]))
    kpos = jnp.arange(c["s"])
    valid = None if kvl is None else kpos[None] < kvl[:, None]
    mask = window_sink_mask(qpos, kpos, jnp.asarray(c["windows"]), jnp.asarray(c["sinks"]), valid)
    ref, ref_lse = mha_reference(q, k, v, mask, return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=tol, err_msg=str(c)
    )
    fin = np.isfinite(np.asarray(ref_lse))
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), fin, err_msg=str(c))
    # lse: the logits come from the same bf16 q and k in float32 in every path (splash's q is
    # pre-scaled in two bf16 parts when the lse is asked for), so bf16 is close to f32 here
    lse_tol = 1e-4 if c["dtype"] == "f32" else 1e-3
    np.testing.assert_allclose(
        np.asarray(lse)[fin], np.asarray(ref_lse)[fin], atol=lse_tol, rtol=lse_tol, err_msg=str(c)
    )


@pytest.mark.parametrize("n", examples(6))
def test_prefill_gpu_kernel_sweep(n):
    @_settings(n)
    @given(c=prefill_case(), bq=st.sampled_from([16, 32]), bk=st.sampled_from([16, 32]))
    def check(c, bq, bk):
        _fresh_caches(n)
        _check_prefill(c, "gpu", block_q=bq, block_k=bk)

    check()


@pytest.mark.parametrize("n", examples(3))
def test_prefill_tpu_kernel_sweep(n):
    @_settings(n)
    @given(c=prefill_case(max_t=80))
    def check(c):
        _fresh_caches(n)
        _check_prefill(c, "tpu")

    check()


@pytest.mark.parametrize("n", examples(5))
def test_span_decode_sweep(n):
    @_settings(n)
    @given(
        hkv=st.integers(1, 2),
        group=st.sampled_from([1, 2, 3, 4]),
        max_len=st.integers(1, 130),
        dtype=st.sampled_from(sorted(DTYPES)),
        seed=st.integers(0, 2**16),
        backend=st.sampled_from(["gpu", "tpu"]),
        data=st.data(),
    )
    def check(hkv, group, max_len, dtype, seed, backend, data):
        _fresh_caches(n)
        h = hkv * group
        dt, tol = DTYPES[dtype]
        windows = tuple(
            data.draw(st.lists(st.integers(1, 2 * max_len + 1), min_size=h, max_size=h))
        )
        sink = data.draw(st.sampled_from([0, 1, 4, 16]))
        sinks = tuple(data.draw(st.lists(st.integers(0, sink), min_size=h, max_size=h)))
        rng = np.random.RandomState(seed)
        b, d = 2, 32
        lengths = rng.randint(1, max_len + 1, b)
        k = jnp.asarray(rng.randn(b, max_len, hkv, d), dt)
        v = jnp.asarray(rng.randn(b, max_len, hkv, d), dt)
        q = jnp.asarray(rng.randn(b, h, d), dt)
        sched = MoASchedule.build(windows, sinks, hkv, max_len, block=16)
        cache = SpanKVCache.zeros(b, sched, head_dim=d, dtype=dt)
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
        want = mha_reference(q[:, None], k, v, mask)[:, 0]
        out = span_decode(q, cache, qpos, backend=backend, interpret=True)
        np.testing.assert_allclose(
            np.asarray(out, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol
        )

    check()


def _dense_probs(q, k, v, mask):
    """float64 numpy masked attention per query head: (probs [B, H, N], out [B, H, D])."""
    qf, kf, vf = (np.asarray(x, np.float64) for x in (q, k, v))
    g = qf.shape[1] // kf.shape[1]
    lg = np.einsum("bhd,bhnd->bhn", qf, np.repeat(kf, g, 1)) / np.sqrt(qf.shape[-1])
    lg = np.where(mask, lg, -np.inf)
    m = lg.max(-1, keepdims=True)
    p = np.exp(lg - np.where(np.isfinite(m), m, 0))
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
    return p, np.einsum("bhn,bhnd->bhd", p, np.repeat(vf, g, 1))


@pytest.mark.parametrize("n", examples(8))
def test_recycled_kernels_sweep(n):
    """Full-step decode (attention + selection scores) and gathered recycled decode."""

    @_settings(n)
    # the kernels take buffers of a multiple of 16 slots (the caches are allocated that way)
    @given(
        hkv=st.integers(1, 2),
        group=st.sampled_from([1, 2, 4]),
        n_slots=st.integers(1, 5).map(lambda m: 16 * m),
        dtype=st.sampled_from(sorted(DTYPES)),
        seed=st.integers(0, 2**16),
        backend=st.sampled_from(["gpu", "tpu"]),
        new=st.booleans(),
    )
    def check(hkv, group, n_slots, dtype, seed, backend, new):
        _fresh_caches(n)
        dt, tol = DTYPES[dtype]
        rng = np.random.RandomState(seed)
        b, d, h = 2, 16, hkv * group
        q = jnp.asarray(rng.randn(b, h, d), dt)
        k = jnp.asarray(rng.randn(b, hkv, n_slots, d), dt)
        v = jnp.asarray(rng.randn(b, hkv, n_slots, d), dt)
        # full step: slot j holds position j, visible iff j <= qpos
        qpos = jnp.asarray(rng.randint(0, n_slots, b))
        out, sc = full_step_decode(q, k, v, qpos, backend=backend, interpret=True, block_k=16)
        mask = np.arange(n_slots)[None, None] <= np.asarray(qpos)[:, None, None]
        p, want = _dense_probs(q, k, v, np.repeat(mask, h, 1))
        np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=tol, rtol=tol)
        np.testing.assert_allclose(
            np.asarray(sc),
            p.reshape(b, hkv, group, -1).max(2),
            atol=1e-5 if dtype == "f32" else 1e-2,
        )
        # gathered slots in any order, some empty (-1), plus optionally the current token
        pos = rng.randint(0, 500, (b, hkv, n_slots))
        pos[rng.rand(b, hkv, n_slots) < 0.3] = -1
        kn = jnp.asarray(rng.randn(b, hkv, d), dt) if new else None
        vn = jnp.asarray(rng.randn(b, hkv, d), dt) if new else None
        out = recycled_decode(
            q,
            k,
            v,
            jnp.asarray(pos),
            jnp.asarray([600, 601]),
            kn,
            vn,
            backend=backend,
            interpret=True,
            block_k=16,
        )
        keep = np.asarray(pos) >= 0
        k2, v2 = k, v
        if new:
            k2 = jnp.concatenate([k, kn[:, :, None]], 2)
            v2 = jnp.concatenate([v, vn[:, :, None]], 2)
            keep = np.concatenate([keep, np.ones((b, hkv, 1), bool)], -1)
        _, want = _dense_probs(q, k2, v2, np.repeat(keep, group, 1))
        seen = np.repeat(keep.any(-1), group, 1)[..., None]  # rows with no key are zero
        np.testing.assert_allclose(
            np.asarray(out, np.float32), np.where(seen, want, 0.0), atol=tol, rtol=tol
        )

    check()
