"""The causal-LM interface every command, the search, the evaluators and the benchmarks use.

A model of any supported family (`moa_jax.models.families`) offers:

  model.config -> ModelConfig (its family, sizes and switches)
  model.embed(tokens) -> x [B, T, E]
  model.layer(i, x, positions, attention, cache, lengths, mode=) -> (x, layer i's cache or probe)
  model.hidden_states(tokens, positions, cache, attention, lengths, mode=, layer_stack=)
    -> (x before the final norm, per-layer caches or probes)
  model.logits(x, at=None) -> float32 logits at every position or only at `at`
  model(tokens, positions, ...) = hidden_states + logits; `forward` is its pure, jitted form
    over (graphdef, state)
  model.decode_token(tokens, positions, cache, attention) -> (logits [B, V], cache)
  model.layers -> the decoder layers (`stack_layers` stacks them for one `lax.scan`)
  model.param_logical_axes() -> {parameter path: logical axis names} (`moa_jax.parallel`)

Attention is delegated to an attention object (`moa_jax.models.attention`): an `Attention` for
the stateless mode, a `CachedAttention` (which also owns the KV cache layout) for the cached
ones. Every call names its mode: 'stateless' (no cache: training, search, scoring), 'prefill'
(the prompt into the cache) or 'decode' (one token per row against the cache). A caller with
per-layer data other than a cache (a profile's probes, a plan's window arrays) gives each layer
its own backend holding them (a tuple of backends), never the `cache` slot.

Models are built by `moa_jax.models.registry` (`load_model`, `init_random`, `abstract_model`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import jax
from flax import nnx

from moa_jax.config import ModelConfig
from moa_jax.domains import check_int_array
from moa_jax.models.attention import MODES, Attention, CachedAttention, DenseAttention

HIDDEN = ("batch", "seq", "activation_embed")  # logical axes of the hidden states
LayerStack = tuple[nnx.GraphDef, nnx.State]
# one backend for every layer, or one per layer (`CausalLM.hidden_states`)
LayerAttention = Attention | tuple[Attention, ...]


@runtime_checkable
class CausalLM(Protocol):
    """A causal LM of a supported family (module docstring)."""

    config: ModelConfig
    layers: Sequence[nnx.Module]

    def embed(self, tokens: jax.Array) -> jax.Array: ...

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
    ) -> tuple[jax.Array, Any]: ...

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
    ) -> tuple[jax.Array, Any]: ...

    def logits(self, hidden: jax.Array, at: jax.Array | None = None) -> jax.Array: ...

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
    ) -> tuple[jax.Array, Any]: ...

    def decode_token(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: Any,
        attention: LayerAttention,
        layer_stack: LayerStack | None = None,
    ) -> tuple[jax.Array, Any]: ...

    def param_logical_axes(self) -> dict[tuple[Any, ...], tuple[str | None, ...]]: ...


def check_mode(mode: str, attention: Attention, cache: Any, remat: bool = False) -> None:
    """Raises ValueError unless `mode` is one of 'stateless', 'prefill' or 'decode' and fits:
    stateless without a cache, the cached modes with a cache and a `CachedAttention`, and
    `remat` only stateless."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "stateless":
        if cache is not None:
            raise ValueError(
                "a cache was given in stateless mode: pass mode='prefill' or mode='decode' "
                "to use it, or no cache"
            )
        return
    if cache is None:
        raise ValueError(f"mode {mode!r} needs a cache (from attention.init_cache)")
    if not isinstance(attention, CachedAttention):
        name = type(attention).__name__
        raise ValueError(f"{name} keeps no cache: it runs in stateless mode only")
    if remat:
        raise ValueError("remat is for training (stateless mode); decoding keeps no activations")


def check_tokens(
    op: str, tokens: Any, positions: Any, lengths: Any = None, *, one_per_row: bool = False
) -> None:
    """Raises `ArrayError` naming the argument unless tokens and positions are int [B, T] of
    one shape (int [B] with `one_per_row`: `decode_token`) and lengths, when given, int [B].
    Shapes and dtypes only: under `jit` it costs nothing per call."""
    doc, any_shape = ("[B]", (None,)) if one_per_row else ("[B, T]", (None, None))
    check_int_array(f"{op}: tokens", tokens, any_shape, doc)
    check_int_array(f"{op}: positions", positions, tuple(tokens.shape), f"{doc} (tokens' shape)")
    if lengths is not None:
        check_int_array(f"{op}: lengths", lengths, tuple(tokens.shape[:1]), "[B]")


def check_model_window(
    cfg: ModelConfig, layer: int, attention: Attention, cache: Any, length: int
) -> None:
    """Raises ValueError when layer `layer` has the model's own sliding window, `attention`
    does not apply it, and the context (`length` tokens of a stateless call, or the cache's
    capacity) is longer than the window: the output would silently differ from the model's."""
    w = cfg.model_window(layer)
    if w is None or attention.applies_model_window:
        return
    context = length if cache is None else getattr(cache, "max_len", None)
    if context is not None and context <= w:
        return
    raise ValueError(
        f"layer {layer} of this {cfg.family} model attends within its own sliding window of "
        f"{w} tokens, which {type(attention).__name__} does not apply; build the attention "
        f"with moa_jax.methods.build_attention, which applies the window in every method"
    )


def stack_layers(model: CausalLM) -> LayerStack:
    """(one decoder layer's graphdef, every layer's state stacked on a leading [L] axis), for
    `hidden_states(layer_stack=)`. Under `jit`, make it once outside a decode loop (it copies
    the weights)."""
    splits = [nnx.split(layer) for layer in model.layers]
    return splits[0][0], jax.tree.map(
        lambda *leaves: jax.numpy.stack(leaves), *[st for _, st in splits]
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "attention", "mode"))
def forward(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens: jax.Array,
    positions: jax.Array,
    cache: Sequence[Any] | None = None,
    *,
    attention: Attention = DenseAttention(),
    logits_at: jax.Array | None = None,
    lengths: jax.Array | None = None,
    mode: str = "stateless",
):
    """Pure jitted forward over a split model: see `CausalLM.__call__`."""
    model = nnx.merge(graphdef, state)
    return model(tokens, positions, cache, attention, logits_at, lengths, mode=mode)
