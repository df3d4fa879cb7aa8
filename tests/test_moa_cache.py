"""SpanKVCache and its MoASchedule: layout, memory formula, chunked writes equal token-by-token
appends."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moa_jax.pallas_kernels.caches.dense import DenseKVCache
from moa_jax.pallas_kernels.caches.schedule import MoASchedule
from moa_jax.pallas_kernels.caches.span import SpanKVCache
from moa_jax.plan import Plan


def test_layout_and_memory_formula():
    windows = [100, 30, 500, 64]  # 4 query heads, 2 KV heads -> rings 128 and 512
    sched = MoASchedule.build(windows, [64] * 4, 2, max_len=4096)
    assert (sched.sink_slots, sched.rings) == (64, (128, 512))
    c = SpanKVCache.zeros(3, sched, head_dim=32, dtype=jnp.bfloat16)
    m = (64 + 128) + (64 + 512)
    assert c.k.shape == (3, m, 32) and c.pos.shape == (3, m)
    assert sched.segments == (64 + 128, 64 + 512) and sched.offsets == (0, 64 + 128)
    assert c.nbytes == 3 * m * (2 * 32 * 2 + 4)
    dense = DenseKVCache.zeros(3, 4096, 2, 32).nbytes
    assert c.nbytes < dense / 4
    # Rings are capped by what max_len needs, then padded to the block in the buffer.
    sched = MoASchedule.build([10**9, 5], [4, 0], 2, max_len=100, block=64)
    assert sched.sink_slots == 4 and sched.rings == (96, 64)
    assert sched.segments == (128, 128)


def test_layout_errors():
    with pytest.raises(ValueError, match="do not divide"):
        MoASchedule.build([1, 2, 3], [0] * 3, 2, 10)
    with pytest.raises(ValueError, match="windows must be >= 1"):
        MoASchedule.build([0, 2], [0] * 2, 2, 10)


def test_plan_schedule_is_the_resolved_layer():
    """`Plan.schedule` resolves one layer once: its windows are `resolve`'s, its sinks the
    plan's, the ring of each KV head its group's largest window; equal plans give equal
    (hashable) schedules."""
    plan = Plan.from_windows([[5, 40, 300, 7], [1, 2, 3, 4]], [[4, 0, 2, 1], [0, 0, 0, 0]])
    sched = plan.schedule(200, 0, 2, block=16)
    assert sched.windows == tuple(plan.resolve(200)[0]) == (5, 40, 200, 7)
    assert sched.sinks == (4, 0, 2, 1) and sched.sink_slots == 4
    assert sched.rings == (48, 196) and sched.max_len == 200
    assert sched == plan.schedule(200, 0, 2, block=16)
    assert hash(sched) == hash(plan.schedule(200, 0, 2, block=16))
    assert plan.schedule(100, 0, 2, max_len=200, block=16).windows == (5, 40, 100, 7)
    packed = plan.schedule(200, 0, 2, block=16, shards=2)
    assert packed.slots == 2 * max(packed.segments) and packed.offsets == (0, packed.slots // 2)
    assert packed.shard(1).windows == (200, 7) and packed.shard(1).rings == (196,)


# Compiled once per cache layout: eagerly, each of their ops compiles for every new layout.
_write = jax.jit(SpanKVCache.write)


@jax.jit
def _append_where(cache, k, v, i, ok):
    """cache with token i of k, v [B, 1, Hkv, D] appended in the rows where ok [B] holds."""
    b = k.shape[0]
    new = cache.write(k, v, jnp.full((b,), i, jnp.int32))
    return jax.tree.map(
        lambda a, o: jnp.where(ok.reshape((b,) + (1,) * (a.ndim - 1)), a, o), new, cache
    )


def _one_by_one(cache, k, v, lengths):
    k, v = np.asarray(k), np.asarray(v)
    for i in range(k.shape[1]):
        cache = _append_where(cache, k[:, i : i + 1], v[:, i : i + 1], i, i < lengths)
    return cache


# Each example compiles the writes for its own layout (~1.5 s on a CPU core): the default run
# draws 10 layouts, -m slow 100.
@pytest.mark.parametrize(
    "n", [pytest.param(10, id="10ex"), pytest.param(100, id="100ex", marks=pytest.mark.slow)]
)
def test_chunk_write_equals_appends(n):
    settings(max_examples=n, deadline=None)(
        given(
            hkv=st.integers(1, 3),
            group=st.integers(1, 3),
            sink=st.sampled_from([0, 1, 4, 9]),
            max_len=st.integers(2, 70),
            seed=st.integers(0, 10**6),
        )(_check_chunk_write)
    )()


def _check_chunk_write(hkv, group, sink, max_len, seed):
    rng = np.random.RandomState(seed)
    windows = rng.randint(1, 40, hkv * group).tolist()
    sched = MoASchedule.build(windows, [sink] * len(windows), hkv, max_len, block=8)
    cache = SpanKVCache.zeros(2, sched, head_dim=4, dtype=jnp.float32)
    lengths = rng.randint(1, max_len + 1, 2)
    t = int(lengths.max())
    k = jnp.asarray(rng.randn(2, t, hkv, 4), jnp.float32)
    v = jnp.asarray(rng.randn(2, t, hkv, 4), jnp.float32)
    chunk = _write(cache, k, v, jnp.zeros(2, jnp.int32), jnp.asarray(lengths))
    seq = _one_by_one(cache, k, v, lengths)
    np.testing.assert_array_equal(chunk.pos, seq.pos)
    np.testing.assert_array_equal(chunk.k, seq.k)
    np.testing.assert_array_equal(chunk.v, seq.v)
    # Two chunks equal one.
    cut = int(rng.randint(1, t + 1))
    two = _write(
        cache,
        k[:, :cut],
        v[:, :cut],
        jnp.zeros(2, jnp.int32),
        jnp.asarray(np.minimum(lengths, cut)),
    )
    if cut < t:
        two = _write(
            two,
            k[:, cut:],
            v[:, cut:],
            jnp.full((2,), cut, jnp.int32),
            jnp.asarray(np.maximum(lengths - cut, 0)),
        )
    np.testing.assert_array_equal(two.pos, chunk.pos)
    # Each KV head holds exactly its sinks and its ring's worth of the newest positions.
    sizes = sched.segments
    pos, ck, k = np.asarray(chunk.pos), np.asarray(chunk.k), np.asarray(k)  # indexed per slot
    for b in range(2):
        for g, off in enumerate(sched.offsets):
            held = sorted(int(p) for p in pos[b, off : off + sizes[g]] if p >= 0)
            n = int(lengths[b])
            want = sorted(
                set(range(min(sched.sink_slots, n)))
                | set(range(max(sched.sink_slots, n - sched.rings[g]), n))
            )
            assert held == want
            for p in held:  # and the right key sits next to each position
                slot = off + int(np.nonzero(pos[b, off : off + sizes[g]] == p)[0][0])
                np.testing.assert_array_equal(ck[b, slot], k[b, p, g])
