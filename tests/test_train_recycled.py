"""Training-time Recycled Attention against its explicit-mask oracle: outputs, gradients, limits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moa_jax.models.dense_attention import TrainDenseAttention, segment_ids_from_positions
from moa_jax.models.recycled_train_attention import (
    RecycledOracleAttention,
    RecycledTrainAttention,
    recycled_attention_reference,
    recycled_mask_reference,
)
from moa_jax.models.registry import init_random
from moa_jax.pallas_kernels.reference import causal_mask, mha_reference

from conftest import tiny_config


def _qkv(seed=0, b=2, t=24, h=4, hkv=2, d=8):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(ks[0], (b, t, h, d)) * 2.0
    k = jax.random.normal(ks[1], (b, t, hkv, d)) * 2.0
    v = jax.random.normal(ks[2], (b, t, hkv, d))
    return q, k, v


SCHEDULES = [
    RecycledTrainAttention.paper(16, 8, top_k=5),
    RecycledTrainAttention.paper(17, 7, top_k=7, decode_eviction=True),
    RecycledTrainAttention.strided(12, 12, stride=4, top_k=4),
]
MORE_SCHEDULES = [
    RecycledTrainAttention.paper(16, 8, top_k=3, pool_kernel=1),
    RecycledTrainAttention(
        (("full", 10), ("recycled", 5), ("full", 3), ("recycled", 6)), 6, decode_eviction=True
    ),
]


def _call(backend, q, k, v):
    pos = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
    return backend(q, k, v, layer=0, positions=pos)


@pytest.mark.parametrize(
    "backend",
    SCHEDULES + [pytest.param(b, marks=pytest.mark.slow) for b in MORE_SCHEDULES],
    ids=lambda b: f"{b.blocks}-K{b.top_k}-pool{b.pool_kernel}",
)
def test_forward_and_grads_match_oracle(backend):
    q, k, v = _qkv()
    oracle = RecycledOracleAttention(
        backend.blocks, backend.top_k, backend.pool_kernel, backend.decode_eviction
    )
    w = jax.random.normal(jax.random.PRNGKey(9), q.shape)

    @jax.jit
    def run(q, k, v):
        fwd = lambda be, *a: jnp.sum(_call(be, *a) * w)
        mask = recycled_mask_reference(
            q, k, backend.blocks, backend.top_k, backend.pool_kernel, backend.decode_eviction
        )
        return (
            _call(backend, q, k, v),
            _call(oracle, q, k, v),
            jax.grad(fwd, argnums=(1, 2, 3))(backend, q, k, v),
            jax.grad(fwd, argnums=(1, 2, 3))(oracle, q, k, v),
            mask,
        )

    out, ref, grads, refg, mask = run(q, k, v)
    # The FLOP count's kept entries are the mask's.
    assert backend.attention_entries() == int(np.asarray(mask)[0, 0].sum())
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, refg):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-4, rtol=1e-4)


def test_recycled_rows_really_are_sparse():
    q, k, _ = _qkv()
    be = RecycledTrainAttention.paper(16, 8, top_k=5)
    mask = np.asarray(recycled_mask_reference(q, k, be.blocks, 5))
    assert mask.shape == (2, 2, 24, 24)
    np.testing.assert_array_equal(
        mask[:, :, :16], np.broadcast_to(np.tril(np.ones((16, 24), bool)), (2, 2, 16, 24))
    )
    for i in range(16, 24):  # K selected prefix tokens + the tail up to itself
        assert (mask[:, :, i, :16].sum(-1) == 5).all()
        assert mask[:, :, i, 16 : i + 1].all() and not mask[:, :, i, i + 1 :].any()
    assert (mask[:, 0, 16:, :16] != mask[:, 1, 16:, :16]).any()  # per KV head selections
    # Eviction mirrors the decoder's cache: row j keeps the K - j best.
    mask_e = np.asarray(recycled_mask_reference(q, k, be.blocks, 5, decode_eviction=True))
    for j in range(5):
        assert (mask_e[:, :, 16 + j, :16].sum(-1) == 5 - j).all()


def test_selection_is_the_pooled_top_k_of_the_last_prefix_token():
    """A key equal to a large multiple of the last prefix query dominates its probabilities:
    with K = 7 and pooling 7 the selection is that key and its 3 neighbours on each side."""
    q, k, v = _qkv(b=1, t=32, h=2, hkv=1, d=8)
    k = k * 0.01
    k = k.at[0, 9, 0].set(q[0, 23, 0] * 3.0)
    be = RecycledTrainAttention.paper(24, 8, top_k=7)
    mask, out, ref = jax.jit(
        lambda q, k, v: (
            recycled_mask_reference(q, k, be.blocks, 7),
            _call(be, q, k, v),
            recycled_attention_reference(q, k, v, be.blocks, 7),
        )
    )(q, k, v)
    np.testing.assert_array_equal(np.nonzero(np.asarray(mask)[0, 0, 24, :24])[0], np.arange(6, 13))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def test_limits_equal_dense():
    q, k, v = _qkv()
    backends = (
        RecycledTrainAttention.paper(16, 8, top_k=16),  # K >= L
        RecycledTrainAttention.paper(16, 8, top_k=24, decode_eviction=True),
        RecycledTrainAttention.strided(16, 8, stride=1, top_k=2),  # every step full
        TrainDenseAttention(),
    )

    @jax.jit
    def run(q, k, v):
        pos = jnp.arange(24)[None].repeat(2, 0)
        return (
            mha_reference(q, k, v, causal_mask(pos, jnp.arange(24))),
            [_call(be, q, k, v) for be in backends],
        )

    dense, outs = run(q, k, v)
    for be, out in zip(backends, outs):
        np.testing.assert_allclose(np.asarray(out), np.asarray(dense), atol=1e-5, err_msg=repr(be))


def test_model_gradients_match_oracle():
    """Whole tiny Llama: loss and parameter gradients with the gather implementation equal the
    explicit-mask oracle's."""
    cfg = tiny_config()
    model = init_random(cfg, seed=0)
    graphdef, state = nnx.split(model)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 33), 0, cfg.vocab_size)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    pos = jnp.broadcast_to(jnp.arange(32), (2, 32))
    be = RecycledTrainAttention.paper(24, 8, top_k=6)
    oracle = RecycledOracleAttention(be.blocks, be.top_k)

    def loss(params, attention):
        logits, _ = nnx.merge(graphdef, params)(inputs, pos, None, attention)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))

    l1, g1 = jax.jit(jax.value_and_grad(loss), static_argnums=1)(state, be)
    l2, g2 = jax.jit(jax.value_and_grad(loss), static_argnums=1)(state, oracle)
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=1e-4)


def test_segment_mask_from_position_resets():
    pos = jnp.asarray([[0, 1, 2, 0, 1, 0, 1, 2], [5, 6, 7, 8, 0, 1, 2, 3]])
    seg = np.asarray(segment_ids_from_positions(pos))
    np.testing.assert_array_equal(seg, [[1, 1, 1, 2, 2, 3, 3, 3], [1, 1, 1, 1, 2, 2, 2, 2]])
    q, k, v = _qkv(t=8)
    idx = np.arange(8)
    mask = (idx[None, :, None] >= idx[None, None, :]) & (seg[:, :, None] == seg[:, None, :])
    out, ref = jax.jit(
        lambda q, k, v: (
            TrainDenseAttention(segments=True)(q, k, v, layer=0, positions=pos),
            mha_reference(q, k, v, jnp.asarray(mask)[:, None]),
        )
    )(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-6)


def test_bad_schedules_and_calls():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="start with a full block"):
        RecycledTrainAttention((("recycled", 4), ("full", 4)), 2)
    with pytest.raises(ValueError, match="block kind"):
        RecycledTrainAttention((("partial", 4),), 2)
    with pytest.raises(ValueError, match="top_k must be"):
        RecycledTrainAttention.paper(8, 4, top_k=0)
    with pytest.raises(ValueError, match="pool_kernel"):
        RecycledTrainAttention.paper(8, 4, top_k=2, pool_kernel=4)
    with pytest.raises(ValueError, match="S <= K"):
        RecycledTrainAttention.paper(8, 4, top_k=2, decode_eviction=True)
    with pytest.raises(ValueError, match="covers 20 tokens but the sequence has 24"):
        _call(RecycledTrainAttention.paper(16, 4, top_k=2), q, k, v)
    assert not hasattr(RecycledTrainAttention.paper(16, 8, top_k=2), "init_cache")


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["cudnn", "pallas"])
def test_gpu_prefix_kernels_match_reference(impl):
    """On a GPU in bf16: the flash kernels of the first full block (cuDNN, the project's Pallas
    kernel) give the reference's outputs and gradients (run: pytest -m gpu)."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(b=2, t=1090, h=9, hkv=3, d=64))
    fast = RecycledTrainAttention.paper(1024, 66, top_k=128, impl=impl)
    ref = RecycledTrainAttention.paper(1024, 66, top_k=128, impl="reference")
    w = jax.random.normal(jax.random.PRNGKey(3), q.shape, jnp.float32)

    @jax.jit
    def run(q, k, v):
        f = lambda be, *a: jnp.sum(_call(be, *a).astype(jnp.float32) * w)
        return (
            _call(fast, q, k, v),
            _call(ref, q, k, v),
            jax.grad(f, argnums=(1, 2, 3))(fast, q, k, v),
            jax.grad(f, argnums=(1, 2, 3))(ref, q, k, v),
        )

    out, want, g, gw = run(q, k, v)
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(want, np.float32), atol=3e-2, rtol=3e-2
    )
    for a, b in zip(g, gw):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(a - b).max() <= 0.05 * np.abs(b).max() + 1e-2
