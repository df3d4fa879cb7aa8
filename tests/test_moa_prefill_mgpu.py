"""The Mosaic GPU (Hopper) prefill kernel: its dk/dv tables and its lowering on CPU, and the
dispatch to it. Its outputs and gradients are checked by the conformance suite
(tests/test_conformance_mosaic_gpu.py, `-m gpu` on an sm90+ GPU)."""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moa_jax.pallas_kernels import dispatch, sparse_attention
from moa_jax.pallas_kernels.prefill import mosaic_gpu as moa_prefill_mgpu
from moa_jax.pallas_kernels.prefill.block_tables import MaskSpec
from moa_jax.pallas_kernels.prefill.mosaic_gpu_bwd import dkv_tables


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
def _on_hopper():
    try:
        return moa_prefill_mgpu.available()
    except Exception:  # pragma: no cover
        return False


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
