"""The Mosaic GPU (Hopper) prefill kernel: its dk/dv tables on CPU, the kernel itself on a GPU.

GPU checks (`-m gpu`, sm90+) against the jnp oracle in float32 from the same bf16 values: outputs
within 2e-2 (absolute, unit-variance inputs), lse within 2e-2, gradients within 5e-2 of the
oracle gradient's max magnitude, over GQA 1/3/4, ragged kv lengths, query offsets, window 1,
windows beyond T, sinks beyond the window and head dims 64 / 128 / 96 (padded).
"""

import logging
import re

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from moa_jax.pallas_kernels import dispatch, sparse_attention
from moa_jax.pallas_kernels.prefill import mosaic_gpu as moa_prefill_mgpu
from moa_jax.pallas_kernels.prefill.block_tables import MaskSpec
from moa_jax.pallas_kernels.prefill.mosaic_gpu_bwd import dkv_tables
from moa_jax.pallas_kernels.reference import window_sink_attention


@pytest.mark.parametrize(
    "case",
    [
        dict(
            windows=(1, 300, 64, 5000, 17, 130),
            sinks=(0, 64, 3, 0, 200, 1),
            t=300,
            s=300,
            off=0,
            hkv=2,
        ),
        dict(windows=(64, 1000, 7, 1), sinks=(64, 0, 0, 2), t=200, s=700, off=500, hkv=1),
        dict(windows=(129,) * 3, sinks=(0,) * 3, t=256, s=256, off=0, hkv=3),
    ],
)
def test_dkv_tables_cover_every_visible_tile_once(case):
    """Each (KV head, 128-key block) lists every (query head of its group, 64-row query block)
    that sees a key of the block exactly once, the tiles needing the element mask first."""
    spec = MaskSpec(case["windows"], case["sinks"], case["t"], case["s"], case["off"], 64, 128)
    hkv = case["hkv"]
    entries, npart, num = dkv_tables(spec, hkv)
    dense = spec.dense_mask()  # [H, T, S]
    H, nq, nk = spec.num_heads, spec.num_q_blocks, spec.num_k_blocks
    group = H // hkv
    for kvh in range(hkv):
        for n in range(nk):
            item = kvh * nk + n
            got = entries[item, : num[item]].tolist()
            assert len(got) == len(set(got))
            want, want_full = set(), set()
            for h in range(kvh * group, (kvh + 1) * group):
                for m in range(nq):
                    tile = dense[h, m * 64 : (m + 1) * 64, n * 128 : (n + 1) * 128]
                    if tile.any():
                        want.add(h * nq + m)
                        rows = min(64, spec.q_len - m * 64)
                        cols = min(128, spec.kv_len - n * 128)
                        if cols == 128 and tile[:rows, :cols].all():
                            want_full.add(h * nq + m)
            assert set(got) == want
            assert set(got[npart[item] :]) <= want_full  # unmasked tiles are full
            if num[item]:  # padding repeats a real entry
                assert set(entries[item, num[item] :].tolist()) <= {got[-1]}


def test_cpu_dispatch_keeps_triton_and_mgpu_says_why(caplog, monkeypatch):
    monkeypatch.setattr(dispatch, "_logged", set())  # each reason is logged once a process
    q = jnp.ones((1, 8, 2, 64), jnp.bfloat16)
    k = v = jnp.ones((1, 8, 1, 64), jnp.bfloat16)
    assert not moa_prefill_mgpu.available()  # CPU
    out = sparse_attention(q, k, v, windows=(8, 2), sink=0, num_warps=4)  # auto -> Triton
    assert out.shape == q.shape
    with caplog.at_level(logging.INFO, logger="moa_jax.pallas_kernels.dispatch"):
        got = sparse_attention(q, k, v, windows=(8, 2), sink=1, backend="mgpu")
    assert "no interpret mode" in caplog.text  # falls back to Triton, and says why
    want = sparse_attention(q, k, v, windows=(8, 2), sink=1, backend="gpu")
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    assert moa_prefill_mgpu.supported(jnp.bfloat16, 96) and not moa_prefill_mgpu.supported(
        jnp.float32, 64
    )
    assert not moa_prefill_mgpu.supported(jnp.bfloat16, 192)  # dk/dv's shared memory


# ------------------------------------------------------------------------------- on a GPU
def _inputs(b, t, s, h, hkv, d, seed):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (b, t, h, d), jnp.float32).astype(jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, s, hkv, d), jnp.float32).astype(jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, s, hkv, d), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(ks[3], (b, t, h, d), jnp.float32)
    return q, k, v, w


def _oracle(q, k, v, windows, sinks, q_offset=0, kv_lengths=None, return_lse=True):
    with jax.default_matmul_precision("highest"):  # no TF32 in the oracle on GPU
        return window_sink_attention(
            q, k, v, windows, sinks, q_offset=q_offset, kv_lengths=kv_lengths, return_lse=return_lse
        )


def _on_hopper():
    try:
        return moa_prefill_mgpu.available()
    except Exception:  # pragma: no cover
        return False


_GPU_CASES = [
    # b, t, s, h, hkv, d, windows, sinks, q_offset, kv_lengths
    dict(
        b=2,
        t=1000,
        s=1000,
        h=8,
        hkv=2,
        d=128,
        windows=(1, 64, 100, 1000, 333, 2000, 7, 512),
        sinks=(64, 0, 4, 0, 64, 0, 1, 64),
    ),
    dict(
        b=1,
        t=300,
        s=1324,
        h=6,
        hkv=2,
        d=64,
        windows=(1324, 256, 1, 1000, 17, 64),
        sinks=(0, 64, 64, 3, 0, 8),
        q_offset=1024,
    ),
    dict(
        b=2,
        t=777,
        s=777,
        h=4,
        hkv=1,
        d=128,
        windows=(777, 128, 50, 3),
        sinks=(0, 64, 0, 64),
        kv_lengths=(777, 401),
    ),
    dict(
        b=1,
        t=512,
        s=512,
        h=9,
        hkv=3,
        d=96,
        windows=(512, 4096, 1, 200, 64, 65, 128, 300, 7),
        sinks=(0, 0, 300, 4, 100, 0, 64, 1, 0),
    ),
    dict(
        b=1,
        t=2048,
        s=2048,
        h=4,
        hkv=4,
        d=128,
        windows=(2048, 1024, 256, 2048),
        sinks=(0, 64, 64, 0),
    ),
]


@pytest.mark.gpu
@pytest.mark.skipif(not _on_hopper(), reason="needs an sm90+ GPU")
@pytest.mark.parametrize("block_k", [128, 64])
@pytest.mark.parametrize("case", _GPU_CASES)
def test_mgpu_forward_backward_vs_oracle(case, block_k):
    case = dict(case)
    kvl = case.pop("kv_lengths", None)
    kvl = None if kvl is None else jnp.asarray(kvl)
    off = case.pop("q_offset", 0)
    windows, sinks = case.pop("windows"), case.pop("sinks")
    q, k, v, w = _inputs(seed=case["t"] + block_k, **case)

    def loss(fn):
        def f(q, k, v):
            out, lse = fn(q, k, v)
            return jnp.sum(out.astype(jnp.float32) * w) + jnp.sum(
                jnp.where(jnp.isfinite(lse), jnp.sin(lse), 0.0)
            ), (out, lse)

        return f

    ours = lambda q, k, v: sparse_attention(  # noqa: E731
        q,
        k,
        v,
        windows=windows,
        sink=sinks,
        q_offset=off,
        kv_lengths=kvl,
        backend="mgpu",
        block_k=block_k,
        return_lse=True,
    )
    ref = lambda q, k, v: _oracle(q, k, v, windows, sinks, off, kvl)  # noqa: E731
    got_g, (out, lse) = jax.grad(loss(ours), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    with jax.default_matmul_precision("highest"):
        want_g, (ref_out, ref_lse) = jax.grad(loss(ref), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(ref_out, np.float32), atol=2e-2, rtol=2e-2
    )
    finite = np.isfinite(np.asarray(ref_lse))
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
    np.testing.assert_allclose(
        np.asarray(lse)[finite], np.asarray(ref_lse)[finite], atol=2e-2, rtol=1e-3
    )
    for name, g, r in zip("qkv", got_g, want_g):
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        assert g.shape == r.shape and not np.isnan(g).any(), name
        np.testing.assert_allclose(
            g, r, atol=5e-2 * max(1.0, float(np.abs(r).max())), rtol=0, err_msg=f"d{name}"
        )


@pytest.mark.gpu
@pytest.mark.skipif(not _on_hopper(), reason="needs an sm90+ GPU")
def test_auto_picks_mgpu_on_hopper_for_bf16():
    q = jnp.ones((1, 256, 2, 64), jnp.bfloat16)
    k = v = jnp.ones((1, 256, 1, 64), jnp.bfloat16)
    hlo = (
        jax.jit(lambda q, k, v: sparse_attention(q, k, v, windows=(256, 64), sink=0))
        .lower(q, k, v)
        .as_text()
    )
    assert "mosaic_gpu" in hlo.lower()


@pytest.mark.parametrize("kv_lengths", [None, (200, 77)])
def test_lowers_for_cuda_on_cpu(kv_lengths):
    """The forward and both backward kernels pass Pallas' Mosaic GPU lowering (GQA 3, D = 96
    padded, query offset, sinks), on a machine without a GPU."""
    q = jax.ShapeDtypeStruct((2, 200, 6, 96), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 260, 2, 96), jnp.bfloat16)
    kvl = None if kv_lengths is None else jnp.asarray(kv_lengths)

    def loss(q, k, v):
        out, lse = moa_prefill_mgpu.sparse_attention_mgpu(
            q,
            k,
            v,
            windows=(1, 300, 64, 5000, 17, 130),
            sinks=(0, 64, 3, 0, 200, 1),
            q_offset=60,
            kv_lengths=kvl,
        )
        return out.astype(jnp.float32).sum() + jnp.where(jnp.isfinite(lse), lse, 0.0).sum()

    lowered = (
        jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        .trace(q, k, k)
        .lower(lowering_platforms=("cuda",))
    )
    calls = re.findall(r"stablehlo\.custom_call @(\w+)", lowered.as_text())
    assert len([c for c in calls if c.startswith("mosaic_gpu")]) == 3  # forward, dq, dk/dv


def test_auto_dispatch_on_a_hopper_gpu(monkeypatch):
    """With an sm90+ GPU, 'auto' sends bf16 / f16 to the Mosaic GPU kernel with only the
    options it takes, and f32 (and an explicit 'gpu') to the Triton kernel."""
    calls = []

    def fake_mgpu(q, k, v, **kw):
        calls.append(kw)
        return jnp.zeros_like(q), jnp.zeros((q.shape[0], q.shape[2], q.shape[1]), jnp.float32)

    monkeypatch.setattr(moa_prefill_mgpu, "available", lambda: True)
    monkeypatch.setattr(moa_prefill_mgpu, "sparse_attention_mgpu", fake_mgpu)
    q = jnp.ones((1, 16, 2, 64), jnp.bfloat16)
    k = v = jnp.ones((1, 16, 1, 64), jnp.bfloat16)
    sparse_attention(
        q,
        k,
        v,
        windows=(16, 4),
        sink=(0, 2),
        num_warps=4,
        num_stages=3,
        block_q=32,
        block_k=64,
        interpret=False,
    )  # interpret: what a GPU sets
    assert len(calls) == 1
    kw = calls[0]
    assert kw["windows"] == (16, 4) and kw["sinks"] == (0, 2) and kw["block_k"] == 64
    assert kw["num_stages"] == 3 and "num_warps" not in kw and "block_q" not in kw
    out = sparse_attention(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), windows=(16, 4), sink=0
    )  # f32: Triton
    assert len(calls) == 1 and out.dtype == jnp.float32
    sparse_attention(q, k, v, windows=(16, 4), sink=0, backend="gpu")  # explicit Triton
    sparse_attention(q, k, v, windows=(16, 4), sink=0, block_k=16)  # a Triton block size
    assert len(calls) == 1
