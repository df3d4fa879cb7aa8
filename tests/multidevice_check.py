"""Run by test_parallel.py with 8 forced CPU devices: meshes vs one device.

Prints one 'OK <mesh>' line per mesh whose forward logits and greedy tokens match, dense and
with a heterogeneous MoA plan (whose prefill kernel runs under shard_map, each device with its
heads' windows; its gradients too), and with the recycled, StreamingLLM and H2O decode
kernels (rows and KV heads split).
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moa_jax.config import ModelConfig
from moa_jax.generate import _cache_bytes_per_device, generate
from moa_jax.models.attention import DenseAttention
from moa_jax.models.causal_lm import forward
from moa_jax.models.eviction_attention import H2OAttention, StreamingAttention
from moa_jax.models.moa_attention import MoAAttention
from moa_jax.models.recycled_attention import RecycleConfig, RecycledAttention
from moa_jax.models.registry import init_random
from moa_jax.parallel import MeshConfig, batch_sharding, make_mesh, mesh_context, param_shardings
from moa_jax.plan import Plan

assert jax.device_count() == 8, jax.devices()
cfg = ModelConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=16,
    num_kv_heads=8,
    head_dim=16,
)
model = init_random(cfg, seed=0)
g, s = nnx.split(model)
rng = np.random.RandomState(0)
prompts = [rng.randint(4, 128, n).tolist() for n in (5, 17, 9, 3, 30, 2, 8, 11)]
tokens = jnp.asarray(rng.randint(0, 128, (8, 32)))
pos = jnp.broadcast_to(jnp.arange(32), (8, 32))
ref_logits, _ = forward(g, s, tokens, pos)
ref_tokens = generate(model, prompts, max_new_tokens=8, stop_ids=()).tokens
windows = rng.choice([1, 3, 8, 20, 64], (cfg.num_layers, cfg.num_heads))
plan = Plan.from_windows(windows.tolist(), rng.randint(0, 3, windows.shape).tolist())
moa = MoAAttention(plan, length=40)


def moa_loss(state, tokens, attention):
    logits, _ = forward(g, state, tokens, pos, attention=attention)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 7])


ref_moa, ref_grad = jax.value_and_grad(moa_loss)(s, tokens, moa)
ref_moa_tokens = generate(model, prompts, max_new_tokens=8, stop_ids=(), attention=moa).tokens
decoders = {
    "recycled": dict(
        attention=RecycledAttention(
            RecycleConfig(k=8, stride=3),
            prefill_moa=moa,
            kernel_backend=moa.kernel_backend,
            interpret=moa.interpret,
        )
    ),
    "streaming": dict(attention=StreamingAttention(k=8)),
    "h2o": dict(attention=H2OAttention(k=8)),
}
ref_dec = {
    name: generate(model, prompts, max_new_tokens=8, stop_ids=(), **kw).tokens
    for name, kw in decoders.items()
}

# argv: meshes as DATA,FSDP,TENSOR (default: all four)
MESHES = [MeshConfig(*map(int, a.split(","))) for a in sys.argv[1:]] or [
    MeshConfig(8, 1, 1),
    MeshConfig(2, 2, 2),
    MeshConfig(1, 1, 8),
    MeshConfig(1, 8, 1),
]
for mc in MESHES:
    mesh = make_mesh(mc)
    ss = jax.device_put(s, param_shardings(s, mesh))
    q = ss["layers"][0]["self_attn"]["q_proj"]["kernel"][...]
    if mc.tensor > 1:  # parameters really are split
        assert q.sharding.shard_shape(q.shape)[1] == q.shape[1] // mc.tensor, q.sharding
    if mc.fsdp > 1:
        assert q.sharding.shard_shape(q.shape)[0] == q.shape[0] // mc.fsdp, q.sharding
    logits, _ = forward(g, ss, jax.device_put(tokens, batch_sharding(mesh, tokens.shape)), pos)
    with mesh_context(mesh):  # the model constrains its activations on the context mesh
        assert "sharding_constraint" in str(
            jax.make_jaxpr(lambda st, tk: forward(g, st, tk, pos))(ss, tokens)
        )
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-4, rtol=1e-4)
    out = generate(model, prompts, max_new_tokens=8, stop_ids=(), mesh=mesh)
    np.testing.assert_array_equal(out.tokens, ref_tokens)
    on_mesh = moa.on_mesh(mesh)
    toks = jax.device_put(tokens, batch_sharding(mesh, tokens.shape))
    jaxpr = str(jax.make_jaxpr(moa_loss, static_argnums=2)(ss, toks, on_mesh))
    assert "shard_map" in jaxpr
    val, grad = jax.value_and_grad(moa_loss)(ss, toks, on_mesh)
    np.testing.assert_allclose(float(val), float(ref_moa), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)
    out = generate(model, prompts, max_new_tokens=8, stop_ids=(), attention=moa, mesh=mesh)
    np.testing.assert_array_equal(out.tokens, ref_moa_tokens)
    span = on_mesh.init_cache(cfg, 8, 40, jnp.float32)[0]  # packed per device for decoding
    assert span.schedule.shards == mc.tensor and span.k.shape[1] % mc.tensor == 0, (
        span.schedule.shards,
        mc,
    )
    # the memory check before allocation counts each device's shard of the cache
    whole = _cache_bytes_per_device(DenseAttention(), cfg, 8, 40, jnp.float32)
    mine = _cache_bytes_per_device(DenseAttention(), cfg, 8, 40, jnp.float32, mesh)
    assert mine * (mc.data * mc.fsdp) * mc.tensor == whole, (mine, whole, mc)
    for name, kw in decoders.items():
        out = generate(model, prompts, max_new_tokens=8, stop_ids=(), mesh=mesh, **kw)
        np.testing.assert_array_equal(out.tokens, ref_dec[name], err_msg=name)
    print("OK", mc, flush=True)
