"""Recycled Attention for continued pretraining: the training-time (stateless) form.

Recycled Attention (Xu, Goyal, Choi, arXiv 2411.05787) decodes with two kinds of steps: *full*
steps attend to every earlier token and their attention probabilities pick, per layer and KV head,
the top-K tokens that the following *partial* (recycled) steps attend to. The paper continues
pretraining so that the model gets used to this: sequences of L + S tokens, positions 1..L
ordinary causal attention, and each of the last S positions attends to the top-K prefix tokens
selected from token L's attention probabilities plus the tail tokens up to itself; loss on every
position. `RecycledTrainAttention.paper(L, S, K)` is exactly that (METHODS.md, "Continued
pretraining").

The schedule is a static tuple of blocks of query rows, `(("full", L), ("recycled", S), ...)`:

- a *full* row attends causally to every key up to itself;
- a *recycled* row attends to the top-K keys selected from the probabilities of the last row of
  the preceding full block (over that row's keys, i.e. every token up to it), plus the rows of its
  own recycled block up to itself (the tokens generated since the last refresh).

`paper(L, S, K)` is one full block and one recycled block; `strided(L, n, stride, K)` is the
decoder's fixed schedule over n tokens after a prefill of L (decode step t = 1..n is full when
t % stride == 0), which generalises the recipe block-wise (a full-attention query block selects
the keys that the following query block reuses). `stride=1` is dense attention and
`K >= L + n` is dense too; both limits are tested.

Selection (METHODS.md, Recycled Attention decoding): the selecting row's softmax probabilities in
float32 over its keys, the max over the query heads of each KV group, a 1-D max-pool over tokens
with kernel 7, stride 1 and same size (padding -inf), then top-K. There are no forced sinks.
Choices the paper leaves open, made here:

- ties (the max-pool makes plateaus) go to the earlier token (`lax.top_k` keeps the lower index
  first; the oracle sorts stably);
- the selection carries no gradient (stop-gradient on the scores; the top-K indices are integers
  anyway), but the selected keys' and values' gradients flow back to the tokens they came from;
- by default a recycled row sees all K selected tokens plus its tail (the training recipe);
  `decode_eviction=True` instead mirrors the decoder's cache exactly, where each partial step's
  new token evicts the lowest-scored selected token still present once the K slots are full:
  row j (from 0) of a recycled block sees the selected tokens of rank < K - j. Needs recycled
  blocks of at most K rows.
- the rows of a sequence are taken to be one contiguous sequence at positions [0, T) (the
  `chunk` and `concat` packings of `moa_jax.train.data`; `segments` packing is rejected by the
  training config).

Implementation: the first full block runs a causal flash kernel (`impl`: cuDNN on GPU in bf16/fp16,
else the jnp reference); each recycled block gathers its K selected keys/values per KV head
(`take_along_axis`, static K) and attends over [K selected | own block] with the jnp reference
(S x (K + S) entries, small); later full blocks (size 1 in the decode schedule) attend over their
causal prefix with the jnp reference. Everything is static-shaped and differentiable.

`recycled_attention_reference` is the oracle: it builds the explicit [B, H, T, T] mask with an
independent implementation of the selection and calls `mha_reference`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moa_jax.models.attention import Attention
from moa_jax.models.dense_attention import ATTENTION_IMPLS, causal_attention
from moa_jax.models.recycled_attention import select_top_k
from moa_jax.pallas_kernels.reference import causal_mask, mha_reference

_KINDS = ("full", "recycled")


def _normalise_blocks(blocks: Sequence[Sequence[Any]]) -> tuple[tuple[str, int], ...]:
    out: list[tuple[str, int]] = []
    for item in blocks:
        if len(item) != 2:
            raise ValueError(f"a schedule block is (kind, length), got {item!r}")
        kind, n = str(item[0]), int(item[1])
        if kind not in _KINDS:
            raise ValueError(f"block kind must be one of {_KINDS}, got {kind!r}")
        if n < 0:
            raise ValueError(f"block length must be >= 0, got {n}")
        if n == 0:
            continue
        if out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + n)
        else:
            out.append((kind, n))
    if not out:
        raise ValueError("the schedule has no rows")
    if out[0][0] != "full":
        raise ValueError("the schedule must start with a full block (the prefix that selects)")
    return tuple(out)


def selection_scores(q_row: jax.Array, k: jax.Array, scale: float | None = None) -> jax.Array:
    """Recycled selection scores of one query row over its keys (all valid), before pooling
    (`select_top_k` pools them, as at decode time).

    Args:
      q_row: [B, H, D], the selecting query.
      k: [B, N, Hkv, D], the keys it sees (its own position included).
    Returns:
      float32 [B, Hkv, N]: softmax probabilities, max over each KV group's query heads. No
      gradient flows through them.
    """
    b, h, d = q_row.shape
    hkv = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    qg = q_row.reshape(b, hkv, h // hkv, d).astype(jnp.float32)
    logits = jnp.einsum("bkgd,bnkd->bkgn", qg, k.astype(jnp.float32)) * scale
    probs = jax.nn.softmax(logits, axis=-1).max(axis=2)
    return jax.lax.stop_gradient(probs)


@dataclasses.dataclass(frozen=True)
class RecycledTrainAttention(Attention):
    """Recycled Attention for training and teacher-forced scoring (no cache); see the module
    docstring.

    Args:
      blocks: the static schedule, ((kind, rows), ...) with kind 'full' or 'recycled', starting
        with a full block; the rows add up to the sequence length the backend accepts.
      top_k: K, tokens selected per layer and KV head (clipped to the keys available).
      pool_kernel: max-pool kernel over tokens (odd; 7 in the paper; 1 disables pooling).
      decode_eviction: recycled row j of a block sees only the selected tokens of rank < K - j,
        as the decoder's cache does (default False: all K, the paper's training recipe).
      impl: kernel of the first full block (see `causal_attention`).
    """

    blocks: tuple[tuple[str, int], ...]
    top_k: int
    pool_kernel: int = 7
    decode_eviction: bool = False
    impl: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "blocks", _normalise_blocks(self.blocks))
        if int(self.top_k) < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        object.__setattr__(self, "top_k", int(self.top_k))
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise ValueError(f"pool_kernel must be odd and >= 1, got {self.pool_kernel}")
        if self.impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {self.impl!r}")
        if self.decode_eviction:
            longest = max((n for kind, n in self.blocks if kind == "recycled"), default=0)
            if longest > self.top_k:
                raise ValueError(
                    f"decode_eviction needs recycled blocks of at most top_k="
                    f"{self.top_k} rows (the decoder needs S <= K), got {longest}"
                )

    @classmethod
    def paper(cls, prefix_len: int, tail_len: int, top_k: int, **kwargs) -> RecycledTrainAttention:
        """The continued-pretraining recipe: L full rows, then S recycled rows."""
        if prefix_len < 1:
            raise ValueError(f"prefix_len must be >= 1, got {prefix_len}")
        return cls((("full", prefix_len), ("recycled", tail_len)), top_k, **kwargs)

    @classmethod
    def strided(
        cls, prefix_len: int, tail_len: int, stride: int, top_k: int, **kwargs
    ) -> RecycledTrainAttention:
        """The decoder's fixed schedule teacher-forced: after L prefill rows, tail row t
        (t = 1..tail_len) is full when t % stride == 0, recycled otherwise."""
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        if prefix_len < 1:
            raise ValueError(f"prefix_len must be >= 1, got {prefix_len}")
        blocks = [("full", prefix_len)] + [
            ("full" if t % stride == 0 else "recycled", 1) for t in range(1, tail_len + 1)
        ]
        return cls(tuple(blocks), top_k, **kwargs)

    @property
    def seq_len(self) -> int:
        return sum(n for _, n in self.blocks)

    @property
    def prefix_len(self) -> int:
        return self.blocks[0][1]

    def attention_entries(self, seq_len: int | None = None) -> int:
        """(query, key) pairs per head of one sequence (for FLOP counts)."""
        total, start = 0, 0
        for kind, n in self.blocks:
            if kind == "full":
                total += n * start + n * (n + 1) // 2
            else:
                k = min(self.top_k, start)
                if self.decode_eviction:
                    total += sum(max(min(k, self.top_k - j), 0) for j in range(n))
                else:
                    total += n * k
                total += n * (n + 1) // 2
            start += n
        return total

    def __call__(self, q, k, v, *, layer, positions, lengths=None):
        t = q.shape[1]
        if t != self.seq_len:
            raise ValueError(
                f"RecycledTrainAttention's schedule {self.blocks} covers "
                f"{self.seq_len} tokens but the sequence has {t}"
            )
        outs, start = [], 0
        for kind, n in self.blocks:
            end = start + n
            if kind == "full" and start == 0:
                outs.append(causal_attention(q[:, :end], k[:, :end], v[:, :end], self.impl))
            elif kind == "full":
                qpos = jnp.arange(start, end, dtype=jnp.int32)[None]
                mask = causal_mask(qpos, jnp.arange(end, dtype=jnp.int32))
                outs.append(mha_reference(q[:, start:end], k[:, :end], v[:, :end], mask))
            else:
                outs.append(self._recycled_block(q, k, v, start, end))
            start = end
        return jnp.concatenate(outs, axis=1)

    def _recycled_block(self, q, k, v, start: int, end: int) -> jax.Array:
        n, r = end - start, start - 1  # rows of the block; the selecting row
        kk = min(self.top_k, start)  # keys 0..r are available
        scores = selection_scores(q[:, r], k[:, :start])
        # The decoder's selection: [B, Hkv, kk] lowest score first; reversed, best first (ties
        # to the lower index).
        idx = select_top_k(scores, True, kk, self.pool_kernel)[..., ::-1]
        gather = idx.transpose(0, 2, 1)[..., None]  # [B, kk, Hkv, 1]
        k_sel = jnp.take_along_axis(k[:, :start], gather, axis=1)  # [B, kk, Hkv, D]
        v_sel = jnp.take_along_axis(v[:, :start], gather, axis=1)
        keys = jnp.concatenate([k_sel, k[:, start:end]], axis=1)
        vals = jnp.concatenate([v_sel, v[:, start:end]], axis=1)
        row = jnp.arange(n)[:, None]
        col = jnp.arange(kk + n)[None, :]
        # Eviction: the decoder's cache of K slots drops its lowest-ranked entry per new token.
        sel_ok = (col < kk) & ((col < self.top_k - row) if self.decode_eviction else True)
        tail_ok = (col >= kk) & (col - kk <= row)
        mask = sel_ok | tail_ok
        return mha_reference(q[:, start:end], keys, vals, mask[None, None])


# ------------------------------------------------------------------------------------------
# Oracle: explicit mask, independent selection code.
# ------------------------------------------------------------------------------------------


def recycled_mask_reference(
    q: jax.Array,
    k: jax.Array,
    blocks: Sequence[Sequence[Any]],
    top_k: int,
    pool_kernel: int = 7,
    decode_eviction: bool = False,
) -> jax.Array:
    """The explicit mask [B, Hkv, T, T] (True = query row may attend key column) of a recycled
    schedule, computed from q [B, T, H, D] and k [B, T, Hkv, D] without gathers: probabilities
    by an explicit masked softmax over all T columns, pooling by stacking shifted copies, ranks
    by a stable argsort (ties to the lower index), selection and eviction by rank."""
    blocks = _normalise_blocks(blocks)
    q = jax.lax.stop_gradient(q).astype(jnp.float32)
    k = jax.lax.stop_gradient(k).astype(jnp.float32)
    b, t, h, d = q.shape
    hkv = k.shape[2]
    g = h // hkv
    cols = jnp.arange(t)
    rows = []
    start = 0
    for kind, n in blocks:
        end = start + n
        if kind == "full":
            rows.append(
                jnp.broadcast_to(
                    cols[None, None, None, :] <= jnp.arange(start, end)[None, None, :, None],
                    (b, hkv, n, t),
                )
            )
        else:
            r = start - 1
            logits = jnp.einsum("bhd,bthd->bht", q[:, r], jnp.repeat(k, g, axis=2)) / np.sqrt(d)
            valid = cols <= r
            logits = jnp.where(valid, logits, -jnp.inf)
            e = jnp.where(valid, jnp.exp(logits - logits.max(-1, keepdims=True)), 0.0)
            p = (e / e.sum(-1, keepdims=True)).reshape(b, hkv, g, t).max(axis=2)
            p = jnp.where(valid, p, -jnp.inf)
            half = pool_kernel // 2
            padded = jnp.pad(p, ((0, 0), (0, 0), (half, half)), constant_values=-jnp.inf)
            pooled = jnp.stack([padded[..., i : i + t] for i in range(pool_kernel)]).max(axis=0)
            pooled = jnp.where(valid, pooled, -jnp.inf)
            order = jnp.argsort(-pooled, axis=-1, stable=True)
            rank = jnp.argsort(order, axis=-1, stable=True)  # [B, Hkv, T]
            kk = min(top_k, start)
            j = jnp.arange(n)[:, None]
            limit = (top_k - j) if decode_eviction else jnp.full_like(j, kk)
            selected = valid & (rank[:, :, None, :] < limit[None, None])  # [B, Hkv, n, T]
            qrow = jnp.arange(start, end)[:, None]
            tail = (cols[None, :] >= start) & (cols[None, :] <= qrow)
            rows.append(selected | tail[None, None])
        start = end
    return jnp.concatenate(rows, axis=2)


def recycled_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    blocks: Sequence[Sequence[Any]],
    top_k: int,
    pool_kernel: int = 7,
    decode_eviction: bool = False,
) -> jax.Array:
    """Oracle output: `mha_reference` under `recycled_mask_reference` (each KV head's mask
    shared by its query heads)."""
    mask = recycled_mask_reference(q, k, blocks, top_k, pool_kernel, decode_eviction)
    mask = jnp.repeat(mask, q.shape[2] // k.shape[2], axis=1)
    return mha_reference(q, k, v, mask)


@dataclasses.dataclass(frozen=True)
class RecycledOracleAttention(Attention):
    """`recycled_attention_reference` as a backend (for model-level tests of
    `RecycledTrainAttention`; O(T^2) memory)."""

    blocks: tuple[tuple[str, int], ...]
    top_k: int
    pool_kernel: int = 7
    decode_eviction: bool = False

    def __post_init__(self):
        object.__setattr__(self, "blocks", _normalise_blocks(self.blocks))

    def __call__(self, q, k, v, *, layer, positions, lengths=None):
        return recycled_attention_reference(
            q, k, v, self.blocks, self.top_k, self.pool_kernel, self.decode_eviction
        )
