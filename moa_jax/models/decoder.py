"""The decoder every supported family runs (Llama, Mistral, Qwen2, Qwen3), in Flax NNX.

RMSNorm, rotary embeddings (`moa_jax.models.rotary`), grouped-query attention and a SwiGLU MLP;
the families differ only in switches of `ModelConfig` (biases, a per-head q/k norm, the
model's own sliding window, rope scaling), read from their checkpoints by
`moa_jax.models.families`. Module and parameter names mirror HF transformers'
`LlamaForCausalLM` (`embed_tokens`, `layers[i].self_attn.q_proj`, ..., Qwen3's
`self_attn.q_norm`), so weight conversion is one table of per-tensor transforms
(`moa_jax.models.weights`). Layers are a Python list: MoA gives every layer its own spans and
cache shapes, so layers are not uniform. Where the backend treats every layer alike
(`Attention.layer_uniform`: dense attention, the profile's influence attention),
`scan_layers` runs them as one `lax.scan` over their stacked states, and the compiled program
holds one layer instead of L (XLA's GPU compiler took 195 s for SmolLM2's 30 unrolled layers of
the profiling pass and 67-89 s for each generate program).

`DecoderLM` implements the causal-LM interface (`moa_jax.models.causal_lm.CausalLM`) that
every command uses; nothing outside `moa_jax.models` names it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from moa_jax.config import ModelConfig, parse_dtype
from moa_jax.domains import check_int_array
from moa_jax.models.attention import Attention, DenseAttention
from moa_jax.models.causal_lm import (
    HIDDEN,
    LayerAttention,
    LayerStack,
    check_mode,
    check_model_window,
    check_tokens,
)
from moa_jax.models.rotary import RotaryTable, apply_rope, rotary_table
from moa_jax.parallel import constrain, param_logical_axes

_INIT = nnx.initializers.normal(stddev=0.02)


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


class DecoderAttention(nnx.Module):
    """q, k, v projections (optional biases), Qwen3's per-head q/k RMSNorm, RoPE, the attention
    backend, the output projection."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dtype, param_dtype):
        h, hkv, d, e = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        b = cfg.qkv_bias
        self.q_proj = _linear(e, h * d, b, rngs, dtype, param_dtype)
        self.k_proj = _linear(e, hkv * d, b, rngs, dtype, param_dtype)
        self.v_proj = _linear(e, hkv * d, b, rngs, dtype, param_dtype)
        self.o_proj = _linear(h * d, e, cfg.o_bias, rngs, dtype, param_dtype)
        if cfg.qk_norm:
            kw = dict(param_dtype=param_dtype, dtype=dtype)
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, **kw)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, **kw)
        self.qk_norm = cfg.qk_norm
        self.num_heads, self.num_kv_heads, self.head_dim = h, hkv, d

    def __call__(
        self,
        x,
        positions,
        rope: RotaryTable,
        cache,
        attention: Attention,
        layer: int,
        lengths=None,
        mode: str = "stateless",
    ):
        bsz, t, _ = x.shape
        q = self.q_proj(x).reshape(bsz, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(bsz, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(bsz, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        # e.g. Recycled Attention's dynamic schedule compares the queries before RoPE
        q_pre = q if attention.wants_pre_rope_query else None
        q = apply_rope(q, positions, rope)
        k = apply_rope(k, positions, rope)
        kw = dict(layer=layer, positions=positions)
        if mode == "stateless":
            out = attention(q, k, v, lengths=lengths, **kw)
            second = attention.probe(q, k, v, **kw)
        elif mode == "prefill":
            out, second = attention.prefill(
                q, k, v, cache=cache, lengths=lengths, q_pre_rope=q_pre, **kw
            )
        else:
            out, second = attention.decode_step(q, k, v, cache=cache, q_pre_rope=q_pre, **kw)
        return self.o_proj(out.reshape(bsz, t, -1).astype(x.dtype)), second


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dtype, param_dtype):
        e, f, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = _linear(e, f, b, rngs, dtype, param_dtype)
        self.up_proj = _linear(e, f, b, rngs, dtype, param_dtype)
        self.down_proj = _linear(f, e, b, rngs, dtype, param_dtype)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(param_dtype=param_dtype, dtype=dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.self_attn = DecoderAttention(cfg, rngs, dtype, param_dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = MLP(cfg, rngs, dtype, param_dtype)

    def __call__(self, x, positions, rope, cache, attention, layer, lengths=None, mode="stateless"):
        a, cache = self.self_attn(
            self.input_layernorm(x), positions, rope, cache, attention, layer, lengths, mode
        )
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class DecoderLM(nnx.Module):
    """The causal LM of every supported family (implements `causal_lm.CausalLM`).

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
            [DecoderLayer(cfg, rngs, dtype, param_dtype) for _ in range(cfg.num_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, dtype=dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size, False, rngs, dtype, param_dtype)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Token embeddings [B, T, E] (compute dtype) of tokens int [B, T]."""
        return constrain(self.embed_tokens(tokens), HIDDEN)

    def layer(
        self,
        i: int,
        x: jax.Array,
        positions: jax.Array,
        attention: Attention,
        cache: Any = None,
        lengths: jax.Array | None = None,
        *,
        mode: str = "stateless",
        remat: bool = False,
    ) -> tuple[jax.Array, Any]:
        """Decoder layer i: x [B, T, E] -> (x [B, T, E], layer i's new cache in the cached
        modes, the backend's `probe` in stateless mode).

        `attention` is called as layer i's attention in `mode` ('stateless', 'prefill' or
        'decode', `check_mode`) with this layer's `cache`; per-layer data other than a cache (a
        profile's probes, a plan's window arrays) are fields of the backend given for this
        layer. `remat`: recompute the layer's activations in the backward pass (`nnx.remat`),
        stateless mode only.
        """
        check_mode(mode, attention, cache, remat)
        check_model_window(self.config, i, attention, cache, x.shape[1])
        layer = self.layers[i]
        rope = rotary_table(self.config)
        if remat:

            def run(layer, x):
                return layer(x, positions, rope, None, attention, i, lengths, mode)

            x, out = nnx.remat(run)(layer, x)
        else:
            x, out = layer(x, positions, rope, cache, attention, i, lengths, mode)
        return constrain(x, HIDDEN), out

    def hidden_states(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: Sequence[Any] | None = None,
        attention: LayerAttention = DenseAttention(),
        lengths: jax.Array | None = None,
        *,
        mode: str = "stateless",
        remat: bool = False,
        layer_stack: LayerStack | None = None,
    ) -> tuple[jax.Array, Any]:
        """The decoder layers over the embedded tokens: see `__call__` for the arguments.

        `attention`: one backend for every layer, or a tuple with one backend per layer
        (backends holding that layer's arrays as fields; with `layer_stack` they must be
        pytrees of one structure: their arrays are stacked over layers for the scan).
        Returns (the last layer's output [B, T, E] before the final norm, each layer's
        second output (`layer`): a tuple over layers, or one pytree stacked over layers [L, ...]
        with `layer_stack`).
        """
        check_tokens("DecoderLM", tokens, positions, lengths)
        check_mode(mode, attention[0] if isinstance(attention, tuple) else attention, cache, remat)
        if mode == "decode" and tokens.shape[1] != 1:
            raise ValueError(f"a decode step takes one token per row, got {tokens.shape[1]}")
        x = self.embed(tokens)
        if layer_stack is not None:
            for i in range(self.config.num_layers):
                layer_att = attention[i] if isinstance(attention, tuple) else attention
                check_model_window(self.config, i, layer_att, None, x.shape[1])
            return scan_layers(
                layer_stack,
                x,
                positions,
                rotary_table(self.config),
                attention,
                cache,
                lengths,
                mode=mode,
                remat=remat,
            )
        outs = []
        for i in range(len(self.layers)):
            x, out = self.layer(
                i,
                x,
                positions,
                attention[i] if isinstance(attention, tuple) else attention,
                None if cache is None else cache[i],
                lengths,
                mode=mode,
                remat=remat,
            )
            outs.append(out)
        return x, tuple(outs)

    def logits(self, hidden: jax.Array, at: jax.Array | None = None) -> jax.Array:
        """float32 logits of the last layer's output hidden [B, T, E] (the final norm, then the
        LM head): [B, T, V]; with `at` int [B] only at hidden[b, at[b]]: [B, V]; with `at`
        int [B, A] at hidden[b, at[b, a]]: [B, A, V] (a T x V logit matrix is otherwise the
        largest tensor of a long forward pass)."""
        if at is not None:
            rows = (hidden.shape[0],) + (None,) * (getattr(at, "ndim", 1) == 2)
            check_int_array("DecoderLM.logits: at", at, rows, "[B] or [B, A]")
        x = self.norm(hidden)
        if at is not None:
            idx = at[:, None] if at.ndim == 1 else at
            x = jnp.take_along_axis(x, idx[:, :, None], axis=1)
            if at.ndim == 1:
                x = x[:, 0]
        if self.config.tie_word_embeddings:
            logits = self.embed_tokens.attend(x)
        else:
            logits = self.lm_head(x)
        logits = constrain(
            logits, ("batch",) + ("seq",) * (logits.ndim - 2) + ("activation_vocab",)
        )
        return logits.astype(jnp.float32)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: Sequence[Any] | None = None,
        attention: LayerAttention = DenseAttention(),
        logits_at: jax.Array | None = None,
        lengths: jax.Array | None = None,
        *,
        mode: str = "stateless",
        remat: bool = False,
        layer_stack: LayerStack | None = None,
    ):
        """Runs the model: `hidden_states`, then `logits`.

        Args:
          tokens: int [B, T].
          positions: int [B, T], absolute positions (contiguous per row).
          cache: one cache per layer (from `attention.init_cache`) in the cached modes, None in
            stateless mode.
          attention: the attention backend, or one per layer (`hidden_states`).
          logits_at: optional int [B]; if given, logits only at tokens[b, logits_at[b]].
          lengths: optional int [B], valid tokens per row of a right-padded chunk (passed on to
            the attention backend so ring caches skip the padding).
          mode: 'stateless' (no cache), 'prefill' (the prompt into the cache) or 'decode'
            (one token per row, T = 1, against the cache); see `check_mode`.
          remat: recompute each layer's activations in the backward pass instead of keeping
            them (`nnx.remat`; training at long lengths: memory for about a third more
            compute). Stateless mode only.
          layer_stack: `stack_layers(self)`: run the layers as one scan (`scan_layers`); the
            cache is then one pytree with leaves stacked over layers [L, ...], and so is the
            returned cache.
        Returns:
          (logits float32 [B, T, V] or [B, V], new cache tuple (stacked with `layer_stack`) or
          None in stateless mode).
        """
        x, new_cache = self.hidden_states(
            tokens,
            positions,
            cache,
            attention,
            lengths,
            mode=mode,
            remat=remat,
            layer_stack=layer_stack,
        )
        return self.logits(x, logits_at), None if mode == "stateless" else new_cache

    def decode_token(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: Any,
        attention: LayerAttention,
        layer_stack: LayerStack | None = None,
    ):
        """One token per row, tokens int [B] at positions int [B], against `cache` (decode
        mode); returns (logits float32 [B, V], the new cache)."""
        check_tokens("DecoderLM.decode_token", tokens, positions, one_per_row=True)
        return self(
            tokens[:, None],
            positions[:, None],
            cache,
            attention,
            logits_at=jnp.zeros_like(positions),
            mode="decode",
            layer_stack=layer_stack,
        )

    def param_logical_axes(self) -> dict[tuple[Any, ...], tuple[str | None, ...]]:
        """{parameter path: logical axis names} (`moa_jax.parallel.LOGICAL_RULES`)."""
        return {
            tuple(path): param_logical_axes(tuple(path))
            for path, _ in nnx.to_flat_state(nnx.state(self, nnx.Param))
        }


def scan_layers(
    stack: LayerStack,
    x: jax.Array,
    positions: jax.Array,
    rope: RotaryTable,
    attention: LayerAttention,
    cache: Any = None,
    lengths: jax.Array | None = None,
    *,
    mode: str = "stateless",
    remat: bool = False,
) -> tuple[jax.Array, Any]:
    """The decoder layers as one `lax.scan`: x [B, T, E] through every layer of `stack`
    (`rotary_table` of the model's config as `rope`).

    `attention`: one backend for every layer, or a tuple of per-layer backends (pytrees of one
    structure, whose arrays are stacked over layers and scanned). `cache`: each layer's cache,
    a pytree with leaves stacked over layers [L, ...], or None in stateless `mode`. Returns
    (x [B, T, E], the per-layer second outputs (`DecoderLM.layer`) stacked the same way). `remat`
    recomputes each layer in the backward pass. Only for backends with `layer_uniform` (the
    scanned layer runs as layer 0).
    """
    per_layer = isinstance(attention, tuple)
    first = attention[0] if per_layer else attention
    if not first.layer_uniform:
        raise ValueError(
            f"{type(first).__name__} gives layers their own masks or cache "
            f"shapes; its layers cannot run as one scan"
        )
    gd, stacked = stack
    layer_attention = jax.tree.map(lambda *a: jnp.stack(a), *attention) if per_layer else None

    def body(x, xs):
        st, att, c = xs
        y, out = nnx.merge(gd, st)(
            x, positions, rope, c, att if per_layer else attention, 0, lengths, mode
        )
        return constrain(y, HIDDEN), out

    return jax.lax.scan(
        jax.checkpoint(body) if remat else body, x, (stacked, layer_attention, cache)
    )


def init_random(
    cfg: ModelConfig, seed: int = 0, *, dtype: Any = "float32", param_dtype: Any = "float32"
) -> DecoderLM:
    """A randomly initialised model (tests, benchmarks on real shapes)."""
    return DecoderLM(cfg, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype)


def abstract_model(
    cfg: ModelConfig, *, dtype: Any = "float32", param_dtype: Any = "float32"
) -> DecoderLM:
    """The model with `jax.ShapeDtypeStruct` leaves: allocates nothing, for loaders to fill."""
    return nnx.eval_shape(
        lambda: DecoderLM(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)
    )
