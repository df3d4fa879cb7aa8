"""Recycled Attention decode kernels (Pallas GPU and TPU in interpret mode) vs the jnp oracle,
and the oracle vs plain masked attention (`mha_reference`) with the equivalent mask."""

import numpy as np
import jax.numpy as jnp
import pytest

from moa_jax.pallas_kernels import (
    full_step_decode,
    head_major_decode_reference,
    recycled_decode,
)
from moa_jax.pallas_kernels.reference import mha_reference

RUNS = [dict(backend="gpu", num_splits=3), dict(backend="tpu")]


def _arrays(seed, b, hkv, group, n, d, dtype):
    rng = np.random.RandomState(seed)
    h = hkv * group
    q = jnp.asarray(rng.randn(b, h, d), dtype)
    k = jnp.asarray(rng.randn(b, hkv, n, d), dtype)
    v = jnp.asarray(rng.randn(b, hkv, n, d), dtype)
    kn = jnp.asarray(rng.randn(b, hkv, d), dtype)
    vn = jnp.asarray(rng.randn(b, hkv, d), dtype)
    return rng, q, k, v, kn, vn


def _probs_dense(q, k, v, mask):
    """Per-query-head probabilities and output of plain masked attention (float64 numpy)."""
    qf, kf, vf = (np.asarray(x, np.float64) for x in (q, k, v))
    b, h, d = qf.shape
    hkv = kf.shape[1]
    g = h // hkv
    lg = np.einsum("bhd,bhnd->bhn", qf, np.repeat(kf, g, axis=1)) / np.sqrt(d)
    lg = np.where(mask, lg, -np.inf)
    m = lg.max(-1, keepdims=True)
    p = np.exp(lg - np.where(np.isfinite(m), m, 0))
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
    return p, np.einsum("bhn,bhnd->bhd", p, np.repeat(vf, g, axis=1))


@pytest.mark.parametrize(
    "hkv,group,d,dtype,tol",
    [(2, 1, 32, jnp.float32, 2e-5), (1, 3, 16, jnp.bfloat16, 2e-2), (2, 4, 32, jnp.float32, 2e-5)],
)
def test_full_step_matches_oracle(hkv, group, d, dtype, tol):
    b, n = 3, 48
    rng, q, k, v, _, _ = _arrays(hkv * 7 + group, b, hkv, group, n, d, dtype)
    qpos = jnp.asarray([0, 21, 47])
    out_r, sc_r = full_step_decode(q, k, v, qpos, backend="reference")
    # The oracle is plain masked attention: slot j visible iff j <= qpos.
    mask = np.arange(n)[None, None, :] <= np.asarray(qpos)[:, None, None]
    p, out_np = _probs_dense(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(out_r, np.float32), out_np, atol=tol, rtol=tol)
    p_max = p.reshape(b, hkv, group, n).max(2)
    np.testing.assert_allclose(np.asarray(sc_r), p_max, atol=1e-5 if dtype == jnp.float32 else 1e-2)
    kg = jnp.swapaxes(k, 1, 2)
    out_m = mha_reference(q[:, None], kg, jnp.swapaxes(v, 1, 2), jnp.asarray(mask)[:, None])[:, 0]
    np.testing.assert_allclose(
        np.asarray(out_m, np.float32), np.asarray(out_r, np.float32), atol=tol, rtol=tol
    )
    runs = RUNS + ([dict(backend="gpu", num_splits=1)] if group == 1 else [])
    for kw in runs:
        out, sc = full_step_decode(q, k, v, qpos, interpret=True, block_k=16, **kw)
        assert out.shape == q.shape and out.dtype == q.dtype and sc.shape == (b, hkv, n)
        np.testing.assert_allclose(
            np.asarray(out, np.float32),
            np.asarray(out_r, np.float32),
            atol=tol,
            rtol=tol,
            err_msg=str(kw),
        )
        np.testing.assert_allclose(
            np.asarray(sc), np.asarray(sc_r), atol=1e-5, rtol=1e-4, err_msg=str(kw)
        )
        assert (
            float(jnp.max(jnp.where(jnp.arange(n)[None, None] > qpos[:, None, None], sc, 0.0)))
            == 0.0
        )


@pytest.mark.parametrize("hkv,group,d,scores", [(2, 2, 16, "max"), (1, 4, 32, "sum")])
def test_gathered_with_new_token(hkv, group, d, scores):
    b, n = 2, 32
    rng, q, k, v, kn, vn = _arrays(hkv + 10 * group, b, hkv, group, n, d, jnp.float32)
    pos = rng.randint(0, 200, (b, hkv, n))
    pos[rng.rand(b, hkv, n) < 0.3] = -1  # empty slots
    pos[0, 0] = -1  # a head with only the new token
    pos = jnp.asarray(pos)
    qpos = jnp.asarray([300, 301])
    ref = head_major_decode_reference(q, k, v, qpos, pos=pos, k_new=kn, v_new=vn, scores=scores)
    # Oracle check: the new token appended as one more slot of plain masked attention.
    k2 = jnp.concatenate([k, kn[:, :, None]], 2)
    v2 = jnp.concatenate([v, vn[:, :, None]], 2)
    mask = np.concatenate([np.asarray(pos) >= 0, np.ones((b, hkv, 1), bool)], -1)
    p, out_np = _probs_dense(q, k2, v2, np.repeat(mask, group, axis=1))
    out_r = ref if scores is None else ref[0]
    np.testing.assert_allclose(np.asarray(out_r), out_np, atol=2e-5, rtol=2e-5)
    if scores is not None:
        red = np.max if scores == "max" else np.sum
        agg = red(p.reshape(b, hkv, group, n + 1), axis=2)
        np.testing.assert_allclose(np.asarray(ref[1]), agg[..., :n], atol=1e-6)
        np.testing.assert_allclose(np.asarray(ref[2]), agg[..., n], atol=1e-6)
    for kw in RUNS:
        res = recycled_decode(
            q, k, v, pos, qpos, kn, vn, scores=scores, interpret=True, block_k=16, **kw
        )
        outs = (res,) if scores is None else res
        refs = (ref,) if scores is None else ref
        for a, r in zip(outs, refs):
            np.testing.assert_allclose(
                np.asarray(a), np.asarray(r), atol=2e-5, rtol=2e-5, err_msg=str(kw)
            )


def test_bf16_gathered_without_new_token():
    b, hkv, group, n, d = 2, 2, 2, 64, 32
    rng, q, k, v, _, _ = _arrays(5, b, hkv, group, n, d, jnp.bfloat16)
    pos = jnp.asarray(np.where(rng.rand(b, hkv, n) < 0.5, -1, rng.randint(0, 90, (b, hkv, n))))
    qpos = jnp.asarray([60, 95])  # some slots lie in the future
    ref = recycled_decode(q, k, v, pos, qpos, backend="reference")
    for kw in RUNS:
        out = recycled_decode(q, k, v, pos, qpos, interpret=True, block_k=32, **kw)
        np.testing.assert_allclose(
            np.asarray(out, np.float32),
            np.asarray(ref, np.float32),
            atol=2e-2,
            rtol=2e-2,
            err_msg=str(kw),
        )


def test_rows_that_see_nothing_are_zero():
    b, hkv, group, n, d = 2, 1, 2, 16, 16
    _, q, k, v, _, _ = _arrays(0, b, hkv, group, n, d, jnp.float32)
    pos = jnp.full((b, hkv, n), -1, jnp.int32)
    for kw in RUNS + [dict(backend="reference")]:
        out, sc, new = recycled_decode(
            q, k, v, pos, jnp.zeros(b, jnp.int32), scores="max", interpret=True, **kw
        )
        assert np.all(np.asarray(out) == 0) and np.all(np.asarray(sc) == 0) and new is None


def test_bad_shapes_are_errors():
    q = jnp.zeros((1, 4, 16))
    k = jnp.zeros((1, 3, 16, 16))
    with pytest.raises(ValueError, match="do not divide"):
        full_step_decode(q, k, k, jnp.zeros(1, jnp.int32))
    k = jnp.zeros((1, 2, 16, 16))
    with pytest.raises(ValueError, match="pos must be"):
        recycled_decode(q, k, k, jnp.zeros((1, 2, 8), jnp.int32), jnp.zeros(1, jnp.int32))
    with pytest.raises(ValueError, match="block_k 12 does not divide"):
        full_step_decode(q, k, k, jnp.zeros(1, jnp.int32), block_k=12, interpret=True)
    with pytest.raises(ValueError, match="scores must be"):
        full_step_decode(q, k, k, jnp.zeros(1, jnp.int32), scores="mean")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(jnp.bfloat16, 2e-2), (jnp.float32, 1e-4)])
def test_compiled_kernels_on_device(dtype, tol):
    """The compiled kernels (Triton on GPU, Mosaic on TPU) at Llama-3-8B head shapes."""
    import jax

    platform = jax.default_backend()
    if platform not in ("gpu", "tpu"):
        pytest.skip("needs a GPU or TPU")
    b, hkv, group, n, d = 2, 8, 4, 4096, 128
    rng, q, k, v, kn, vn = _arrays(0, b, hkv, group, n, d, dtype)
    qpos = jnp.asarray([1000, 4095])
    out_r, sc_r = full_step_decode(q, k, v, qpos, backend="reference")
    out, sc = full_step_decode(q, k, v, qpos, interpret=False)
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(out_r, np.float32), atol=tol, rtol=tol
    )
    np.testing.assert_allclose(np.asarray(sc), np.asarray(sc_r), atol=1e-3, rtol=2e-2)
    pos = jnp.asarray(np.where(rng.rand(b, hkv, n) < 0.1, -1, rng.randint(0, 5000, (b, hkv, n))))
    for scores in (None, "sum"):
        ref = recycled_decode(q, k, v, pos, qpos + 1000, kn, vn, scores=scores, backend="reference")
        got = recycled_decode(q, k, v, pos, qpos + 1000, kn, vn, scores=scores, interpret=False)
        for a, r in zip((got,) if scores is None else got, (ref,) if scores is None else ref):
            np.testing.assert_allclose(
                np.asarray(a, np.float32), np.asarray(r, np.float32), atol=tol, rtol=tol
            )


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_kernels_lower_for_device_platforms(platform):
    """Without a device: the Triton and Mosaic kernels lower (to Triton IR / Mosaic MLIR) at
    Llama-3-8B head shapes, in every mode, so no primitive lacks a lowering rule."""
    import jax

    from moa_jax.pallas_kernels.decode.head_major_triton import head_major_partials
    from moa_jax.pallas_kernels.decode.head_major_tpu import tpu_partials

    b, hkv, group, n, d = 2, 8, 4, 4096, 128
    q = jnp.zeros((b, hkv * group, d), jnp.bfloat16)
    k = jnp.zeros((b, hkv, n, d), jnp.bfloat16)
    qp = jnp.zeros((b,), jnp.int32)
    for pos in (None, jnp.zeros((b, hkv, n), jnp.int32)):
        for logits in (False, True):
            if platform == "cuda":

                def f(q, k, qp, pos):
                    return head_major_partials(
                        q,
                        k,
                        k,
                        qp,
                        pos,
                        bk=64,
                        num_splits=16,
                        scale=0.1,
                        write_logits=logits,
                        interpret=False,
                        num_warps=4,
                    )
            else:

                def f(q, k, qp, pos):
                    return tpu_partials(
                        q, k, k, qp, pos, bk=512, scale=0.1, write_logits=logits, interpret=False
                    )

            try:
                jax.jit(f).trace(q, k, qp, pos).lower(lowering_platforms=(platform,))
            except (ImportError, ModuleNotFoundError) as e:  # jaxlib without that backend
                pytest.skip(f"no {platform} lowering in this jaxlib: {e}")
