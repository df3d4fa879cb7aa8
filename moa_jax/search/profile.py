"""Influence profiling: how much each head's answer loss depends on each attention entry.

Method (METHODS.md, MoA). For one head with attention probabilities A [N, N] and G = dL/dA, masking
entry (i, j) and renormalising row i changes the loss, to first order, by

    E_ij = A_ij / (1 - A_ij) * (sum_n G_in A_in - G_ij)   i.e.   E = -A/(1-A) * (G - rowsum(G*A)).

`1 - A` is guarded by `influence.EPS`; a row with a single valid key (row 0) keeps only the direct
term `-A_ij G_ij` (dropping its only key zeroes the row). L is the mean cross-entropy on the answer
tokens of one calibration item.

How it is computed (`moa_jax.search.influence`): every layer's attention is a dense causal
attention with a custom VJP whose backward pass, besides dq/dk/dv, reduces |E| (recomputed per
query chunk from A, G = dO V^T and rowsum(G * A) = dO . O) to

- `blocks` [H, N/64, N/64]: |E| summed over 64 x 64 blocks (the reference's profile),
- `diag` [H, N]: |E| summed along each diagonal offset d = i - j over the non-sink keys
  (j >= sink): the exact token-level loss of a sliding window w is `sum_{d >= w} diag[d]`,
- `answer` [H, N] (on request): `diag` over the answer rows only.

They come out as the gradients of zero "probes" handed to each layer, so one jitted forward +
backward of the whole model (`profile_batch`) yields every layer's and head's influence for a
batch of items; the LM head runs at the answer positions only.

The 'answer' estimators need the answer rows alone (`token=False`): then every layer's
attention is the fastest exact kernel at hand (the Pallas kernel with a dense plan on GPU and
TPU, the chunked jnp attention on CPU), differentiated by its own backward pass, and
`influence.answer_tap` recomputes only the A ~ 128 answer rows' probabilities to reduce their
|E| (and their copy attention, `copy`): O(A x N) influence work per head instead of the
every-row pass's O(N^2) float32 reductions. Every sum is summed over items (`InfluenceProfile`
keeps sums and a count; `.mean_*` averages).

Rule loss estimate (choice made here, see `InfluenceProfile.rule_losses`): 'token' is the sum
of mean |E| over exactly the entries the kernels drop for that rule at length N (the window from
`Plan.resolve`, sinks kept); 'answer' is the same sum over the rows that
predict the answer tokens only: the document rows' far entries reach the loss only through later
layers and their many small |E| drown the few rows where a head retrieves for the answer (on
SmolLM2, 50 items per length, it ranks the measured retrieval heads at Spearman 0.50-0.53
against 0.37-0.42 for 'token', and its plan keeps 0.82 / 0.74 / 0.70 of the needles at 2k / 4k /
8k against 0.70 / 0.62 / 0.62: docs/results.md). 'answer-max' scores a window by the largest
single answer-row |E| it drops, averaged over items: a retrieval head's loss is not linear in
the entries it loses (missing the one fact costs the answer). On a CPU diagnostic (6 items at
2k, window N/2) its top 40 held 17 of the 20 measured retrieval heads against 15 for 'answer'
(Spearman 0.52 and 0.55); on the GPU its plan keeps the needles (0.98 / 0.92 / 0.70) and
LongEval but costs +7% perplexity at 2k. 'copy' is not a gradient: the attention the answer
rows put on earlier places of the token each predicts (a row's share split over those places),
summed over the places a window drops. A head that fetches the answer attends there whether or
not the model is sure of it, where the gradient of a sure answer fades; alone it ignores every
other head's loss (needle 0.98 / 0.94 / 0.48). 'answer-copy' (the CLI's default) adds the two,
'copy' scaled to 'answer''s total over all heads at the window N/2: needle 0.98 / 0.98 / 0.70
(dense 0.98 / 0.96 / 0.70), LongEval within 0.06 / 0.04 of dense, perplexity +2.3% / +0.7% /
+0.5% at 2k / 4k / 8k (docs/results.md, one H200, 2026-12-03). 'block' is the
reference's estimator, the sum over whole 64 x 64 blocks a block-aligned window drops (query
block m keeps the sink blocks and the last ceil(w/64) blocks up to the diagonal); with 64-token
granularity and 64 sinks it differs from 'token' only in the partial diagonal block. 'window'
(given the candidate windows when profiling) is the signed first-order loss change of dropping
the whole window in every row at once, rows renormalised; its plans scored below the uniform
window (docs/results.md).

Memory: per layer O(B x H x q_chunk x N) for the attention and its influence (no N x N
matrix), plus the model's activations for the backward pass (`remat=True` recomputes them per
layer). Items of one length are batched; the batch can be sharded over a mesh (`mesh=`).

Public API:
  InfluenceAttention(sink, block, q_chunk, windows)  backend whose probes' gradients are the
                                                      influence
  profile_batch(model, batch, ...) -> BatchSums (losses [B], blocks [L, H, nb, nb],
                                       diag [L, H, N], rules [L, H, R], answer [L, H, N or 0],
                                       answer_max and copy [L, H, N] or None)
  answer_rows(tgt_pos, tgt_w, length) -> [B, N] 0/1 rows that predict an answer token
  profile_items(model, items, length, ...) -> InfluenceProfile
  layer_influence(q, k, v, dout, sink, block, q_chunk) -> (blocks, diag)   (one layer)
  influence_dense(q, k, v, dout) -> E [B, H, N, N]          (unchunked, for tests)
  answer_grads(model, batch) -> (losses [B], dO per layer, (q, k, v) per layer)  (tests)
  ProfilingAttention(q_chunk)                    dense attention exposing dL/dO (tests)
  LayerRunner(model, mesh=None): .forward / .losses (one layer per compiled call)
  answer_losses(model, batches, attention) -> per-item answer loss (whole-model program)
  InfluenceProfile (sums, count, save/load, merge, rule_losses)
  make_batches(items, length, batch_size, pad_id) -> list[Batch]
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from moa_jax.models.attention import AttentionBackend
from moa_jax.models.llama import Llama, rope_inv_freq, scan_layers, stack_layers
from moa_jax.models.masked_attention import chunked_attention
from moa_jax.search.estimators import ESTIMATORS
from moa_jax.search.influence import answer_tap, attention_with_influence, influence_rows

BLOCK = 64


@dataclasses.dataclass(frozen=True)
class ProfilingAttention(AttentionBackend):
    """Dense causal attention for influence profiling (no KV cache).

    The per-layer `cache` argument carries a perturbation [B, T, H, D] (zeros) that is added to
    the attention output, so the gradient of the loss with respect to it is dL/dO of that layer;
    the returned "cache" is the layer's (q, k, v), used to recompute A afterwards.
    """

    q_chunk: int = 512
    layer_uniform = True

    def init_cache(self, cfg, batch, max_len, dtype=jnp.float32):
        raise NotImplementedError("ProfilingAttention is for single forward/backward passes")

    def __call__(self, q, k, v, *, layer, positions, cache, lengths=None, **_):
        out = chunked_attention(q, k, v, positions, q_chunk=self.q_chunk, checkpoint=True)
        if cache is not None:
            out = (out.astype(jnp.float32) + cache).astype(q.dtype)
        return out, (q, k, v)


# ----------------------------------------------------------------------------- model pieces
def trunk(
    model: Llama,
    tokens: jax.Array,
    positions: jax.Array,
    attention: AttentionBackend,
    layer_args: Any = None,
    *,
    remat: bool = False,
    scan: bool = False,
):
    """Final normed hidden states [B, T, E] and each layer's backend output ("cache").

    Mirrors `Llama.__call__` without the LM head, so the loss can take logits at the answer
    positions only (an 8k x 49k logit matrix per row is otherwise the largest tensor of the pass).
    `layer_args[i]` is handed to layer i's backend as its cache. `remat` recomputes each layer's
    activations in a backward pass (`jax.checkpoint` of the layer as a pure function of its
    state) instead of keeping them.

    `scan`: run the layers as one `lax.scan` over their stacked states, so the compiled program
    holds one layer instead of L (XLA's GPU compiler took 195 s for SmolLM2's 30 unrolled layers
    of the profiling pass, CPU 20 s): `moa_jax.models.llama.scan_layers`, for backends with
    `layer_uniform`; `layer_args` is then a pytree whose leaves are stacked over layers
    [L, ...], and the backends' outputs come back stacked the same way.
    """
    inv_freq = rope_inv_freq(model.config)
    x = model.embed_tokens(tokens)
    if scan:
        x, aux = scan_layers(
            stack_layers(model), x, positions, inv_freq, attention, layer_args, remat=remat
        )
        return model.norm(x), aux
    aux = []
    for i, layer in enumerate(model.layers):
        arg = None if layer_args is None else layer_args[i]

        if remat:  # a pure function of the layer's state (the model may be a tracer's)
            gd, st = nnx.split(layer)

            def run(st, x, arg, gd=gd, i=i):
                return nnx.merge(gd, st)(x, positions, inv_freq, arg, attention, i)

            x, a = jax.checkpoint(run)(st, x, arg)
        else:
            x, a = layer(x, positions, inv_freq, arg, attention, i)
        aux.append(a)
    return model.norm(x), aux


def lm_logits(model: Llama, hidden: jax.Array) -> jax.Array:
    """float32 logits of hidden states (tied or untied head), as in `Llama.__call__`."""
    if model.config.tie_word_embeddings:
        out = model.embed_tokens.attend(hidden)
    else:
        out = model.lm_head(hidden)
    return out.astype(jnp.float32)


def answer_nll(
    model: Llama, hidden: jax.Array, tgt_pos: jax.Array, tgt_ids: jax.Array, tgt_w: jax.Array
) -> jax.Array:
    """Per-item mean cross-entropy [B] of tgt_ids predicted at tgt_pos (weights tgt_w)."""
    h = jnp.take_along_axis(hidden, tgt_pos[:, :, None], axis=1)
    logits = lm_logits(model, h)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, tgt_ids[:, :, None], axis=-1)[..., 0]
    nll = (lse - picked) * tgt_w
    return nll.sum(-1) / jnp.maximum(tgt_w.sum(-1), 1.0)


# ----------------------------------------------------------------------------- batches
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


def _positions(b: int, t: int) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


# ----------------------------------------------------------------------------- layer by layer
# One decoder layer per jitted call, with the parameters of layer 0's graph and any layer's
# state: every layer shares one compiled program and peak memory is one layer's. Used to score
# many plans of one length with per-layer window arrays (validation) without recompiling.


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _embed(graphdef, state, tokens):
    return nnx.merge(graphdef, state).embed_tokens(tokens)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "attention"))
def _layer_forward(graphdef, state, x, arg, *, cfg, attention):
    layer = nnx.merge(graphdef, state)
    b, t, _ = x.shape
    y, _ = layer(x, _positions(b, t), rope_inv_freq(cfg), arg, attention, 0)
    return y


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _head_loss(graphdef, state, x, tgt_pos, tgt_ids, tgt_w):
    model = nnx.merge(graphdef, state)
    return answer_nll(model, model.norm(x), tgt_pos, tgt_ids, tgt_w)


class LayerRunner:
    """Runs a `Llama` one decoder layer per compiled call (see comment above).

    Args:
      model: the model.
      mesh: optional mesh; parameters and batches are sharded with `moa_jax.parallel` rules.
    """

    def __init__(self, model: Llama, mesh=None):
        self.cfg = model.config
        self.graphdef, self.state = nnx.split(model)
        self.layer_graphdef = nnx.split(model.layers[0])[0]
        self.layer_states = [nnx.split(layer)[1] for layer in model.layers]
        self.mesh = mesh
        if mesh is not None:
            from moa_jax.parallel import param_shardings

            self.state = jax.device_put(self.state, param_shardings(self.state, mesh))
            self.layer_states = [
                jax.device_put(s, param_shardings(s, mesh)) for s in self.layer_states
            ]

    def _arrays(self, batch: Batch):
        arrays = [jnp.asarray(x) for x in (batch.tokens, batch.tgt_pos, batch.tgt_ids, batch.tgt_w)]
        if self.mesh is not None:
            from moa_jax.parallel import batch_sharding

            arrays = [jax.device_put(x, batch_sharding(self.mesh, x.shape)) for x in arrays]
        return arrays

    def forward(self, tokens, attention: AttentionBackend, layer_args=None, keep=False):
        """Final hidden states before the norm (and every layer's input when `keep`)."""
        x = _embed(self.graphdef, self.state, tokens)
        inputs = []
        for i, st in enumerate(self.layer_states):
            if keep:
                inputs.append(x)
            arg = None if layer_args is None else layer_args[i]
            x = _layer_forward(self.layer_graphdef, st, x, arg, cfg=self.cfg, attention=attention)
        return x, inputs

    def losses(self, batch: Batch, attention: AttentionBackend, layer_args=None) -> np.ndarray:
        """Per-item answer loss [B] under a backend that ignores the layer index (e.g. dense,
        `WindowArgAttention` with per-layer args)."""
        tokens, *tgt = self._arrays(batch)
        x, _ = self.forward(tokens, attention, layer_args)
        return np.asarray(_head_loss(self.graphdef, self.state, x, *tgt))


@functools.partial(jax.jit, static_argnames=("graphdef", "attention"))
def _answer_losses(graphdef, state, tokens, tgt_pos, tgt_ids, tgt_w, *, attention):
    model = nnx.merge(graphdef, state)
    b, t = tokens.shape
    hidden, _ = trunk(model, tokens, _positions(b, t), attention)
    return answer_nll(model, hidden, tgt_pos, tgt_ids, tgt_w)


def answer_losses(
    model: Llama,
    batches: Sequence[Batch],
    attention: AttentionBackend,
    progress: bool = False,
    desc: str = "answer loss",
) -> np.ndarray:
    """Per-item mean answer cross-entropy under any attention backend (whole model in one
    compiled program; the backend sees the real layer indices)."""
    graphdef, state = nnx.split(model)
    out = []
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        out.append(
            np.asarray(
                _answer_losses(
                    graphdef,
                    state,
                    *(
                        jnp.asarray(x)
                        for x in (batch.tokens, batch.tgt_pos, batch.tgt_ids, batch.tgt_w)
                    ),
                    attention=attention,
                )
            )
        )
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


# ----------------------------------------------------------------------------- influence
@dataclasses.dataclass(frozen=True)
class InfluenceAttention(AttentionBackend):
    """Dense causal attention whose per-layer `cache` argument is its zero probes; the probes'
    gradients are the layer's influence sums.

    With `token` (every row's sums): the cache is (blocks [H, N/block, N/block], diag [H, N],
    rules [H, R], answer [H, N] or [H, 0], the answer rows' weights [B, N] or [B, 0]) and the
    attention is `moa_jax.search.influence.attention_with_influence` (chunked jnp, every row's
    |E| reduced in its backward pass).

    Without `token` (the answer rows only, `answer` must be set and `windows` empty): the cache
    is (answer, answer_max, copy [H, N], answer rows int [B, A], their weights [B, A], the
    tokens int [B, N], the tokens the answer rows predict int [B, A]); the
    attention is the fastest exact kernel at hand (`sparse_attention` with a dense plan on GPU
    and TPU, the rematerialised chunked jnp attention elsewhere) and `influence.answer_tap`
    recomputes the answer rows alone in the backward pass.
    """

    sink: int = 64
    block: int = BLOCK
    q_chunk: int = 512
    key_groups: int = 4
    windows: tuple[int, ...] = ()
    answer: bool = False  # also the answer rows' diagonal sums
    token: bool = True  # every row's block and diagonal sums
    kernel: str = "auto"  # answer rows alone: 'pallas', 'jnp' or 'auto' (pallas on GPU/TPU)
    mesh: Any = None
    layer_uniform = True  # every layer's probes have one shape; `layer` is not read

    def __post_init__(self):
        if not self.token and (not self.answer or self.windows):
            raise ValueError(
                "without the token sums the profile computes the answer rows' "
                "sums only: set answer=True and no windows"
            )
        if self.kernel not in ("auto", "pallas", "jnp"):
            raise ValueError(f"kernel must be 'auto', 'pallas' or 'jnp', got {self.kernel!r}")

    def init_cache(self, cfg, batch, max_len, dtype=jnp.float32):
        raise NotImplementedError("InfluenceAttention is for single forward/backward passes")

    def __call__(self, q, k, v, *, layer, positions, cache, lengths=None, **_):
        if self.token:
            out = attention_with_influence(
                q, k, v, *cache, self.sink, self.block, self.q_chunk, self.key_groups, self.windows
            )
            return out, None
        out = self._dense(q, k, v, positions)
        return answer_tap(out, q, k, v, *cache, self.sink), None

    def _dense(self, q, k, v, positions):
        kernel = self.kernel
        if kernel == "auto":
            kernel = "pallas" if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else "jnp"
        if kernel == "pallas":  # (interpret mode off GPU / TPU)
            from moa_jax.pallas_kernels.head_sharding import sparse_attention_on_mesh

            h, n = q.shape[2], k.shape[1]
            # bfloat16 operands: the kernel's float32 (HIGHEST precision) backward took 603 ms
            # against 13 ms for SmolLM2's shapes at 8k, batch 4, on an H200
            # (docs/benchmarks.md); the answer rows' influence is still recomputed in float32
            lo = [x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x for x in (q, k, v)]
            out = sparse_attention_on_mesh(*lo, self.mesh, windows=(n,) * h, sinks=(0,) * h)
            return out.astype(q.dtype)
        return chunked_attention(
            q, k, v, positions, q_chunk=self.q_chunk, checkpoint=True, key_groups=self.key_groups
        )


def _zero_probes(cfg, length: int, block: int, rules: int, answer: bool, token: bool = True):
    """Every layer's probes, stacked over layers (`trunk(..., scan=True)`)."""
    layers, heads = cfg.num_layers, cfg.num_heads
    ans = jnp.zeros((layers, heads, length if answer else 0), jnp.float32)
    if not token:
        return ans, ans, ans
    nb = length // block
    return (
        jnp.zeros((layers, heads, nb, nb), jnp.float32),
        jnp.zeros((layers, heads, length), jnp.float32),
        jnp.zeros((layers, heads, rules), jnp.float32),
        ans,
    )


def answer_rows(tgt_pos: jax.Array, tgt_w: jax.Array, length: int) -> jax.Array:
    """float32 [B, length]: 1 at the rows that predict an answer token (tgt_pos with tgt_w
    > 0), else 0."""
    b = tgt_pos.shape[0]
    rows = jnp.zeros((b, length), jnp.float32)
    return rows.at[jnp.arange(b)[:, None], tgt_pos].max((tgt_w > 0).astype(jnp.float32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BatchSums:
    """One batch's influence sums (`profile_batch`), summed over its items.

    losses float [B]: each item's dense answer loss; blocks float32 [L, H, N/block, N/block]
    and diag float32 [L, H, N]: every row's sums (None without `token`); rules float32
    [L, H, R]: the candidate windows' first-order changes; answer float32 [L, H, N] or
    [L, H, 0]: the answer rows' diagonal sums; answer_max, copy float32 [L, H, N] (the answer
    rows alone, else None): per item the largest answer-row |E| at offsets >= d, and the
    answer rows' attention on keys holding the token they predict, by offset
    (`influence.answer_influence`).
    """

    losses: jax.Array
    blocks: jax.Array | None
    diag: jax.Array | None
    rules: jax.Array
    answer: jax.Array
    answer_max: jax.Array | None = None
    copy: jax.Array | None = None


@functools.partial(jax.jit, static_argnames=("graphdef", "attention", "remat"))
def _profile_step(graphdef, state, tokens, tgt_pos, tgt_ids, tgt_w, *, attention, remat):
    model = nnx.merge(graphdef, state)
    cfg = model.config
    b, t = tokens.shape
    layers = cfg.num_layers
    if attention.token:  # every row's sums; the answer rows as [B, N] weights
        rows = answer_rows(tgt_pos, tgt_w, t) if attention.answer else jnp.zeros((b, 0))
        extra = (jnp.broadcast_to(rows, (layers,) + rows.shape),)
    else:  # the answer rows alone, by position, and the tokens they predict
        extra = tuple(
            jnp.broadcast_to(x, (layers,) + x.shape)
            for x in (tgt_pos, (tgt_w > 0).astype(jnp.float32), tokens, tgt_ids)
        )

    def loss(probes):
        hidden, _ = trunk(
            model, tokens, _positions(b, t), attention, probes + extra, remat=remat, scan=True
        )
        per_item = answer_nll(model, hidden, tgt_pos, tgt_ids, tgt_w)
        return per_item.sum(), per_item

    grads, per_item = jax.grad(loss, has_aux=True)(
        _zero_probes(
            cfg, t, attention.block, len(attention.windows), attention.answer, attention.token
        )
    )
    if not attention.token:
        answer, answer_max, copy = grads
        return BatchSums(
            per_item, None, None, jnp.zeros((layers, cfg.num_heads, 0)), answer, answer_max, copy
        )
    return BatchSums(per_item, *grads)


def _split(model: Llama, mesh=None):
    """(graphdef, state) of the model, the state sharded over `mesh` when given."""
    graphdef, state = nnx.split(model)
    if mesh is not None:
        from moa_jax.parallel import param_shardings

        state = jax.device_put(state, param_shardings(state, mesh))
    return graphdef, state


def profile_batch(
    model: Llama,
    batch: Batch,
    *,
    sink: int = 64,
    block: int = BLOCK,
    q_chunk: int | None = None,
    key_groups: int = 4,
    remat: bool = False,
    windows: Sequence[int] = (),
    answer: bool = False,
    token: bool = True,
    mesh=None,
) -> BatchSums:
    """Every layer's and head's influence on one batch, from one jitted forward + backward.

    L is the sum over items of each item's mean answer cross-entropy, so each item's gradient is
    its own; |E| is summed over the items. `windows`: candidate windows whose first-order loss
    change (with row renormalisation) is returned too (`moa_jax.search.influence`); `answer`:
    also `diag` over the answer rows only; `token=False`: the answer rows' sums alone (needs
    `answer` and no windows), from the fastest exact attention kernel and the answer rows'
    probabilities recomputed (`influence.answer_tap`): O(A x N) influence work per head instead
    of O(N^2).
    Returns the batch's `BatchSums` (losses as numpy).
    """
    return _profile_split(
        *_split(model, mesh),
        model.config,
        batch,
        sink=sink,
        block=block,
        q_chunk=q_chunk,
        key_groups=key_groups,
        remat=remat,
        windows=windows,
        answer=answer,
        token=token,
        mesh=mesh,
    )


def _profile_split(
    graphdef,
    state,
    cfg,
    batch: Batch,
    *,
    sink,
    block,
    q_chunk,
    key_groups,
    remat,
    windows,
    answer,
    token,
    mesh,
):
    """`profile_batch` on a model already split (and sharded) by `_split`."""
    b, n = batch.shape
    if n % block:
        raise ValueError(f"profile length {n} must be a multiple of block {block}")
    qc = int(q_chunk) if q_chunk else auto_q_chunk(b, cfg.num_heads, n, block=block)
    qc = max(block, min(qc, n) // block * block)
    while n % qc:  # the largest block multiple <= q_chunk that divides n
        qc -= block
    arrays = [jnp.asarray(x) for x in (batch.tokens, batch.tgt_pos, batch.tgt_ids, batch.tgt_w)]
    if mesh is not None:
        from moa_jax.parallel import batch_sharding

        arrays = [jax.device_put(x, batch_sharding(mesh, x.shape)) for x in arrays]
    attention = InfluenceAttention(
        sink=sink,
        block=block,
        q_chunk=qc,
        key_groups=key_groups,
        windows=tuple(int(w) for w in windows),
        answer=bool(answer),
        token=bool(token),
        mesh=mesh,
    )
    sums = _profile_step(graphdef, state, *arrays, attention=attention, remat=remat)
    return dataclasses.replace(sums, losses=np.asarray(sums.losses))


def layer_influence(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    dout: jax.Array,
    *,
    sink: int,
    block: int = BLOCK,
    q_chunk: int = 512,
    key_groups: int = 4,
):
    """|E| of one layer reduced to block sums and diagonal sums, summed over the batch (the
    backward rule of `attention_with_influence` applied to a given dL/dO).

    q, dout [B, N, H, D]; k, v [B, N, Hkv, D]. Returns (blocks float32 [H, N/block, N/block],
    diag float32 [H, N]).
    """
    n, h = q.shape[1], q.shape[2]
    nb = n // block
    probes = (jnp.zeros((h, nb, nb), jnp.float32), jnp.zeros((h, n), jnp.float32))

    def f(pb, pd):
        return attention_with_influence(
            q,
            k,
            v,
            pb,
            pd,
            jnp.zeros((h, 0)),
            jnp.zeros((h, 0)),
            jnp.zeros((q.shape[0], 0)),
            sink,
            block,
            min(q_chunk, n),
            key_groups,
        )

    _, vjp = jax.vjp(f, *probes)
    return vjp(dout.astype(q.dtype))


def influence_dense(q: jax.Array, k: jax.Array, v: jax.Array, dout: jax.Array) -> jax.Array:
    """E [B, H, N, N] of one layer (all heads, all rows at once): the unchunked reference."""
    return influence_rows(q, k, v, dout, 0)


def answer_grads(model: Llama, batch: Batch, *, q_chunk: int = 512):
    """Answer losses [B], dL/dO per layer ([B, N, H, D] each) and (q, k, v) per layer, all in
    memory at once (tests and small inputs; `profile_batch` reduces them as it goes)."""
    cfg = model.config
    b, n = batch.shape
    tokens, *tgt = (
        jnp.asarray(x) for x in (batch.tokens, batch.tgt_pos, batch.tgt_ids, batch.tgt_w)
    )
    zeros = [jnp.zeros((b, n, cfg.num_heads, cfg.head_dim), jnp.float32)] * cfg.num_layers

    def f(perturbations):
        hidden, qkv = trunk(
            model, tokens, _positions(b, n), ProfilingAttention(q_chunk), perturbations
        )
        per_item = answer_nll(model, hidden, *tgt)
        return per_item.sum(), (per_item, qkv)

    dout, (losses, qkv) = jax.grad(f, has_aux=True)(zeros)
    return np.asarray(losses), dout, qkv


def auto_q_chunk(
    batch: int, heads: int, length: int, budget: int = 1 << 24, block: int = BLOCK
) -> int:
    """Largest multiple of `block` dividing `length` with batch*heads*q_chunk*length <= budget
    (at least `block`)."""
    best = block
    for q in range(block, length + 1, block):
        if length % q == 0 and batch * heads * q * length <= budget:
            best = q
    return best


# ----------------------------------------------------------------------------- accumulators
def suffix_sums(d: np.ndarray) -> np.ndarray:
    """[..., N] -> [..., N + 1]: out[..., w] = sum of d[..., x] for x >= w (out[..., N] = 0),
    the sum of what a window w drops when d is indexed by diagonal offset."""
    return np.concatenate(
        [np.cumsum(d[..., ::-1], axis=-1)[..., ::-1], np.zeros(d.shape[:-1] + (1,))], axis=-1
    )


@dataclasses.dataclass
class InfluenceProfile:
    """Sums of |E| over the items profiled at one length.

    blocks: float64 [L, H, N/block, N/block]; diag: float64 [L, H, N] (non-sink keys only);
    both None when only the answer rows were profiled (`profile_items(token=False)`);
    windows: int [R] candidate windows and rules: float64 [L, H, R] their summed first-order
    loss changes (the 'window' estimator), both empty when none were given;
    answer: float64 [L, H, N], `diag` over the answer rows only (the 'answer' estimator), or
    None when not profiled;
    answer_max: float64 [L, H, N], summed over items: the item's largest answer-row |E| at any
    offset >= d (the 'answer-max' estimator; profiled with the answer rows alone), or None;
    copy: float64 [L, H, N], summed over items: the answer rows' attention on keys holding the
    token they predict, by offset d, over the non-sink keys (the 'copy' estimators; profiled
    with the answer rows alone), or None;
    count: items summed; loss_sum: sum of the items' dense answer losses.
    """

    length: int
    sink: int
    block: int
    blocks: np.ndarray | None
    diag: np.ndarray | None
    count: int = 0
    loss_sum: float = 0.0
    windows: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    rules: np.ndarray | None = None
    answer: np.ndarray | None = None
    answer_max: np.ndarray | None = None
    copy: np.ndarray | None = None

    def __post_init__(self):
        self.windows = np.asarray(self.windows, np.int64)
        if self.diag is None and self.answer is None:
            raise ValueError("a profile needs the token sums, the answer-row sums or both")
        if (self.blocks is None) != (self.diag is None):
            raise ValueError("the block and diagonal sums come together")
        if self.rules is None:
            self.rules = np.zeros(self.heads_shape + (len(self.windows),))

    @property
    def heads_shape(self) -> tuple[int, int]:
        """(layers, heads)."""
        return (self.diag if self.diag is not None else self.answer).shape[:2]

    @property
    def token(self) -> bool:
        """Whether every row's sums (the 'token' and 'block' estimators) are here."""
        return self.diag is not None

    @classmethod
    def zeros(
        cls,
        num_layers: int,
        num_heads: int,
        length: int,
        sink: int,
        block: int = BLOCK,
        windows: Sequence[int] = (),
        answer: bool = False,
        token: bool = True,
    ) -> "InfluenceProfile":
        nb = length // block
        return cls(
            length,
            sink,
            block,
            np.zeros((num_layers, num_heads, nb, nb)) if token else None,
            np.zeros((num_layers, num_heads, length)) if token else None,
            windows=np.asarray(windows),
            answer=np.zeros((num_layers, num_heads, length)) if answer else None,
            answer_max=None if token else np.zeros((num_layers, num_heads, length)),
            copy=None if token else np.zeros((num_layers, num_heads, length)),
        )

    def add(
        self,
        count: int,
        loss_sum: float,
        blocks,
        diag,
        rules,
        answer=None,
        answer_max=None,
        copy=None,
    ) -> "InfluenceProfile":
        """This profile plus the sums of `count` more items (a batch's `profile_batch`
        outputs, or another profile's)."""
        for name, more in (("answer", answer), ("answer_max", answer_max), ("copy", copy)):
            if (getattr(self, name) is None) != (more is None):
                raise ValueError(f"the sums disagree on the {name} sums")
        if self.token != (diag is not None):
            raise ValueError("the sums disagree on the token sums")

        def plus(mine, more):
            return None if mine is None else mine + np.asarray(more)

        return InfluenceProfile(
            self.length,
            self.sink,
            self.block,
            plus(self.blocks, blocks),
            plus(self.diag, diag),
            self.count + int(count),
            self.loss_sum + float(loss_sum),
            self.windows,
            self.rules + np.asarray(rules),
            plus(self.answer, answer),
            plus(self.answer_max, answer_max),
            plus(self.copy, copy),
        )

    @property
    def mean_blocks(self) -> np.ndarray:
        return self._need_token().blocks / max(self.count, 1)

    @property
    def mean_diag(self) -> np.ndarray:
        return self._need_token().diag / max(self.count, 1)

    def _need_token(self) -> "InfluenceProfile":
        if self.diag is None:
            raise ValueError(
                f"the profile at N={self.length} has the answer rows' sums only; "
                f"profile with token=True or use the 'answer' estimator"
            )
        return self

    @property
    def dense_loss(self) -> float:
        return self.loss_sum / max(self.count, 1)

    def merge(self, other: "InfluenceProfile") -> "InfluenceProfile":
        """Sum of two partial profiles (e.g. from different hosts or resumed runs)."""
        if (self.length, self.sink, self.block, self.heads_shape) != (
            other.length,
            other.sink,
            other.block,
            other.heads_shape,
        ) or not np.array_equal(self.windows, other.windows):
            raise ValueError(
                "cannot merge profiles of different lengths, sinks, windows or shapes"
            )  # `add` checks that both hold the same sums
        return self.add(
            other.count,
            other.loss_sum,
            other.blocks,
            other.diag,
            other.rules,
            other.answer,
            other.answer_max,
            other.copy,
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        extra = {
            name: x
            for name, x in (
                ("answer", self.answer),
                ("answer_max", self.answer_max),
                ("copy", self.copy),
                ("blocks", self.blocks),
                ("diag", self.diag),
            )
            if x is not None
        }
        np.savez_compressed(
            tmp,
            length=self.length,
            sink=self.sink,
            block=self.block,
            count=self.count,
            loss_sum=self.loss_sum,
            windows=self.windows,
            rules=self.rules,
            **extra,
        )
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "InfluenceProfile":
        with np.load(path) as z:
            extra = {
                k: z[k] for k in ("windows", "rules", "answer", "answer_max", "copy") if k in z
            }
            sums = [z[k] if k in z else None for k in ("blocks", "diag")]
            return cls(
                int(z["length"]),
                int(z["sink"]),
                int(z["block"]),
                *sums,
                int(z["count"]),
                float(z["loss_sum"]),
                **extra,
            )

    # ------------------------------------------------------------------ estimates
    def window_losses(self, windows: np.ndarray, estimator: str = "token") -> np.ndarray:
        """Estimated loss [L, H, R] of each window in `windows` int [R] (sinks = self.sink).

        'token': sum of mean |E| over entries with i - j >= w and j >= sink (exactly the
        entries `window_sink_mask` drops). 'answer': the same over the answer rows only (the
        profile must have them). 'answer-max': the mean over items of the largest single |E|
        among those answer-row entries (a head that fetches one far fact costs its whole
        influence as soon as the window drops it, however few entries that is). 'copy': the
        mean attention the answer rows put on earlier places of the token they predict (each
        row's share split over those places) that the window drops: a retrieval head's mark,
        which does not fade when the model is sure of its answer as a gradient does.
        'answer-copy': 'answer' plus 'copy' scaled so that both sum to the same over all heads
        at the window N/2 (the search then weighs the two equally). 'window':
        the mean first-order loss change of the whole window with rows renormalised (signed;
        each window must be one the profile was made with). 'block': the reference's block
        form: query block m keeps key blocks below ceil(sink/block) and the last
        ceil(w/block) blocks up to the diagonal; every other causal block's sum counts.
        """
        windows = np.asarray(windows, np.int64)
        n = self.length
        if estimator in ("token", "answer"):
            if estimator == "answer" and self.answer is None:
                raise ValueError(
                    f"the profile at N={n} has no answer-row sums; profile with "
                    f"answer=True or use the 'token' estimator"
                )
            d = self.mean_diag if estimator == "token" else self.answer / max(self.count, 1)
            return suffix_sums(d)[..., np.clip(windows, 0, n)]
        if estimator in ("copy", "answer-copy"):
            if self.copy is None:
                raise ValueError(
                    f"the profile at N={n} has no copy sums; profile the answer "
                    f"rows alone (token=False)"
                )
            copy = suffix_sums(self.copy / max(self.count, 1))
            if estimator == "copy":
                return copy[..., np.clip(windows, 0, n)]
            # on the answer estimate's scale: equal totals over all heads at the window N/2
            answer = suffix_sums(self.answer / max(self.count, 1))
            scale = answer[..., n // 2].sum() / max(copy[..., n // 2].sum(), 1e-30)
            return (answer + scale * copy)[..., np.clip(windows, 0, n)]
        if estimator == "answer-max":
            if self.answer_max is None:
                raise ValueError(
                    f"the profile at N={n} has no answer-row maxima; profile the "
                    f"answer rows alone (token=False)"
                )
            m = np.concatenate(
                [self.answer_max, np.zeros(self.answer_max.shape[:-1] + (1,))], axis=-1
            ) / max(self.count, 1)
            return m[..., np.clip(windows, 0, n)]
        if estimator == "window":
            pos = {int(w): i for i, w in enumerate(self.windows)}
            out = np.zeros(self.heads_shape + (len(windows),))
            for r, w in enumerate(windows):
                if w >= n:
                    continue
                if int(w) not in pos:
                    raise ValueError(
                        f"the profile at N={n} has no rule estimate for window "
                        f"{int(w)} (it has {sorted(pos)}); profile with these "
                        f"windows or use the 'token' estimator"
                    )
                out[..., r] = self.rules[..., pos[int(w)]] / max(self.count, 1)
            return out
        if estimator == "block":
            bl = self.mean_blocks
            nb = bl.shape[-1]
            m = np.arange(nb)[:, None]
            j = np.arange(nb)[None, :]
            sink_blocks = -(-self.sink // self.block)
            out = np.zeros(bl.shape[:2] + (len(windows),))
            for r, w in enumerate(windows):
                if w >= n:
                    continue
                keep = -(-int(w) // self.block)
                dropped = (j <= m - keep) & (j >= sink_blocks)
                out[..., r] = (bl * dropped).sum(axis=(-1, -2))
            return out
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")

    def rule_losses(self, grid, estimator: str = "token") -> np.ndarray:
        """Estimated loss [L, H, R] of each rule of a `RuleGrid` at this profile's length."""
        if grid.sink != self.sink:
            raise ValueError(
                f"the rule grid keeps {grid.sink} sinks but the profile excluded {self.sink}"
            )
        return self.window_losses(grid.windows(self.length), estimator)


def profile_items(
    model: Llama,
    items: Sequence[Any],
    length: int,
    *,
    sink: int = 64,
    batch_size: int = 1,
    q_chunk: int | None = None,
    key_groups: int = 4,
    remat: bool = False,
    windows: Sequence[int] = (),
    answer: bool = False,
    token: bool = True,
    pad_id: int | None = None,
    mesh=None,
    progress: bool = True,
    profile: InfluenceProfile | None = None,
    on_batch=None,
) -> InfluenceProfile:
    """Profiles every head on `items` (all of length <= `length`) and returns the summed profile.

    Args:
      items: calibration items (`.tokens`, `.answer_start`).
      length: profile length N (a multiple of 64); items are right-padded to it.
      sink: sink tokens every rule keeps (excluded from the diagonal sums).
      batch_size: items per forward + backward pass (one compiled program per batch shape).
      q_chunk: influence rows per step (default: ~16M floats per [B, H, rows, N] tensor).
      key_groups: causal skipping groups of the chunked attention.
      remat: recompute each layer's activations in the backward pass (less memory).
      windows: candidate windows for the 'window' estimator (e.g. `grid.windows(length)`).
      answer: also sum the answer rows' |E| (the 'answer' estimator).
      token: sum every row's |E| (the 'token' and 'block' estimators). `token=False` (with
        `answer` and no windows) profiles the answer rows alone: the attention runs on the
        fastest exact kernel and only the answer rows' probabilities are recomputed.
      mesh: optional mesh; batches split over its data axes, parameters by `moa_jax.parallel`.
      profile: a partial profile to continue (its `count` items are skipped).
      on_batch: called with the running profile after every batch (checkpointing).
    """
    cfg = model.config
    if length % BLOCK:
        raise ValueError(f"profile length {length} must be a multiple of {BLOCK}")
    if pad_id is None:
        pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    windows = sorted({int(w) for w in windows if int(w) < length})
    prof = profile or InfluenceProfile.zeros(
        cfg.num_layers, cfg.num_heads, length, sink, windows=windows, answer=answer, token=token
    )
    if list(prof.windows) != windows:
        raise ValueError(f"the partial profile has windows {list(prof.windows)}, not {windows}")
    if (prof.answer is not None) != bool(answer):
        raise ValueError(
            f"the partial profile {'has' if prof.answer is not None else 'lacks'} "
            f"answer-row sums, but answer={answer}"
        )
    if prof.token != bool(token):
        raise ValueError(
            f"the partial profile {'has' if prof.token else 'lacks'} the token "
            f"sums, but token={token}"
        )
    todo = list(items)[prof.count :]
    bar = tqdm(total=len(todo), desc=f"influence N={length}", disable=not progress, unit="item")
    graphdef, state = _split(model, mesh)  # once: parameters sharded once
    for batch in make_batches(todo, length, batch_size, pad_id, fill=True):
        sums = _profile_split(
            graphdef,
            state,
            cfg,
            batch,
            sink=sink,
            block=BLOCK,
            q_chunk=q_chunk,
            key_groups=key_groups,
            remat=remat,
            windows=windows,
            answer=answer,
            token=token,
            mesh=mesh,
        )
        losses = sums.losses[: batch.rows]
        prof = prof.add(
            len(losses),
            float(np.sum(losses)),
            sums.blocks,
            sums.diag,
            sums.rules,
            sums.answer if answer else None,
            sums.answer_max,
            sums.copy,
        )
        bar.update(len(losses))
        if on_batch is not None:
            on_batch(prof)
    bar.close()
    return prof
