"""Measured (not estimated) answer loss of plans, to pick the best Pareto candidate.

MoA keeps the non-dominated plans of its multi-objective search and picks the one with the lowest
loss on held-out items at a length longer than any it profiled. Here the loss is the same
answer-only cross-entropy as in calibration, on held-out documents, at `length`.

Backends:
- 'masked' (CPU default): query-chunked attention under `window_sink_mask`, the decoder layers
  as one scan whose layers each get their windows and sinks as arrays (`WindowArgAttention`),
  so every plan of one length shares one compiled program.
- 'moa': the `moa` method (`moa_jax.methods`: `MoAAttention`, the Pallas block-sparse kernel
  that serves the plan); one compilation per plan. The default on GPU and TPU.

Public API:
  WindowArgAttention(q_chunk, windows, sinks)  one layer's window + sink attention (arrays)
  plan_losses(model, batches, plan, length, backend='auto') -> float [items]
  measure_plans(model, batches, plans: {name: Plan}, length, ...) -> {name: float [items]}
  pick_best(losses: {name: per-item}) -> name
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from moa_jax.methods import AttentionConfig, MoAOptions, build_attention
from moa_jax.models.attention import Attention
from moa_jax.models.causal_lm import CausalLM, stack_layers
from moa_jax.models.masked_attention import chunked_attention
from moa_jax.plan import Plan
from moa_jax.search.answer_loss import Batch, answer_losses, answer_nll, row_positions


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=("windows", "sinks"), meta_fields=("q_chunk",)
)
@dataclasses.dataclass(frozen=True)
class WindowArgAttention(Attention):
    """One layer's window + sink attention, its windows and sinks int [H] given as arrays (a
    pytree: the layers run as one scan over their stacked backends, and a new plan's arrays
    need no new compilation)."""

    q_chunk: int = 512
    windows: jax.Array | None = None
    sinks: jax.Array | None = None
    layer_uniform = True  # the layer's windows are its own fields; `layer` is not read

    def __call__(self, q, k, v, *, layer, positions, lengths=None):
        return chunked_attention(
            q, k, v, positions, windows=self.windows, sinks=self.sinks, q_chunk=self.q_chunk
        )


@functools.partial(jax.jit, static_argnames=("graphdef", "layer_graphdef", "q_chunk"))
def _window_losses(
    graphdef,
    state,
    layer_graphdef,
    layer_state,
    windows,
    sinks,
    tokens,
    tgt_pos,
    tgt_ids,
    tgt_w,
    *,
    q_chunk,
):
    """Per-item answer loss [B] with layer i's heads attending under windows[i], sinks[i]
    (int [L, H] each); the layers run as one scan over `stack_layers(model)`, made once by the
    caller (stacking copies the weights)."""
    model = nnx.merge(graphdef, state)
    attention = tuple(WindowArgAttention(q_chunk, w, s) for w, s in zip(windows, sinks))
    hidden, _ = model.hidden_states(
        tokens,
        row_positions(*tokens.shape),
        attention=attention,
        mode="stateless",
        layer_stack=(layer_graphdef, layer_state),
    )
    return answer_nll(model, hidden, tgt_pos, tgt_ids, tgt_w)


def _resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "moa" if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else "masked"
    if backend not in ("moa", "masked"):
        raise ValueError(f"validation backend must be 'auto', 'moa' or 'masked', got {backend!r}")
    return backend


def plan_losses(
    model: CausalLM,
    batches: Sequence[Batch],
    plan: Plan,
    length: int,
    *,
    backend: str = "auto",
    q_chunk: int = 512,
) -> np.ndarray:
    """Per-item answer loss with `plan` resolved at `length` (dense: `Plan.dense`)."""
    plan.validate(model.config)
    if _resolve_backend(backend) == "moa":
        # the `moa` method of every command, its kernels even where the plan keeps every token
        ac = AttentionConfig(
            config=model.config,
            plan=plan,
            impl="native",
            options={"moa": MoAOptions(dense_when_full=False)},
        )
        return answer_losses(model, batches, build_attention("moa", ac, length))
    # (graphdef, state, layer_graphdef, layer_state) of `_window_losses`
    split = (*nnx.split(model), *stack_layers(model))
    windows = jnp.asarray(plan.resolve(length), jnp.int32)
    sinks = jnp.asarray(plan.sink_array(), jnp.int32)
    out = [
        np.asarray(_window_losses(*split, windows, sinks, *b.arrays(), q_chunk=int(q_chunk)))
        for b in batches
    ]
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def measure_plans(
    model: CausalLM,
    batches: Sequence[Batch],
    plans: Mapping[str, Plan],
    length: int,
    *,
    backend: str = "auto",
    q_chunk: int = 512,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """{name: per-item answer loss} for every plan, on the same held-out batches."""
    out = {}
    for name, plan in tqdm(
        plans.items(), desc=f"validate N={length}", unit="plan", disable=not progress
    ):
        out[name] = plan_losses(model, batches, plan, length, backend=backend, q_chunk=q_chunk)
    return out


def pick_best(losses: Mapping[str, np.ndarray], candidates: Sequence[str] | None = None) -> str:
    """The candidate with the lowest mean loss (ties: the first)."""
    names = list(candidates if candidates is not None else losses)
    if not names:
        raise ValueError("no candidates to pick from")
    return min(names, key=lambda n: (float(np.mean(losses[n])), names.index(n)))
