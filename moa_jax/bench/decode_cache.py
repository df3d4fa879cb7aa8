"""The decode benchmark's KV caches: made as a prompt of C tokens leaves them, without a
prefill (`make_caches`), and the K/V bytes a decode step of each method reads
(`kv_read_bytes`)."""

from __future__ import annotations

import dataclasses

import numpy as np

from moa_jax.bench.decode_variants import Variant


def fill_cache(cache, context: int, key):
    """A layer cache as a prompt of `context` tokens leaves it (random K/V, valid state)."""
    import jax
    import jax.numpy as jnp

    from moa_jax.pallas_kernels.caches.dense import DenseKVCache
    from moa_jax.pallas_kernels.caches.span import SpanKVCache
    from moa_jax.models.eviction_attention import streaming_positions
    from moa_jax.pallas_kernels.caches.head_major import (
        HeadMajorKVCache,
        RecycledKVCache,
        SelectedKVCache,
    )

    k1, k2, k3, k4 = jax.random.split(key, 4)

    def rnd(kk, x):
        return jax.random.normal(kk, x.shape, jnp.float32).astype(x.dtype)

    def random_selection(kk, b, hkv, slots, top_k):
        sc = jax.random.uniform(kk, (b, hkv, context))
        kk_ = min(top_k, context)
        idx = jax.lax.top_k(sc, kk_)[1].astype(jnp.int32)
        return jnp.pad(idx, ((0, 0), (0, 0), (0, slots - kk_)), constant_values=-1)

    if isinstance(cache, (DenseKVCache, HeadMajorKVCache)):
        return dataclasses.replace(cache, k=rnd(k1, cache.k), v=rnd(k2, cache.v))
    if isinstance(cache, SpanKVCache):
        b, _, d = cache.k.shape
        one = jnp.zeros((b, 1, cache.num_kv_heads, d), cache.k.dtype)
        c = cache.write(one, one, jnp.zeros((b,), jnp.int32), jnp.full((b,), context, jnp.int32))
        return dataclasses.replace(c, k=rnd(k1, c.k), v=rnd(k2, c.v))
    if isinstance(cache, RecycledKVCache):
        b, hkv, slots, _ = cache.kp.shape
        ck, cv = rnd(k1, cache.k), rnd(k2, cache.v)
        idx = random_selection(k3, b, hkv, slots, cache.top_k)
        take = jnp.maximum(idx, 0)[..., None]
        return dataclasses.replace(
            cache,
            k=ck,
            v=cv,
            idx=idx,
            kp=jnp.take_along_axis(ck, take, axis=2),
            vp=jnp.take_along_axis(cv, take, axis=2),
            ref_q=jax.random.normal(k4, cache.ref_q.shape, jnp.float32),
        )
    if isinstance(cache, SelectedKVCache):
        b, hkv, slots, _ = cache.kp.shape
        if cache.acc is None:
            idx = streaming_positions(jnp.full((b,), context - 1, jnp.int32), cache.top_k, 4, slots)
            idx = jnp.broadcast_to(idx[:, None], (b, hkv, slots))
            acc = None
        else:
            idx = random_selection(k3, b, hkv, slots, cache.top_k)
            acc = jnp.where(idx >= 0, jax.random.uniform(k4, idx.shape), -jnp.inf)
        return dataclasses.replace(
            cache, kp=rnd(k1, cache.kp), vp=rnd(k2, cache.vp), idx=idx, acc=acc
        )
    raise TypeError(f"no filler for cache type {type(cache).__name__}")


def kv_read_bytes(variant: Variant, caches, cfg, batch: int, live: float, itemsize: int) -> float:
    """K/V bytes (all layers and rows) that a decode step of the method must read."""
    per_token = 2 * cfg.num_kv_heads * cfg.head_dim * itemsize * cfg.num_layers * batch
    m = variant.method
    if m in ("dense", "dense-kernel", "hf"):
        return per_token * live
    if m == "moa":
        slots = sum(float(np.asarray(c.pos >= 0).sum()) for c in caches)  # all rows, layers
        return 2 * cfg.head_dim * itemsize * slots
    k = variant.params["k"]
    if m in ("streaming", "h2o"):
        return per_token * (k + 1)
    if m == "recycled":
        s = variant.params.get("stride")
        if s is None or "threshold" in variant.params:
            return per_token * (k + 1)
        return per_token * (live + (s - 1) * (k + 1)) / s
    raise ValueError(m)


def make_caches(
    attention, cfg, batch: int, cache_len: int, context: int, seed: int, mesh=None
) -> tuple:
    """Per-layer caches as a prompt of `context` tokens leaves them (`fill_cache`), each made
    by its own jitted call straight into its sharding on `mesh`, so that no zero copy of the
    caches is ever allocated."""
    import jax
    import jax.numpy as jnp

    abstract = jax.eval_shape(lambda: attention.init_cache(cfg, batch, cache_len, jnp.bfloat16))
    if mesh is not None:
        from moa_jax.parallel import cache_shardings

        shardings = cache_shardings(abstract, mesh)
    else:
        shardings = (None,) * len(abstract)
    keys = jax.random.split(jax.random.key(seed), len(abstract))
    caches = []
    for i, (kk, sh) in enumerate(zip(keys, shardings)):

        def one(key, i=i):
            return fill_cache(
                attention.init_cache(cfg, batch, cache_len, jnp.bfloat16)[i], context, key
            )

        caches.append(jax.jit(one, out_shardings=sh)(kk))
    return tuple(caches)
