"""The benchmarks' models: named shapes of Llama-family models and random weights made on the
device.

Two kinds of preset (`SHAPE_NAMES` lists both):
  SHAPES      `ModelConfig` fields written out (llama3-8b, smollm2-135m, tiny).
  HF_CONFIGS  a published model's HF `config.json`, the keys that shape the model copied as
              the model's repository has them, read by the family's own parser
              (`moa_jax.models.families.config_from_hf`), the same path `load_model` takes for
              the real checkpoint: the family switches (Qwen2's q/k/v biases, Qwen3's q/k
              norms, Llama 3.1's rope scaling, Mistral's window) are what the model would get.
"""

from __future__ import annotations

import dataclasses
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

# The published config.json of each model on the Hugging Face Hub (huggingface.co/<repo>/blob/
# main/config.json), the keys that shape the model; token ids, dtype and initialiser settings
# are left out. Parameter counts (tests/test_bench_presets.py checks them): the model cards'.

# meta-llama/Llama-3.1-8B: 8.03B parameters.
LLAMA31_8B_HF = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
}
# mistralai/Mistral-7B-v0.3: 7.25B parameters; no sliding window (v0.1 had 4096).
MISTRAL_7B_HF = {
    "model_type": "mistral",
    "vocab_size": 32768,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
}
# Qwen/Qwen2.5-7B: 7.62B parameters; 28 query heads over 4 KV heads (group 7), biases on
# q, k, v; `sliding_window` is set but `use_sliding_window` is off, so no layer has a window.
QWEN25_7B_HF = {
    "model_type": "qwen2",
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "use_sliding_window": False,
    "sliding_window": 131072,
    "max_window_layers": 28,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
}
# Qwen/Qwen3-8B: 8.19B parameters; RMSNorm on each head's q and k; no window.
QWEN3_8B_HF = {
    "model_type": "qwen3",
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "attention_bias": False,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000,
    "rope_scaling": None,
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": 36,
    "max_position_embeddings": 40960,
    "tie_word_embeddings": False,
}
HF_CONFIGS = {
    "llama3.1-8b": LLAMA31_8B_HF,
    "mistral-7b": MISTRAL_7B_HF,
    "qwen2.5-7b": QWEN25_7B_HF,
    "qwen3-8b": QWEN3_8B_HF,
}
# Parameters of the published models (the model cards' sizes), for the presets' tests.
PUBLISHED_PARAMS = {
    "llama3.1-8b": 8.03e9,
    "mistral-7b": 7.25e9,
    "qwen2.5-7b": 7.62e9,
    "qwen3-8b": 8.19e9,
}
SHAPE_NAMES = sorted([*SHAPES, *HF_CONFIGS])


NARROW_HEAD_DIM, NARROW_FFN, NARROW_VOCAB = 16, 128, 256


def narrowed(cfg):
    """`cfg` at widths a CPU runs in seconds, its structure kept: family switches, rope
    scaling, layers, query and KV heads (so its GQA group and a plan's shape); head_dim 16,
    hidden heads x 16, FFN 128, vocab 256. For smoke runs of the full-size presets."""
    return dataclasses.replace(
        cfg,
        head_dim=NARROW_HEAD_DIM,
        hidden_size=cfg.num_heads * NARROW_HEAD_DIM,
        intermediate_size=NARROW_FFN,
        vocab_size=NARROW_VOCAB,
        bos_token_id=None,
        eos_token_ids=(),
        pad_token_id=None,
    )


def model_config(name: str, layers: int | None = None, *, narrow: bool = False):
    """The `ModelConfig` of a named shape (`SHAPE_NAMES`), `layers` layers if given,
    `narrowed` if `narrow`."""
    # moa_jax.config loads jax: the bench CLIs import this module before parsing flags (--help)
    from moa_jax.config import ModelConfig
    from moa_jax.models.families import config_from_hf

    if name in HF_CONFIGS:
        cfg = config_from_hf(HF_CONFIGS[name], source=f"the {name} preset")
    elif name in SHAPES:
        cfg = ModelConfig(**SHAPES[name])
    else:
        raise ValueError(f"unknown model shape {name!r}; shapes: {', '.join(SHAPE_NAMES)}")
    if layers:
        windowed = cfg.window_layers
        if windowed is not None:
            windowed = tuple(i for i in windowed if i < layers)
        cfg = dataclasses.replace(cfg, num_layers=layers, window_layers=windowed)
    return narrowed(cfg) if narrow else cfg


def model_shape(name: str, layers: int | None = None, *, narrow: bool = False) -> dict:
    """The `ModelConfig` fields of a named shape (JSON-ready), `layers` layers if given: the
    written-out fields of a `SHAPES` entry, every field (rope scaling as a dict) of an
    `HF_CONFIGS` one or of a `narrow`ed shape."""
    if name in SHAPES and not narrow:
        shape = dict(SHAPES[name])
        if layers:
            shape["num_layers"] = layers
        return shape
    return dataclasses.asdict(model_config(name, layers, narrow=narrow))


def param_count(cfg) -> int:
    """Parameters of a model of `cfg` (from its abstract model: nothing allocated)."""
    # jax loads on first use: the bench CLIs import this module before parsing flags (--help)
    import jax
    from flax import nnx

    from moa_jax.models.registry import abstract_model

    _, state = nnx.split(abstract_model(cfg))
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(state))


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
