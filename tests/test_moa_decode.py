"""MoA decode over a span cache: the split-K work lists, the schedule's checks, head-sharded
caches and the Triton lowering. The kernels' outputs against dense attention are checked by the
conformance suite (tests/test_conformance_*.py)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from moa_jax.pallas_kernels import MoASchedule, SpanKVCache, span_decode, span_decode_reference


def test_split_segments_balances_uneven_segments():
    from moa_jax.pallas_kernels.caches.schedule import split_segments
    from moa_jax.pallas_kernels.heuristics import default_splits

    # Equal segments: 264 programs wanted, at least 4 blocks per split.
    assert default_splits(1, 8, 512) == 33
    assert default_splits(54, 8, 512) == 1
    assert default_splits(1, 8, 8) == 2
    # Two dense KV heads (512 blocks) beside six windows (100): at batch 54 the long segments
    # are cut into items of the short ones' length, so no program walks 5x the others' blocks.
    blocks = [512, 512] + [100] * 6
    w = split_segments(blocks, batch=54)
    assert w.count.max() <= 103 and w.count.min() >= 100
    assert w.num_items == 2 * 5 + 6
    # Items tile each segment exactly, in order, from its offset.
    offsets = np.cumsum([0] + blocks[:-1]) + 7
    w = split_segments(blocks, batch=1, offsets=offsets)
    assert w.count.min() >= 4 and w.num_items > 132
    for s, n in enumerate(blocks):
        ids = w.table[s][w.table[s] < w.num_items]
        assert np.all(w.segment[ids] == s)
        assert w.start[ids[0]] == offsets[s] and w.count[ids].sum() == n
        assert np.all(w.start[ids[1:]] == w.start[ids[:-1]] + w.count[ids[:-1]])
    # A fixed split size; segments shorter than it stay whole.
    w = split_segments([10, 3], batch=1, per_split=4)
    assert w.count.tolist() == [4, 3, 3, 3] and w.table.tolist() == [[0, 1, 2], [3, 4, 4]]


def test_window_larger_than_ring_is_an_error():
    sched = MoASchedule.build((16, 16), (0, 0), 1, 1000, block=16)
    with pytest.raises(ValueError, match="window 100 exceeds its ring of 16"):
        dataclasses.replace(sched, windows=(16, 100))
    with pytest.raises(ValueError, match="sink 8 exceeds the cache's 0 sink slots"):
        dataclasses.replace(sched, sinks=(0, 8))
    q = jnp.zeros((1, 2, 64))
    one_head = MoASchedule.build((16,), (0,), 1, 1000, block=16)
    cache = SpanKVCache.zeros(1, one_head, head_dim=64, dtype=jnp.float32)
    with pytest.raises(ValueError, match="one window and sink per query head"):
        span_decode(q, cache, jnp.zeros(1, jnp.int32))


def test_cache_packed_for_head_shards_decodes_per_shard():
    """A cache packed for 2 head shards: each shard's own cache (its half of the slots) decodes
    its heads exactly as the unsplit cache does, and writes land in the same slots' contents."""
    rng = np.random.RandomState(3)
    b, hkv, group, d, n = 2, 4, 2, 64, 300
    h = hkv * group
    windows = tuple(int(x) for x in rng.choice([1, 17, 64, 100, 10**6], h))
    sinks = tuple(int(x) for x in rng.randint(0, 9, h))
    k = jnp.asarray(rng.randn(b, n, hkv, d), jnp.float32)
    v = jnp.asarray(rng.randn(b, n, hkv, d), jnp.float32)
    q = jnp.asarray(rng.randn(b, h, d), jnp.float32)
    lengths = jnp.asarray([300, 123])
    sched = MoASchedule.build(windows, sinks, hkv, n, block=16)
    full = SpanKVCache.zeros(b, sched, head_dim=d, dtype=jnp.float32)
    packed = SpanKVCache.zeros(
        b, MoASchedule.build(windows, sinks, hkv, n, block=16, shards=2), d, jnp.float32
    )
    assert packed.k.shape[1] % 2 == 0 and packed.k.shape[1] >= full.k.shape[1]
    start = jnp.zeros(b, jnp.int32)
    full, packed = (c.write(k, v, start, lengths) for c in (full, packed))
    qpos = lengths - 1
    ref = span_decode_reference(q, full, qpos)
    np.testing.assert_allclose(
        np.asarray(span_decode_reference(q, packed, qpos)),
        np.asarray(ref),
        atol=2e-5,
        rtol=2e-5,
    )
    half = packed.k.shape[1] // 2
    for i in range(2):
        sl = slice(i * half, (i + 1) * half)
        local = packed.shard(i, packed.k[:, sl], packed.v[:, sl], packed.pos[:, sl])
        heads = slice(i * h // 2, (i + 1) * h // 2)
        assert local.schedule.windows == windows[heads]
        assert local.schedule.sinks == sinks[heads]
        out = span_decode(q[:, heads], local, qpos, interpret=True, backend="gpu")
        np.testing.assert_allclose(
            np.asarray(out), np.asarray(ref[:, heads]), atol=2e-5, rtol=2e-5, err_msg=f"shard {i}"
        )
    with pytest.raises(ValueError, match="4 KV heads do not split into 3 shards"):
        MoASchedule.build(windows, sinks, hkv, n, shards=3)


def test_kernel_lowers_for_cuda():
    """Without a GPU: the Triton kernel lowers to Triton IR at Llama-3-8B head shapes."""
    import jax

    from moa_jax.pallas_kernels.decode.span_triton import span_decode_triton

    windows = (4096, 512) * 16
    sched = MoASchedule.build(windows, (64,) * 32, 8, 8192)
    cache = SpanKVCache.zeros(2, sched, head_dim=128, dtype=jnp.bfloat16)
    q = jnp.zeros((2, 32, 128), jnp.bfloat16)
    qp = jnp.zeros((2,), jnp.int32)

    def f(q, cache, qp):
        return span_decode_triton(
            q,
            cache,
            qp,
            scale=None,
            per_split=4,
            interpret=False,
            num_warps=4,
        )

    try:
        jax.jit(f).trace(q, cache, qp).lower(lowering_platforms=("cuda",))
    except (ImportError, ModuleNotFoundError) as e:  # jaxlib without the cuda lowering
        pytest.skip(f"no cuda lowering in this jaxlib: {e}")
