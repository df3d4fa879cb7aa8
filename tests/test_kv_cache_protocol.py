"""Every layer cache follows `KVCache`: write (with lengths), logical axes, bytes, filled."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moa_jax.models.attention import DenseAttention
from moa_jax.models.eviction_attention import H2OAttention, StreamingAttention
from moa_jax.models.head_major_attention import FullCacheAttention
from moa_jax.models.masked_attention import MaskedAttention
from moa_jax.models.moa_attention import MoAAttention
from moa_jax.models.recycled_attention import RecycleConfig, RecycledAttention
from moa_jax.pallas_kernels.caches.protocol import KVCache
from moa_jax.plan import Plan

from conftest import tiny_config

CFG = tiny_config()
BACKENDS = {
    "dense": DenseAttention(),
    "masked": MaskedAttention(),
    "moa": MoAAttention(Plan.uniform(CFG.num_layers, CFG.num_heads, window=12, sink=2)),
    "full": FullCacheAttention(block=16),
    "recycled": RecycledAttention(RecycleConfig(k=6, stride=2), block=16),
    "streaming": StreamingAttention(6, block=16),
    "h2o": H2OAttention(6, block=16),
}


@pytest.mark.parametrize("name", list(BACKENDS))
def test_every_cache_follows_the_protocol(name):
    backend = BACKENDS[name]
    b, max_len, context = 2, 40, 20
    caches = backend.init_cache(CFG, b, max_len, jnp.float32)
    cache = caches[0]
    assert isinstance(cache, KVCache)
    # bytes: every array leaf, and the same number for the abstract cache
    leaves = jax.tree_util.tree_leaves(cache)
    assert cache.nbytes == sum(x.nbytes for x in leaves) > 0
    abstract = jax.eval_shape(lambda: backend.init_cache(CFG, b, max_len, jnp.float32))
    assert [c.nbytes for c in abstract] == [c.nbytes for c in caches]
    # logical axes: one name per dimension of every leaf
    axes = jax.tree_util.tree_leaves(cache.logical_axes(), is_leaf=lambda x: isinstance(x, tuple))
    assert [len(a) for a in axes] == [x.ndim for x in leaves]
    # filled and written: same structure, shapes and dtypes
    structure = jax.tree_util.tree_structure(cache)
    shapes = [(x.shape, x.dtype) for x in leaves]
    filled = jax.jit(lambda c, k: c.filled(context, k))(cache, jax.random.key(0))
    assert jax.tree_util.tree_structure(filled) == structure
    assert [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(filled)] == shapes
    kv = jax.random.normal(jax.random.key(1), (b, 8, CFG.num_kv_heads, CFG.head_dim))
    start = jnp.zeros((b,), jnp.int32)
    written = cache.write(kv, kv, start, jnp.asarray([8, 5]))
    assert jax.tree_util.tree_structure(written) == structure
    assert [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(written)] == shapes
    assert any(
        not np.array_equal(x, y)
        for x, y in zip(jax.tree_util.tree_leaves(written), leaves)
        if x.dtype == jnp.float32
    ) or name in ("streaming", "h2o")  # their empty slots hold no position yet


def test_decode_kv_tokens_is_what_each_backend_keeps():
    live, context = 30.0, 20
    read = {
        name: backend.decode_kv_tokens(
            backend.init_cache(CFG, 2, 40, jnp.float32)[0].filled(context, jax.random.key(0)),
            live,
        )
        for name, backend in BACKENDS.items()
    }
    assert read["dense"] == read["masked"] == read["full"] == live
    assert read["streaming"] == read["h2o"] == 6 + 1  # K slots and the new token
    assert read["recycled"] == (live + (2 - 1) * (6 + 1)) / 2  # a full step every S = 2
    # MoA: each KV head's filled slots, at least its 2 sinks and 12-token window (the ring is
    # padded to the kernel's block), at most the 20-token prompt
    assert 2 + 12 <= read["moa"] <= context
