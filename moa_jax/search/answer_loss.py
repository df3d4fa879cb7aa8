"""The search's loss: the mean cross-entropy of an item's answer tokens, on padded batches.

An item (`.tokens`, `.answer_start`) is a prompt followed by its answer; each answer token is
predicted from the position before it. Calibration items, the influence profile
(`moa_jax.search.sensitivity`) and the validation of plans (`moa_jax.search.validate`) all
score this loss; the LM head runs at the answer positions only.

Public API:
  Batch                                        tokens and answer targets of B padded items
  make_batches(items, length, batch_size, pad_id) -> list[Batch]
  row_positions(b, t) -> int [B, T]            positions [0, T) of every row
  answer_nll(model, hidden, tgt_pos, tgt_ids, tgt_w) -> float [B]
  answer_losses(model, batches, attention) -> float [items]   (any backend, whole model)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from moa_jax.models.attention import Attention
from moa_jax.models.causal_lm import CausalLM


@dataclasses.dataclass
class Batch:
    """B items padded to one length. tokens [B, N]; the loss predicts tgt_ids [B, A] at
    positions tgt_pos [B, A] with weights tgt_w [B, A] (0 = padding)."""

    tokens: np.ndarray
    tgt_pos: np.ndarray
    tgt_ids: np.ndarray
    tgt_w: np.ndarray
    rows: int | None = None  # real items (the first rows); the rest fill the batch

    def __post_init__(self):
        if self.rows is None:
            self.rows = self.tokens.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.tokens.shape

    def arrays(self) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """(tokens, tgt_pos, tgt_ids, tgt_w) as device arrays."""
        return tuple(jnp.asarray(x) for x in (self.tokens, self.tgt_pos, self.tgt_ids, self.tgt_w))


def make_batches(
    items: Sequence[Any],
    length: int,
    batch_size: int,
    pad_id: int,
    answer_bucket: int = 128,
    fill: bool = False,
) -> list[Batch]:
    """Pads items (with `.tokens` and `.answer_start`) to `length` and groups them.

    The answer tokens are tokens[answer_start:]; each is predicted from the position before it.
    Answer arrays are padded to a multiple of `answer_bucket` (fewer recompilations). `fill`:
    a short last batch gets rows of padding with zero answer weight (zero loss and gradient),
    so every batch has one shape and one compiled program; `Batch.rows` counts the real ones.
    """
    batches = []
    for s in range(0, len(items), batch_size):
        group = items[s : s + batch_size]
        a = max(len(it.tokens) - it.answer_start for it in group)
        a = -(-a // answer_bucket) * answer_bucket
        b = batch_size if fill else len(group)
        tokens = np.full((b, length), pad_id, np.int32)
        tgt_pos = np.zeros((b, a), np.int32)
        tgt_ids = np.zeros((b, a), np.int32)
        tgt_w = np.zeros((b, a), np.float32)
        for r, it in enumerate(group):
            toks = np.asarray(it.tokens, np.int32)
            if len(toks) > length:
                raise ValueError(f"item of {len(toks)} tokens does not fit length {length}")
            if not 1 <= it.answer_start < len(toks):
                raise ValueError("an item needs a prompt and at least one answer token")
            tokens[r, : len(toks)] = toks
            n = len(toks) - it.answer_start
            tgt_pos[r, :n] = np.arange(it.answer_start - 1, len(toks) - 1)
            tgt_ids[r, :n] = toks[it.answer_start :]
            tgt_w[r, :n] = 1.0
        batches.append(Batch(tokens, tgt_pos, tgt_ids, tgt_w, len(group)))
    return batches


def row_positions(b: int, t: int) -> jax.Array:
    """int32 [B, T]: positions [0, T) in every row (whole sequences, no cache)."""
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def answer_nll(
    model: CausalLM, hidden: jax.Array, tgt_pos: jax.Array, tgt_ids: jax.Array, tgt_w: jax.Array
) -> jax.Array:
    """Per-item mean cross-entropy [B] of tgt_ids [B, A] predicted at tgt_pos [B, A] (weights
    tgt_w [B, A]), from the last layer's output hidden [B, N, E] (`CausalLM.hidden_states`)."""
    logits = model.logits(hidden, at=tgt_pos)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, tgt_ids[:, :, None], axis=-1)[..., 0]
    nll = (lse - picked) * tgt_w
    return nll.sum(-1) / jnp.maximum(tgt_w.sum(-1), 1.0)


@functools.partial(jax.jit, static_argnames=("graphdef", "attention"))
def _answer_losses(graphdef, state, tokens, tgt_pos, tgt_ids, tgt_w, *, attention):
    model = nnx.merge(graphdef, state)
    hidden, _ = model.hidden_states(
        tokens, row_positions(*tokens.shape), attention=attention, mode="stateless"
    )
    return answer_nll(model, hidden, tgt_pos, tgt_ids, tgt_w)


def answer_losses(
    model: CausalLM,
    batches: Sequence[Batch],
    attention: Attention,
    progress: bool = False,
    desc: str = "answer loss",
) -> np.ndarray:
    """Per-item mean answer cross-entropy under any attention backend (whole model in one
    compiled program; the backend sees the real layer indices)."""
    graphdef, state = nnx.split(model)
    out = [
        np.asarray(_answer_losses(graphdef, state, *batch.arrays(), attention=attention))
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False)
    ]
    return np.concatenate(out) if out else np.zeros((0,), np.float32)
