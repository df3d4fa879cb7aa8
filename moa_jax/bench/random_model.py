"""The benchmarks' models: named Llama shapes and random weights made on the device."""

from __future__ import annotations

import functools
from typing import Any

LLAMA3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    rope_theta=500000.0,
    max_position_embeddings=131072,
)
# SmolLM2-135M-Instruct (the default preset's GGUF metadata)
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    rope_theta=100000.0,
    max_position_embeddings=8192,
)
TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rope_theta=10000.0,
    max_position_embeddings=4096,
)
SHAPES = {"llama3-8b": LLAMA3_8B, "smollm2-135m": SMOLLM2_135M, "tiny": TINY}


def model_shape(name: str, layers: int | None = None) -> dict:
    """The `ModelConfig` fields of a named shape (`SHAPES`), `layers` layers if given."""
    shape = dict(SHAPES[name])
    if layers:
        shape["num_layers"] = layers
    return shape


def model_config(name: str, layers: int | None = None):
    """The `ModelConfig` of a named shape (`SHAPES`), `layers` layers if given."""
    # moa_jax.config loads jax: the bench CLIs import this module before parsing flags (--help)
    from moa_jax.config import ModelConfig

    return ModelConfig(**model_shape(name, layers))


def make_weights(
    cfg, seed: int = 0, *, param_dtype: str = "bfloat16", dtype: str = "bfloat16", mesh=None
):
    """(graphdef, state) of a random model made on the device(s), sharded over `mesh` by the
    library's parameter rules if given.

    Leaf by leaf, one small jitted generator per distinct (shape, dtype, sharding): jitting the
    whole model's initialiser compiles for minutes at 8B shapes, while the values do not matter
    here.
    """
    # jax loads on first use: the bench CLIs import this module before parsing flags (--help)
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from moa_jax.models.registry import abstract_model
    from moa_jax.parallel import param_shardings

    graphdef, abstract = nnx.split(abstract_model(cfg, dtype=dtype, param_dtype=param_dtype))
    leaves, treedef = jax.tree_util.tree_flatten(abstract)
    if mesh is not None:
        shardings = jax.tree_util.tree_leaves(param_shardings(abstract, mesh))
    else:
        shardings = [None] * len(leaves)
    fns: dict[Any, Any] = {}

    def gen(key, shape, dt):
        if len(shape) == 1:  # norm scales
            return jnp.ones(shape, dt)
        return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dt)

    keys = jax.random.split(jax.random.key(seed), len(leaves))
    made = []
    for k, x, sh in zip(keys, leaves, shardings):
        fk = (tuple(x.shape), jnp.dtype(x.dtype), sh)
        if fk not in fns:
            fns[fk] = jax.jit(functools.partial(gen, shape=fk[0], dt=fk[1]), out_shardings=sh)
        made.append(fns[fk](k))
    return graphdef, jax.tree_util.tree_unflatten(treedef, made)
