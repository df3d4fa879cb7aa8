"""Llama in Flax NNX: RMSNorm, RoPE (default / linear / llama3 scaling), GQA, SwiGLU.

Module and parameter names mirror HF transformers' `LlamaForCausalLM` (`embed_tokens`,
`layers[i].self_attn.q_proj`, ...), so weight conversion is a table of per-tensor transforms
(`moa_jax.models.weights`). Layers are a Python list: MoA gives every layer its own spans and
cache shapes, so layers are not uniform. Where the backend treats every layer alike
(`AttentionBackend.layer_uniform`: dense attention, the profile's influence attention),
`scan_layers` runs them as one `lax.scan` over their stacked states, and the compiled program
holds one layer instead of L (XLA's GPU compiler took 195 s for SmolLM2's 30 unrolled layers of
the profiling pass and 67-89 s for each generate program).

Attention is delegated to an `AttentionBackend` (`moa_jax.models.attention`), which also owns the
KV cache layout. `forward` is the pure, jitted entry point over (graphdef, state).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moa_jax.config import ModelConfig, parse_dtype
from moa_jax.models.attention import AttentionBackend, DenseAttention
from moa_jax.parallel import constrain

_INIT = nnx.initializers.normal(stddev=0.02)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse RoPE frequencies [head_dim // 2] (float64 numpy), with the config's scaling."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    rs = cfg.rope_scaling
    if rs.rope_type == "linear":
        inv = inv / rs.factor
    elif rs.rope_type == "llama3":
        old = rs.original_max_position_embeddings
        low_wavelen = old / rs.low_freq_factor
        high_wavelen = old / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
        smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates x [B, T, N, D] by positions [B, T] (HF's rotate-half layout)."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype: Any, dtype: Any):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return y.astype(self.dtype) * self.weight[...].astype(self.dtype)


def _linear(i: int, o: int, bias: bool, rngs: nnx.Rngs, dtype, param_dtype) -> nnx.Linear:
    return nnx.Linear(
        i, o, use_bias=bias, kernel_init=_INIT, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dtype, param_dtype):
        h, hkv, d, e = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        b = cfg.attention_bias
        self.q_proj = _linear(e, h * d, b, rngs, dtype, param_dtype)
        self.k_proj = _linear(e, hkv * d, b, rngs, dtype, param_dtype)
        self.v_proj = _linear(e, hkv * d, b, rngs, dtype, param_dtype)
        self.o_proj = _linear(h * d, e, b, rngs, dtype, param_dtype)
        self.num_heads, self.num_kv_heads, self.head_dim = h, hkv, d

    def __call__(
        self, x, positions, inv_freq, cache, attention: AttentionBackend, layer: int, lengths=None
    ):
        bsz, t, _ = x.shape
        q = self.q_proj(x).reshape(bsz, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(bsz, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(bsz, t, self.num_kv_heads, self.head_dim)
        extra = {} if lengths is None else {"lengths": lengths}
        if attention.wants_pre_rope_query:
            extra["q_pre_rope"] = q  # e.g. Recycled Attention's dynamic schedule
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        out, cache = attention(q, k, v, layer=layer, positions=positions, cache=cache, **extra)
        return self.o_proj(out.reshape(bsz, t, -1).astype(x.dtype)), cache


class LlamaMLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dtype, param_dtype):
        e, f, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = _linear(e, f, b, rngs, dtype, param_dtype)
        self.up_proj = _linear(e, f, b, rngs, dtype, param_dtype)
        self.down_proj = _linear(f, e, b, rngs, dtype, param_dtype)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(param_dtype=param_dtype, dtype=dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.self_attn = LlamaAttention(cfg, rngs, dtype, param_dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = LlamaMLP(cfg, rngs, dtype, param_dtype)

    def __call__(self, x, positions, inv_freq, cache, attention, layer, lengths=None):
        a, cache = self.self_attn(
            self.input_layernorm(x), positions, inv_freq, cache, attention, layer, lengths
        )
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class Llama(nnx.Module):
    """Llama causal LM.

    Args:
      cfg: architecture.
      rngs: initialiser randomness (weights are usually overwritten by a loader).
      dtype: compute dtype ('float32' / 'bfloat16' or a jnp dtype).
      param_dtype: storage dtype of the parameters.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        dtype: Any = "float32",
        param_dtype: Any = "float32",
    ):
        dtype, param_dtype = parse_dtype(dtype), parse_dtype(param_dtype)
        self.config = cfg
        self.dtype = dtype
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            embedding_init=_INIT,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.layers = nnx.List(
            [LlamaDecoderLayer(cfg, rngs, dtype, param_dtype) for _ in range(cfg.num_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, dtype=dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size, False, rngs, dtype, param_dtype)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: Sequence[Any] | None = None,
        attention: AttentionBackend = DenseAttention(),
        logits_at: jax.Array | None = None,
        lengths: jax.Array | None = None,
        *,
        remat: bool = False,
        layer_stack: "LayerStack | None" = None,
    ):
        """Runs the model.

        Args:
          tokens: int [B, T].
          positions: int [B, T], absolute positions (contiguous per row).
          cache: one cache per layer (from `attention.init_cache`) or None.
          attention: the attention backend.
          logits_at: optional int [B]; if given, logits only at tokens[b, logits_at[b]].
          lengths: optional int [B], valid tokens per row of a right-padded chunk (passed on to
            the attention backend so ring caches skip the padding).
          remat: recompute each layer's activations in the backward pass instead of keeping
            them (`nnx.remat`; training at long lengths: memory for about a third more
            compute). Without a cache only.
          layer_stack: `stack_layers(self)`: run the layers as one scan (`scan_layers`); the
            cache is then one pytree with leaves stacked over layers [L, ...], and so is the
            returned cache.
        Returns:
          (logits float32 [B, T, V] or [B, V], new cache tuple (stacked with `layer_stack`) or
          None).
        """
        cfg = self.config
        inv_freq = rope_inv_freq(cfg)
        hidden = ("batch", "seq", "activation_embed")
        x = constrain(self.embed_tokens(tokens), hidden)
        if remat and cache is not None:
            raise ValueError("remat is for training (no cache); decoding keeps no activations")
        if layer_stack is not None:
            x, stacked_cache = scan_layers(
                layer_stack, x, positions, inv_freq, attention, cache, lengths, remat=remat
            )
            new_cache = None if cache is None else stacked_cache
        else:
            caches = []
            for i, layer in enumerate(self.layers):
                if remat:

                    def run(layer, x, i=i):
                        return layer(x, positions, inv_freq, None, attention, i, lengths)[0]

                    x, c = nnx.remat(run)(layer, x), None
                else:
                    x, c = layer(
                        x,
                        positions,
                        inv_freq,
                        None if cache is None else cache[i],
                        attention,
                        i,
                        lengths,
                    )
                x = constrain(x, hidden)
                caches.append(c)
            new_cache = None if cache is None else tuple(caches)
        x = self.norm(x)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)[:, 0]
        if cfg.tie_word_embeddings:
            logits = self.embed_tokens.attend(x)
        else:
            logits = self.lm_head(x)
        logits = constrain(
            logits, ("batch",) + ("seq",) * (logits.ndim - 2) + ("activation_vocab",)
        )
        return logits.astype(jnp.float32), new_cache


LayerStack = tuple[nnx.GraphDef, nnx.State]


def stack_layers(model: Llama) -> LayerStack:
    """(one decoder layer's graphdef, every layer's state stacked on a leading [L] axis), for
    `scan_layers`. Under `jit`, make it once outside a decode loop (it copies the weights)."""
    splits = [nnx.split(layer) for layer in model.layers]
    return splits[0][0], jax.tree.map(lambda *leaves: jnp.stack(leaves), *[st for _, st in splits])


def scan_layers(
    stack: LayerStack,
    x: jax.Array,
    positions: jax.Array,
    inv_freq: jax.Array,
    attention: AttentionBackend,
    layer_args: Any = None,
    lengths: jax.Array | None = None,
    *,
    remat: bool = False,
) -> tuple[jax.Array, Any]:
    """The decoder layers as one `lax.scan`: x [B, T, E] through every layer of `stack`.

    `layer_args`: each layer's cache (or the backend's per-layer input), a pytree with leaves
    stacked over layers [L, ...], or None. Returns (x [B, T, E], the backend's per-layer outputs
    stacked the same way). `remat` recomputes each layer in the backward pass. Only for backends
    with `layer_uniform` (the scanned layer runs as layer 0).
    """
    if not attention.layer_uniform:
        raise ValueError(
            f"{type(attention).__name__} gives layers their own masks or cache "
            f"shapes; its layers cannot run as one scan"
        )
    gd, stacked = stack
    hidden = ("batch", "seq", "activation_embed")

    def body(x, xs):
        st, arg = xs
        y, out = nnx.merge(gd, st)(x, positions, inv_freq, arg, attention, 0, lengths)
        return constrain(y, hidden), out

    return jax.lax.scan(jax.checkpoint(body) if remat else body, x, (stacked, layer_args))


@functools.partial(jax.jit, static_argnames=("graphdef", "attention"))
def forward(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens: jax.Array,
    positions: jax.Array,
    cache: Sequence[Any] | None = None,
    *,
    attention: AttentionBackend = DenseAttention(),
    logits_at: jax.Array | None = None,
    lengths: jax.Array | None = None,
):
    """Pure jitted forward over a split model: see `Llama.__call__`."""
    model = nnx.merge(graphdef, state)
    return model(tokens, positions, cache, attention, logits_at, lengths)


def init_random(
    cfg: ModelConfig, seed: int = 0, *, dtype: Any = "float32", param_dtype: Any = "float32"
) -> Llama:
    """A randomly initialised model (tests, benchmarks on real shapes)."""
    return Llama(cfg, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype)


def abstract_model(
    cfg: ModelConfig, *, dtype: Any = "float32", param_dtype: Any = "float32"
) -> Llama:
    """The model with `jax.ShapeDtypeStruct` leaves: allocates nothing, for loaders to fill."""
    return nnx.eval_shape(
        lambda: Llama(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)
    )
