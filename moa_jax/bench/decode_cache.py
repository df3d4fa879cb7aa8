"""The decode benchmark's KV caches: made as a prompt of C tokens leaves them, without a
prefill (`make_caches`), and the K/V bytes a decode step of each method reads
(`kv_read_bytes`)."""

from __future__ import annotations


def fill_cache(cache, context: int, key):
    """A layer cache as a prompt of `context` tokens leaves it (random K/V, valid state): the
    cache's own `filled` (`moa_jax.pallas_kernels.caches.protocol.KVCache`)."""
    return cache.filled(context, key)


def kv_read_bytes(attention, caches, cfg, batch: int, live: float, itemsize: int) -> float:
    """K/V bytes (all layers and rows) that a decode step must read: what the backend says each
    layer reads (`CachedAttention.decode_kv_tokens`) with `live` tokens in every row."""
    per_token = 2 * cfg.num_kv_heads * cfg.head_dim * itemsize * batch
    return per_token * sum(attention.decode_kv_tokens(c, live) for c in caches)


def make_caches(
    attention, cfg, batch: int, cache_len: int, context: int, seed: int, mesh=None
) -> tuple:
    """Per-layer caches as a prompt of `context` tokens leaves them (`fill_cache`), each made
    by its own jitted call straight into its sharding on `mesh`, so that no zero copy of the
    caches is ever allocated."""
    # Imported here: `moa_jax.bench.decode` imports this module at its top, and its command line
    # (--help, the config checks) runs without loading JAX and Flax.
    import jax
    import jax.numpy as jnp

    from moa_jax.parallel import cache_shardings

    abstract = jax.eval_shape(lambda: attention.init_cache(cfg, batch, cache_len, jnp.bfloat16))
    if mesh is not None:
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
