"""Recycled Attention caches and schedules at the attention level, against independent numpy
simulations of the rules in METHODS.md (selection, pointer eviction, fixed / dynamic / no
refresh), plus the StreamingLLM and H2O baselines of the same machinery."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moa_jax.models.eviction_attention import (
    H2OAttention,
    StreamingAttention,
    streaming_positions,
)
from moa_jax.models.recycled_attention import (
    RecycleConfig,
    RecycledAttention,
    max_pool_scores,
    select_top_k,
)
from moa_jax.pallas_kernels.caches.head_major import RecycledKVCache, SelectedKVCache

HKV, GROUP, D = 2, 2, 16
H = HKV * GROUP


# ------------------------------------------------------------------------------ numpy rules
def _softmax_probs(q, keys, ok):
    """q [H, D], keys [N, Hkv, D], ok bool [N] -> probabilities [H, N] (float64)."""
    kf = np.repeat(np.asarray(keys, np.float64), GROUP, axis=1)  # [N, H, D]
    lg = np.einsum("hd,nhd->hn", np.asarray(q, np.float64), kf) / np.sqrt(D)
    lg = np.where(ok[None], lg, -np.inf)
    p = np.exp(lg - lg.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def _attend(q, keys, vals, ok_per_kv):
    """Per-KV-head visibility ok_per_kv [Hkv, N] -> out [H, D] and probs [H, N]."""
    out = np.zeros((H, D))
    probs = np.zeros((H, keys.shape[0]))
    for h in range(H):
        ok = ok_per_kv[h // GROUP]
        p = _softmax_probs(q, keys, ok)[h]
        probs[h] = p
        out[h] = p @ np.asarray(vals[:, h // GROUP], np.float64)
    return out, probs


def _np_select(scores, n_valid, k, pool):
    """METHODS: pool (-inf pad, re-mask), top-K, ascending order; ties as lax.top_k (lower
    index first in the descending list)."""
    s = np.where(np.arange(len(scores)) < n_valid, scores, -np.inf)
    r = pool // 2
    pooled = np.array([s[max(0, j - r) : j + r + 1].max() for j in range(len(s))])
    pooled[n_valid:] = -np.inf
    order = sorted(range(n_valid), key=lambda j: (-pooled[j], j))[:k]
    desc = order + [-1] * (k - len(order))
    return desc[::-1]


class RecycledSim:
    """One row of one layer of Recycled Attention, straight from the rules."""

    def __init__(self, cfg: RecycleConfig, keys, vals, q_last, q_pre_last):
        self.cfg = cfg
        self.keys, self.vals = list(keys), list(vals)
        self.sel = self._refresh(q_last)
        self.ptr, self.step = 0, 0
        self.ref = np.mean(np.asarray(q_pre_last, np.float64), 0)
        self.since = []  # positions generated since the last refresh

    def _refresh(self, q):
        n = len(self.keys)
        probs = _softmax_probs(q, np.asarray(self.keys), np.ones(n, bool))
        per_kv = probs.reshape(HKV, GROUP, n).max(1)
        return [_np_select(per_kv[g], n, self.cfg.k, self.cfg.pool) for g in range(HKV)]

    def step_(self, q, k, v, q_pre):
        cfg = self.cfg
        t = len(self.keys)
        self.keys.append(k)
        self.vals.append(v)
        self.step += 1
        keys, vals = np.asarray(self.keys), np.asarray(self.vals)
        if cfg.mode == "fixed":
            full = self.step % cfg.stride == 0
        elif cfg.mode == "dynamic":
            cur = np.mean(np.asarray(q_pre, np.float64), 0)
            cos = cur @ self.ref / (np.linalg.norm(cur) * np.linalg.norm(self.ref))
            full = (
                self.step % cfg.stride == 0 and cos <= cfg.dynamic_threshold
            ) or self.ptr >= cfg.k
        else:
            full = False
        if full:
            out, _ = _attend(q, keys, vals, np.ones((HKV, t + 1), bool))
            self.sel = self._refresh(q)
            self.ptr = 0
            if cfg.mode == "dynamic":
                self.ref = np.mean(np.asarray(q_pre, np.float64), 0)
            self.since = []
            return out, True
        ok = np.zeros((HKV, t + 1), bool)
        for g in range(HKV):
            ok[g, [p for p in self.sel[g] if p >= 0]] = True
            ok[g, t] = True
        out, _ = _attend(q, keys, vals, ok)
        p = self.ptr % cfg.k if cfg.mode == "never" else self.ptr
        for g in range(HKV):
            self.sel[g][p] = t
        self.ptr = p + 1
        self.since.append(t)
        return out, False


# ------------------------------------------------------------------------------ drivers
def _random_run(seed, lengths, t_pad, steps, drift=False):
    rng = np.random.RandomState(seed)
    b = len(lengths)
    n = t_pad + steps
    q = rng.randn(b, n, H, D).astype(np.float32) * 2.0
    k = rng.randn(b, n, HKV, D).astype(np.float32)
    v = rng.randn(b, n, HKV, D).astype(np.float32)
    base = rng.randn(b, 1, 1, D)
    # Pre-RoPE queries: mostly close to a per-row direction, now and then far from it.
    far = rng.rand(b, n, 1, 1) < (0.35 if drift else 0.0)
    q_pre = (base + np.where(far, 3.0, 0.3) * rng.randn(b, n, H, D)).astype(np.float32)
    return q, k, v, q_pre


def _drive(backend, lengths, t_pad, steps, seed, cache_len=64, drift=False):
    """Runs prefill + decode steps through the backend (jitted) and the numpy model.

    Row b's prompt is its first lengths[b] tokens (right-padded to t_pad); its decode tokens
    are the next ones of its own random sequence, at positions lengths[b], lengths[b]+1, ...
    Yields (step, backend out [B, H, D], cache) after each decode step.
    """
    q, k, v, q_pre = _random_run(seed, lengths, t_pad, steps, drift)
    b = len(lengths)
    lengths = np.asarray(lengths, np.int32)

    class Cfg:
        num_kv_heads, head_dim, num_layers = HKV, D, 1

    cache = backend.init_cache(Cfg, b, cache_len, jnp.float32)[0]

    @jax.jit
    def call(q_, k_, v_, pos, cache, qpre, lengths=None):
        qpre = qpre if backend.wants_pre_rope_query else None
        if lengths is None:
            return backend.decode_step(
                q_, k_, v_, layer=0, positions=pos, cache=cache, q_pre_rope=qpre
            )
        return backend.prefill(
            q_, k_, v_, layer=0, positions=pos, cache=cache, lengths=lengths, q_pre_rope=qpre
        )

    pos = jnp.broadcast_to(jnp.arange(t_pad, dtype=jnp.int32), (b, t_pad))
    # Prompt tokens beyond lengths[b] are padding (their values are never visible).
    _, cache = call(
        jnp.asarray(q[:, :t_pad]),
        jnp.asarray(k[:, :t_pad]),
        jnp.asarray(v[:, :t_pad]),
        pos,
        cache,
        jnp.asarray(q_pre[:, :t_pad]),
        jnp.asarray(lengths),
    )
    seqs = dict(q=q, k=k, v=v, q_pre=q_pre)
    yield -1, None, cache, seqs
    rows = np.arange(b)
    for s in range(steps):
        p = lengths + s
        sl = lambda a: jnp.asarray(a[rows, p][:, None])  # noqa: E731
        out, cache = call(sl(q), sl(k), sl(v), jnp.asarray(p[:, None]), cache, sl(q_pre))
        yield s, np.asarray(out[:, 0]), cache, seqs


@pytest.mark.parametrize(
    "cfg",
    [
        RecycleConfig(k=8, stride=3),
        RecycleConfig(k=6, stride=None),
        RecycleConfig(k=5, stride=2, dynamic_threshold=0.6),
    ],
    ids=["fixed", "never", "dynamic"],
)
def test_recycled_layer_matches_rules(cfg):
    lengths, t_pad, steps = [13, 22], 32, 11
    backend = RecycledAttention(cfg, kernel_backend="reference", block=16)
    sims, n_full = None, 0
    for s, out, cache, seqs in _drive(
        backend, lengths, t_pad, steps, seed=3, drift=cfg.mode == "dynamic"
    ):
        if s < 0:
            sims = [
                RecycledSim(
                    cfg,
                    seqs["k"][r, :n],
                    seqs["v"][r, :n],
                    seqs["q"][r, n - 1],
                    seqs["q_pre"][r, n - 1],
                )
                for r, n in enumerate(lengths)
            ]
            for r, sim in enumerate(sims):
                np.testing.assert_array_equal(np.asarray(cache.selected())[r], sim.sel)
            continue
        for r, sim in enumerate(sims):
            t = lengths[r] + s
            ref, full = sim.step_(
                seqs["q"][r, t], seqs["k"][r, t], seqs["v"][r, t], seqs["q_pre"][r, t]
            )
            n_full += full
            np.testing.assert_allclose(
                out[r], ref, atol=2e-5, rtol=2e-5, err_msg=f"step {s} row {r}"
            )
            sel = np.asarray(cache.selected())[r]
            np.testing.assert_array_equal(sel, sim.sel, err_msg=f"step {s} row {r}")
            assert int(cache.ptr[r]) == sim.ptr
            # Tokens generated since the last refresh are all still there (every KV head);
            # without refreshes, the last K of them (the pointer wraps after K).
            for g in range(HKV):
                assert set(sim.since[-cfg.k :]) <= set(sel[g].tolist())
            if cfg.mode != "never":
                assert len(sim.since) <= cfg.k
        assert int(cache.step) == s + 1
    if cfg.mode == "fixed":
        assert n_full == len(lengths) * (steps // cfg.stride)
    elif cfg.mode == "dynamic":
        assert 0 < n_full < len(lengths) * steps  # rows refreshed, not at every step


def test_dynamic_rows_decide_independently():
    """A refresh in one row leaves the other row's selection on its partial path."""
    cfg = RecycleConfig(k=6, stride=1, dynamic_threshold=0.6)
    backend = RecycledAttention(cfg, kernel_backend="reference", block=16)
    decisions = []
    prev = None
    for _, _, cache, _ in _drive(backend, [10, 17], 32, 8, seed=11, drift=True):
        if prev is not None:
            decisions.append(tuple(int(p) == 0 for p in np.asarray(cache.ptr)))
        prev = cache
    assert any(a != b for a, b in decisions), decisions


def test_pre_rope_query_is_required_when_asked():
    backend = RecycledAttention(
        RecycleConfig(k=4, stride=2, dynamic_threshold=0.5), kernel_backend="reference", block=16
    )
    assert backend.wants_pre_rope_query
    assert not RecycledAttention(
        RecycleConfig(k=4, stride=2, dynamic_threshold=0.5, pre_rope_query=False)
    ).wants_pre_rope_query
    assert not RecycledAttention(RecycleConfig(k=4, stride=2)).wants_pre_rope_query

    class Cfg:
        num_kv_heads, head_dim, num_layers = HKV, D, 1

    cache = backend.init_cache(Cfg, 1, 16, jnp.float32)[0]
    x = jnp.zeros((1, 4, H, D))
    with pytest.raises(ValueError, match="q_pre_rope"):
        backend.prefill(
            x,
            x[:, :, :HKV],
            x[:, :, :HKV],
            layer=0,
            positions=jnp.arange(4)[None],
            cache=cache,
            lengths=jnp.asarray([4]),
        )


# ------------------------------------------------------------------------------ selection
def test_max_pool_and_top_k_semantics():
    s = jnp.asarray([[[0.1, 0.9, 0.2, 0.0, 0.0, 0.0, 0.0, 0.05, 0.5, 0.3, 0.7]]])
    valid = jnp.arange(11)[None, None] < 10  # slot 10 is not a token yet
    pooled = np.asarray(max_pool_scores(s, valid, 3))[0, 0]
    np.testing.assert_allclose(pooled[:10], [0.9, 0.9, 0.9, 0.2, 0.0, 0.0, 0.05, 0.5, 0.5, 0.5])
    assert pooled[10] == -np.inf  # re-masked after pooling
    p7 = np.asarray(max_pool_scores(s, valid, 7))[0, 0]
    np.testing.assert_allclose(p7[:10], [0.9, 0.9, 0.9, 0.9, 0.9, 0.5, 0.5, 0.5, 0.5, 0.5])
    idx = np.asarray(select_top_k(s, valid, 4, pool=1, slots=6))[0, 0]
    # Unpooled top-4 = {1 (0.9), 8 (0.5), 9 (0.3), 2 (0.2)}, lowest score first, then padding.
    assert idx.tolist() == [2, 9, 8, 1, -1, -1]
    few = np.asarray(select_top_k(s, jnp.arange(11)[None, None] < 2, 4, pool=1))[0, 0]
    assert few.tolist() == [-1, -1, 0, 1]  # empty entries first


def test_no_forced_sinks_or_recent_tokens():
    """Selection keeps what scores highest: a low-scoring first (sink) token and the newest
    prompt token are dropped when other tokens beat them."""
    n = 40
    sc = np.full((1, 1, n), 0.01)
    sc[0, 0, 0] = 0.0
    sc[0, 0, n - 1] = 0.0
    sc[0, 0, 15:19] = 0.3
    sc[0, 0, 16] = 0.4
    idx = np.asarray(select_top_k(jnp.asarray(sc), jnp.ones((1, 1, n), bool), 8, pool=1))
    assert 0 not in idx and n - 1 not in idx
    idx7 = np.asarray(select_top_k(jnp.asarray(sc), jnp.ones((1, 1, n), bool), 10, pool=7))
    assert set(idx7[0, 0].tolist()) == set(range(12, 22))  # pooling spreads peaks by 3


def test_config_validation():
    with pytest.raises(ValueError, match="S <= K"):
        RecycleConfig(k=4, stride=5)
    with pytest.raises(ValueError, match="check interval"):
        RecycleConfig(k=4, stride=None, dynamic_threshold=0.9)
    with pytest.raises(ValueError, match="odd"):
        RecycleConfig(k=4, stride=2, pool=4)
    assert RecycleConfig(k=4, stride=50, dynamic_threshold=0.9).mode == "dynamic"
    assert RecycleConfig(k=4, stride=None).mode == "never"


def test_cache_memory_and_sharding_axes():
    from moa_jax.parallel import cache_shardings, make_mesh

    c = RecycledKVCache.zeros(2, 100, HKV, D, top_k=20, dtype=jnp.bfloat16, block=16)
    lp, kp = 112, 32
    assert c.k.shape == (2, HKV, lp, D) and c.kp.shape == (2, HKV, kp, D)
    assert c.nbytes == (2 * 2 * HKV * (lp + kp) * D * 2 + 2 * HKV * kp * 4 + 2 * 4 + 4 + 2 * D * 4)
    s = SelectedKVCache.zeros(2, 100, HKV, D, top_k=20, dtype=jnp.bfloat16, block=16)
    assert s.acc is None and s.nbytes == 2 * 2 * HKV * kp * D * 2 + 2 * HKV * kp * 4
    mesh = make_mesh()
    for cache in (c, s, SelectedKVCache.zeros(1, 8, HKV, D, 4, block=16, with_scores=True)):
        sh = cache_shardings((cache,), mesh)[0]
        assert jax.tree_util.tree_structure(sh) == jax.tree_util.tree_structure(cache)


# ------------------------------------------------------------------------------ baselines
def test_streaming_positions_equal_writing_one_by_one():
    k, sink, slots = 10, 4, 16
    for last in [0, 3, 4, 9, 10, 13, 37]:
        held = [-1] * slots
        for p in range(last + 1):
            held[p if p < sink else sink + (p - sink) % (k - sink)] = p
        got = np.asarray(streaming_positions(jnp.asarray([last]), k, sink, slots))[0]
        assert got.tolist() == held, last


def test_streaming_layer_keeps_sinks_and_recent():
    k, sink = 8, 4
    backend = StreamingAttention(k, sink, kernel_backend="reference", block=16)
    lengths = [5, 20]
    for s, out, cache, seqs in _drive(backend, lengths, 32, 9, seed=4):
        if s < 0:
            continue
        for r, n in enumerate(lengths):
            t = n + s
            want = set(range(min(sink, t + 1))) | set(range(max(sink, t + 1 - (k - sink)), t + 1))
            for g in range(HKV):
                assert set(np.asarray(cache.selected())[r, g].tolist()) - {-1} == want
            # The step attended to the cache before the write: sinks + the k - sink previous.
            ok = np.zeros((HKV, t + 1), bool)
            ok[
                :, sorted(set(range(min(sink, t))) | set(range(max(sink, t - (k - sink)), t + 1)))
            ] = True
            ref, _ = _attend(seqs["q"][r, t], seqs["k"][r, : t + 1], seqs["v"][r, : t + 1], ok)
            np.testing.assert_allclose(out[r], ref, atol=2e-5, rtol=2e-5)


def test_h2o_layer_matches_rules():
    k = 6
    recent = k - k // 2
    backend = H2OAttention(k, kernel_backend="reference", block=16)
    lengths = [9, 14]
    state = None
    for s, out, cache, seqs in _drive(backend, lengths, 16, 8, seed=6):
        if s < 0:
            state = []
            for r, n in enumerate(lengths):
                acc = np.zeros((HKV, n))
                for i in range(n):
                    p = _softmax_probs(seqs["q"][r, i], seqs["k"][r, :n], np.arange(n) <= i)
                    acc += p.reshape(HKV, GROUP, n).sum(1)
                slots = []
                for g in range(HKV):
                    key = np.where(np.arange(n) > n - 1 - recent, np.inf, acc[g])
                    order = sorted(range(n), key=lambda j: (-key[j], j))[:k]
                    slots.append(
                        [(j, acc[g, j]) for j in order] + [(-1, -np.inf)] * (k - len(order))
                    )
                state.append(slots)
                held = np.asarray(cache.selected())[r]
                assert held.tolist() == [[j for j, _ in sl] for sl in slots]
            continue
        for r, n in enumerate(lengths):
            t = n + s
            slots = state[r]
            ok = np.zeros((HKV, t + 1), bool)
            for g in range(HKV):
                ok[g, [j for j, _ in slots[g] if j >= 0]] = True
                ok[g, t] = True
            ref, probs = _attend(seqs["q"][r, t], seqs["k"][r, : t + 1], seqs["v"][r, : t + 1], ok)
            np.testing.assert_allclose(out[r], ref, atol=2e-5, rtol=2e-5)
            per_kv = probs.reshape(HKV, GROUP, t + 1).sum(1)
            for g in range(HKV):
                sl = [(j, a + per_kv[g, j]) if j >= 0 else (j, a) for j, a in slots[g]]
                key = [-np.inf if j < 0 else (np.inf if j > t - recent else a) for j, a in sl]
                victim = int(np.argmin(key))
                sl[victim] = (t, per_kv[g, t])
                slots[g] = sl
                assert np.asarray(cache.selected())[r, g].tolist() == [j for j, _ in sl]
                np.testing.assert_allclose(
                    np.asarray(cache.acc)[r, g, :k], [a for _, a in sl], rtol=1e-4, atol=1e-5
                )


# ------------------------------------------------------------------------------ mesh
_MESH_CHECK = """
import dataclasses
import jax, jax.numpy as jnp, numpy as np
from moa_jax.models.eviction_attention import H2OAttention, StreamingAttention
from moa_jax.models.head_major_attention import FullCacheAttention
from moa_jax.models.recycled_attention import RecycleConfig, RecycledAttention
from moa_jax.parallel import MeshConfig, make_mesh

assert jax.device_count() == 8, jax.devices()
mesh = make_mesh(MeshConfig(2, 2, 2))
B, T, HKV, G, D = 4, 12, 4, 2, 16

class Cfg:
    num_kv_heads, head_dim, num_layers = HKV, D, 1

rng = np.random.RandomState(0)
q, k, v = (jnp.asarray(rng.randn(B, T + 1, h, D), jnp.float32) for h in (HKV * G, HKV, HKV))
lengths = jnp.asarray([12, 7, 9, 3], jnp.int32)
pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

def pallas_outside_shard_map(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            yield eqn
        if eqn.primitive.name == "shard_map":
            continue
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from pallas_outside_shard_map(sub)

backends = {
    "h2o": H2OAttention(6, block=16),
    "streaming": StreamingAttention(6, block=16),
    "recycled": RecycledAttention(RecycleConfig(k=6, stride=2), block=16),
    "full": FullCacheAttention(block=16),
}
for name, plain in backends.items():
    outs = []
    for be in (plain, plain.on_mesh(mesh)):
        cache = be.init_cache(Cfg, B, 32, jnp.float32)[0]
        # compiled: eagerly, the interpreted kernels run op by op (twice the time)
        prefill = jax.jit(lambda c: be.prefill(q[:, :T], k[:, :T], v[:, :T], layer=0,
                                               positions=pos, cache=c, lengths=lengths))
        _, cache = prefill(cache)
        step = lambda c: be.decode_step(q[:, T:], k[:, T:], v[:, T:], layer=0,
                                        positions=lengths[:, None], cache=c)
        jaxpr = jax.make_jaxpr(step)(cache).jaxpr
        assert "pallas_call" in str(jaxpr), name
        if be.mesh is not None:  # no Pallas call left for XLA to gather the inputs of
            assert "shard_map" in str(jaxpr) and not list(pallas_outside_shard_map(jaxpr)), name
        if name == "h2o":  # the others' sharded steps are checked through generate
            outs.append(jax.jit(step)(cache))
    for a, b in zip(jax.tree.leaves(outs[:1]), jax.tree.leaves(outs[1:])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
    print("OK", name, flush=True)
"""


def test_decode_steps_run_their_kernels_under_the_mesh():
    """On a (2, 2, 2) mesh of forced CPU devices, every backend's decode step runs its Pallas
    calls under `shard_map` (none left for XLA to gather the inputs of); H2O's equals its step
    without a mesh (the others are compared through `generate` in multidevice_check.py)."""
    import os
    import subprocess
    import sys

    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    res = subprocess.run(
        [sys.executable, "-c", _MESH_CHECK], env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("OK") == 4, res.stdout
