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

Memory: per layer O(B x H x q_chunk x N) for the attention and its influence (no N x N
matrix), plus the model's activations for the backward pass (`remat=True` recomputes them per
layer). Items of one length are batched; the batch can be sharded over a mesh (`mesh=`). The
sums go into an `InfluenceProfile` (`moa_jax.search.influence_profile`), which turns them into
rule-loss estimates.

The model's own sliding window (`ModelConfig.model_window`: Mistral, Qwen2 with
`use_sliding_window`) is not modelled: the profile differentiates dense causal attention and
its estimates keep the plan's sinks, which a windowed layer drops (`Plan.within_model_window`).
So the profile refuses a length longer than the model's window (`refuse_model_window`, one
line naming the reason); at lengths within the window the model's attention is dense causal
and the profile is exact, and the plans it finds are composed with the window where they run.

Public API:
  refuse_model_window(cfg, length)  ValueError when the model's own window binds at `length`
  InfluenceAttention(sink, block, q_chunk, windows, ...)  backend whose probes' gradients are
                                                           the influence
  profile_batch(model, batch, ...) -> BatchSums (losses [B], blocks [L, H, nb, nb],
                                       diag [L, H, N], rules [L, H, R], answer [L, H, N or 0],
                                       answer_max and copy [L, H, N] or None)
  answer_rows(tgt_pos, tgt_w, length) -> [B, N] 0/1 rows that predict an answer token
  profile_items(model, items, length, ...) -> InfluenceProfile
  layer_influence(q, k, v, dout, sink, block, q_chunk) -> (blocks, diag)   (one layer)
  influence_dense(q, k, v, dout) -> E [B, H, N, N]          (unchunked, for tests)
  auto_q_chunk(batch, heads, length) -> influence rows per step
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
from moa_jax.models.causal_lm import CausalLM, stack_layers
from moa_jax.models.masked_attention import chunked_attention
from moa_jax.pallas_kernels.sharding import sparse_attention_on_mesh
from moa_jax.parallel import batch_sharding, param_shardings
from moa_jax.search.answer_loss import Batch, answer_nll, make_batches, row_positions
from moa_jax.search.influence import answer_tap, attention_with_influence, influence_rows
from moa_jax.search.influence_profile import BLOCK, InfluenceProfile


def refuse_model_window(cfg, length: int) -> None:
    """Raises ValueError, in one line naming the reason, when the model has its own sliding
    window (`ModelConfig.model_window`) shorter than `length`: the influence profile models
    dense causal attention with the plan's sinks, not the model's window (module docstring)."""
    windows = {cfg.model_window(i) for i in range(cfg.num_layers)} - {None}
    if windows and int(length) > min(windows):
        w = min(windows)
        raise ValueError(
            f"the influence profile does not model this {cfg.family} model's own sliding "
            f"window of {w} tokens (it differentiates dense causal attention and keeps the "
            f"plan's sinks, which the window drops): profile, validate and budget at lengths "
            f"<= {w}, not {int(length)}"
        )


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("probes", "rows"),
    meta_fields=(
        "sink",
        "block",
        "q_chunk",
        "key_groups",
        "windows",
        "answer",
        "token",
        "kernel",
        "mesh",
    ),
)
@dataclasses.dataclass(frozen=True)
class InfluenceAttention(Attention):
    """Dense causal attention with zero probes whose gradients are the layer's influence sums.

    The configuration fields are static; each layer's backend (`with_probes`) holds that
    layer's zero `probes` and the answer `rows` they read, a pytree of arrays (the layers run
    as one scan over their stacked backends).

    With `token` (every row's sums): probes = (blocks [H, N/block, N/block], diag [H, N],
    rules [H, R], answer [H, N] or [H, 0]), rows = (the answer rows' weights [B, N] or
    [B, 0],), and the attention is `moa_jax.search.influence.attention_with_influence`
    (chunked jnp, every row's |E| reduced in its backward pass).

    Without `token` (the answer rows only, `answer` must be set and `windows` empty): probes =
    (answer, answer_max, copy [H, N]), rows = (answer rows int [B, A], their weights [B, A],
    the tokens int [B, N], the tokens the answer rows predict int [B, A]); the attention is the
    fastest exact kernel at hand (`sparse_attention` with a dense plan on GPU and TPU, the
    rematerialised chunked jnp attention elsewhere) and `influence.answer_tap` recomputes the
    answer rows alone in the backward pass.
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
    probes: tuple[jax.Array, ...] | None = None
    rows: tuple[jax.Array, ...] | None = None
    layer_uniform = True  # every layer's probes have one shape; `layer` is not read

    def __post_init__(self):
        if not self.token and (not self.answer or self.windows):
            raise ValueError(
                "without the token sums the profile computes the answer rows' "
                "sums only: set answer=True and no windows"
            )
        if self.kernel not in ("auto", "pallas", "jnp"):
            raise ValueError(f"kernel must be 'auto', 'pallas' or 'jnp', got {self.kernel!r}")

    def with_probes(
        self, probes: tuple[jax.Array, ...], rows: tuple[jax.Array, ...]
    ) -> InfluenceAttention:
        """This backend for one layer: its zero probes and the answer rows (class docstring)."""
        return dataclasses.replace(self, probes=tuple(probes), rows=tuple(rows))

    def __call__(self, q, k, v, *, layer, positions, lengths=None):
        if self.probes is None:
            raise ValueError("InfluenceAttention runs a layer given its probes (`with_probes`)")
        if self.token:
            out = attention_with_influence(
                q,
                k,
                v,
                *self.probes,
                *self.rows,
                self.sink,
                self.block,
                self.q_chunk,
                self.key_groups,
                self.windows,
            )
            return out
        out = self._dense(q, k, v, positions)
        return answer_tap(out, q, k, v, *self.probes, *self.rows, self.sink)

    def _dense(self, q, k, v, positions):
        kernel = self.kernel
        if kernel == "auto":
            kernel = "pallas" if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else "jnp"
        if kernel == "pallas":  # (interpret mode off GPU / TPU)
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
    """One layer's zero probes (`InfluenceAttention`)."""
    heads = cfg.num_heads
    ans = jnp.zeros((heads, length if answer else 0), jnp.float32)
    if not token:
        return ans, ans, ans
    nb = length // block
    return (
        jnp.zeros((heads, nb, nb), jnp.float32),
        jnp.zeros((heads, length), jnp.float32),
        jnp.zeros((heads, rules), jnp.float32),
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
        rows = (answer_rows(tgt_pos, tgt_w, t) if attention.answer else jnp.zeros((b, 0)),)
    else:  # the answer rows alone, by position, and the tokens they predict
        rows = (tgt_pos, (tgt_w > 0).astype(jnp.float32), tokens, tgt_ids)

    def loss(probes):
        per_layer = tuple(attention.with_probes(p, rows) for p in probes)
        hidden, _ = model.hidden_states(
            tokens,
            row_positions(b, t),
            attention=per_layer,
            mode="stateless",
            remat=remat,
            layer_stack=stack_layers(model),
        )
        per_item = answer_nll(model, hidden, tgt_pos, tgt_ids, tgt_w)
        return per_item.sum(), per_item

    probes = _zero_probes(
        cfg, t, attention.block, len(attention.windows), attention.answer, attention.token
    )
    grads, per_item = jax.grad(loss, has_aux=True)((probes,) * layers)
    grads = jax.tree.map(lambda *g: jnp.stack(g), *grads)  # each sum stacked over layers
    if not attention.token:
        answer, answer_max, copy = grads
        return BatchSums(
            per_item, None, None, jnp.zeros((layers, cfg.num_heads, 0)), answer, answer_max, copy
        )
    return BatchSums(per_item, *grads)


def _split(model: CausalLM, mesh=None):
    """(graphdef, state) of the model, the state sharded over `mesh` when given."""
    graphdef, state = nnx.split(model)
    if mesh is not None:
        state = jax.device_put(state, param_shardings(state, mesh))
    return graphdef, state


def profile_batch(
    model: CausalLM,
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
    arrays = batch.arrays()
    if mesh is not None:
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


def profile_items(
    model: CausalLM,
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
    refuse_model_window(cfg, length)
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
