"""Runs tasks x lengths x methods on one model and collects per-item records.

For every (task, length) cell the items are generated once and every method sees the same items.
Per item and method (decode-time methods, `Method.decode_only`, teacher-force through their
decode path instead of a forward pass: see `decode_logprobs`):
- 'generate' tasks: greedy `moa_jax.generate.generate` from the chat-wrapped prompt plus the
  forced answer prefix, scored by the task; with NLL on, the gold answer is teacher-forced after
  the prompt in one forward pass (logits only at the answer positions) giving `nll` (mean
  per-token NLL of the answer) and `tf_acc` (fraction of answer tokens that are the argmax).
- 'lm' tasks: one forward pass over the window, `nll` = mean NLL of its last `tail` tokens.

Shapes are kept constant within a cell (prompts fill the same 64-token bucket, forward passes
are padded to the cell length), so each method compiles once per cell.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from moa_jax.eval.tasks import Item, Task, TaskContext
from moa_jax.generate import generate
from moa_jax.methods import AttentionConfig, Method
from moa_jax.models.attention import Attention
from moa_jax.models.causal_lm import CausalLM

logger = logging.getLogger(__name__)


def _round_up(x: int, m: int) -> int:
    return -(-int(x) // m) * m


@functools.partial(jax.jit, static_argnames=("graphdef", "attention"))
def target_logprobs(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens: jax.Array,
    at: jax.Array,
    targets: jax.Array,
    *,
    attention: Attention,
):
    """Log-probabilities of `targets` predicted at positions `at`, and whether each is the argmax.

    tokens int [B, T] (positions [0, T), no cache); at, targets int [B, A]. The LM head runs
    at the A positions only (`CausalLM.logits(at=)`). Returns (logp [B, A], hit [B, A]).
    """
    model: CausalLM = nnx.merge(graphdef, state)
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    hidden, _ = model.hidden_states(tokens, positions, attention=attention, mode="stateless")
    logits = model.logits(hidden, at=at)
    logp = jax.nn.log_softmax(logits, axis=-1)
    tgt = jnp.take_along_axis(logp, targets[:, :, None], axis=-1)[:, :, 0]
    return tgt, jnp.argmax(logits, axis=-1) == targets


@functools.partial(jax.jit, static_argnames=("graphdef", "attention", "cache_len"))
def decode_logprobs(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens: jax.Array,
    lengths: jax.Array,
    forced: jax.Array,
    *,
    attention: Attention,
    cache_len: int,
):
    """Teacher forcing through the backend's cache: prefill `tokens` (right-padded, `lengths`
    valid) as `generate` does, then feed the `forced` tokens one decode step at a time.

    tokens int [B, T]; forced int [B, A]: forced[:, 0] is predicted by the prefill, forced[:, j]
    by the decode step that consumed forced[:, j - 1]. Returns (logp [B, A], hit [B, A]) like
    `target_logprobs`. For methods whose decoding differs from their prefill (recycled, H2O,
    StreamingLLM decoding) this measures the decode path; for masks it equals a forward pass.
    """
    model: CausalLM = nnx.merge(graphdef, state)
    b, t = tokens.shape
    cache = attention.init_cache(model.config, b, cache_len, model.dtype)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, cache = model(
        tokens, positions, cache, attention, logits_at=lengths - 1, lengths=lengths, mode="prefill"
    )

    def score(logits, target):
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return (
            jnp.take_along_axis(logp, target[:, None], axis=-1)[:, 0],
            jnp.argmax(logits, axis=-1) == target,
        )

    def step(carry, j):
        cache, pos = carry
        tok = forced[:, j]
        logits, cache = model.decode_token(tok, pos, cache, attention)
        return (cache, pos + 1), score(logits, forced[:, j + 1])

    first = score(logits, forced[:, 0])
    _, (lp, hit) = jax.lax.scan(
        step, (cache, lengths.astype(jnp.int32)), jnp.arange(forced.shape[1] - 1)
    )
    return (
        jnp.concatenate([first[0][:, None], lp.T], axis=1),
        jnp.concatenate([first[1][:, None], hit.T], axis=1),
    )


class Runner:
    """Evaluates one model.

    Args:
      model, tokenizer: from `load_model`.
      task_ctx: generators' context (tokenizer, chat, corpus, depths, ...).
      method_ctx: builders' context (config, plan, density, ...).
      nll: 'auto' (each task's default), 'all' or 'none'.
      progress: show tqdm bars.
      log: where one-line cell summaries go (None: nowhere).
    """

    def __init__(
        self,
        model: CausalLM,
        tokenizer: Any,
        task_ctx: TaskContext,
        method_ctx: AttentionConfig,
        *,
        nll: str = "auto",
        progress: bool = True,
        log: Callable[[str], Any] | None = logger.info,
    ):
        if nll not in ("auto", "all", "none"):
            raise ValueError(f"nll must be auto | all | none, got {nll!r}")
        self.model, self.tokenizer = model, tokenizer
        self.graphdef, self.state = nnx.split(model)
        self.cfg = model.config
        self.task_ctx, self.method_ctx = task_ctx, method_ctx
        self.nll, self.progress, self.log = nll, progress, log
        self.pad_id = self.cfg.pad_token_id if self.cfg.pad_token_id is not None else 0

    # ------------------------------------------------------------------ pieces
    def _wants_nll(self, task: Task) -> bool:
        return task.kind == "lm" or self.nll == "all" or (self.nll == "auto" and task.nll)

    def _decode_logprobs(
        self, context: Sequence[int], targets: Sequence[int], slots: int, backend: Attention
    ):
        t = _round_up(len(context), 64)
        tokens = np.full((1, t), self.pad_id, np.int32)
        tokens[0, : len(context)] = context
        forced = np.full((1, slots), self.pad_id, np.int32)
        forced[0, : len(targets)] = targets
        logp, hit = decode_logprobs(
            self.graphdef,
            self.state,
            jnp.asarray(tokens),
            jnp.asarray([len(context)], jnp.int32),
            jnp.asarray(forced),
            attention=backend,
            cache_len=t + slots,
        )
        n = len(targets)
        return np.asarray(logp)[0, :n], np.asarray(hit)[0, :n]

    def _logprobs(
        self,
        ids: Sequence[int],
        at: Sequence[int],
        targets: Sequence[int],
        pad_len: int,
        slots: int,
        backend: Attention,
    ):
        tokens = np.full((1, max(pad_len, _round_up(len(ids), 64))), self.pad_id, np.int32)
        tokens[0, : len(ids)] = ids
        a = np.zeros((1, slots), np.int32)
        tg = np.zeros((1, slots), np.int32)
        a[0, : len(at)], tg[0, : len(targets)] = at, targets
        logp, hit = target_logprobs(
            self.graphdef,
            self.state,
            jnp.asarray(tokens),
            jnp.asarray(a),
            jnp.asarray(tg),
            attention=backend,
        )
        n = len(targets)
        return np.asarray(logp)[0, :n], np.asarray(hit)[0, :n]

    def run_item(
        self, task: Task, item: Item, backend: Attention, decode_only: bool = False
    ) -> dict[str, Any]:
        """Scores one item with one backend; `decode_only` teacher-forces through decoding."""
        rec: dict[str, Any] = {}
        ctx = self.task_ctx
        t0 = time.perf_counter()
        if task.kind == "lm":
            ids = list(item.token_ids)
            tail = int(item.meta.get("tail", ctx.ppl_tail))
            n = len(ids)
            if decode_only:
                logp, hit = self._decode_logprobs(ids[: n - tail], ids[n - tail :], tail, backend)
            else:
                logp, hit = self._logprobs(
                    ids, range(n - tail - 1, n - 1), ids[n - tail :], item.length, tail, backend
                )
            rec["nll"] = float(-logp.mean())
            rec["tf_acc"] = float(hit.mean())
            rec["tokens"] = n
        else:
            ids = ctx.prompt_ids(item.prompt, item.answer_prefix)
            budget = item.length - task.max_new_tokens
            if len(ids) > budget:
                raise RuntimeError(
                    f"{task.name} item {item.index} has {len(ids)} prompt tokens, "
                    f"more than its budget {budget}"
                )
            out = generate(
                self.model,
                [ids],
                max_new_tokens=task.max_new_tokens,
                attention=backend,
                pad_id=self.pad_id,
            )
            text = self.tokenizer.decode(out.rows()[0], skip_special_tokens=True)
            rec.update(task.score(item, text))
            rec["pred"] = text
            rec["tokens"] = len(ids)
            if self._wants_nll(task):
                ans = ctx.answer_ids(item.answer_prefix, item.answer)
                slots = _round_up(max(len(ans), task.max_new_tokens, 1), 16)
                if decode_only:
                    logp, hit = self._decode_logprobs(ids, ans, slots, backend)
                else:
                    full = ids + ans
                    logp, hit = self._logprobs(
                        full, range(len(ids) - 1, len(full) - 1), ans, item.length, slots, backend
                    )
                rec["nll"] = float(-logp.mean())
                rec["tf_acc"] = float(hit.mean())
        rec["seconds"] = time.perf_counter() - t0
        return rec

    # ------------------------------------------------------------------ loop
    def make_items(
        self, tasks: Sequence[Task], lengths: Sequence[int], num_items: int, seed: int
    ) -> dict[tuple[int, str], tuple[list[Item], float]]:
        """Every cell's items and the seconds making them took, by (length, task name). Made
        before any model runs (`run` takes them), a task that cannot make its items (a length
        too short for it, a corpus too small) stops the run before it writes anything."""
        cells = {}
        for length in lengths:
            for task in tasks:
                t0 = time.perf_counter()
                items = task.make_items(self.task_ctx, length, num_items, seed)
                cells[(length, task.name)] = (items, time.perf_counter() - t0)
        return cells

    def run(
        self,
        tasks: Sequence[Task],
        methods: Sequence[Method],
        lengths: Sequence[int],
        num_items: int,
        seed: int,
        on_cell: Callable[[dict[str, Any]], Any] | None = None,
        items: dict[tuple[int, str], tuple[list[Item], float]] | None = None,
    ) -> dict[str, Any]:
        """Returns {'records': [...], 'items': [...], 'methods': {...}}.

        Cells run length by length (all tasks at the first length, then the next), so that an
        interrupted run has complete lengths; `on_cell(partial result)` is called after each
        (task, length, method) cell, e.g. to save progress. `items`: the cells' items from
        `make_items` (default: made here first).
        """
        cells = self.make_items(tasks, lengths, num_items, seed) if items is None else items
        mctx = self.method_ctx
        usable, method_info = [], {}
        for m in methods:
            reason = m.unavailable(mctx)
            method_info[m.name] = {
                "description": m.description,
                "available": reason is None,
                "reason": reason,
                "kv_density": {},
            }
            if reason is None:
                usable.append(m)
                for n in lengths:
                    method_info[m.name]["kv_density"][str(n)] = (
                        None if m.kv_density is None else float(m.kv_density(mctx, n))
                    )
            elif self.log:
                self.log(f"skipping method {m.name}: {reason}")
        records: list[dict[str, Any]] = []
        items_out: list[dict[str, Any]] = []
        result = {"records": records, "items": items_out, "methods": method_info}
        for length in lengths:
            for task in tasks:
                cell_items, gen_s = cells[(length, task.name)]
                items_out += [it.to_dict() for it in cell_items]
                for m in usable:
                    backend = m.build(mctx, length)
                    bar = tqdm(
                        cell_items,
                        desc=f"{task.name} L={length} {m.name}",
                        unit="item",
                        disable=not self.progress,
                        leave=False,
                    )
                    cell = []
                    for item in bar:
                        rec = {
                            "task": task.name,
                            "family": task.family,
                            "length": length,
                            "method": m.name,
                            "index": item.index,
                            "depth": item.depth,
                        }
                        rec.update(self.run_item(task, item, backend, m.decode_only))
                        cell.append(rec)
                        if task.primary in rec:
                            bar.set_postfix({task.primary: f"{rec[task.primary]:.2f}"})
                    records += cell
                    if self.log:
                        self.log(_cell_line(task, length, m.name, cell, gen_s))
                    if on_cell is not None:
                        on_cell(result)
        return result


def _cell_line(task: Task, length: int, method: str, cell: list[dict], gen_s: float) -> str:
    s = f"{task.name:>13} L={length:<6} {method:<9} n={len(cell)}"
    if task.kind == "lm":
        s += f" ppl={math.exp(np.mean([r['nll'] for r in cell])):.3f}"
    else:
        s += f" {task.primary}={np.mean([r[task.primary] for r in cell]):.3f}"
        if "digit_acc" in task.metrics:
            s += f" digit_acc={np.mean([r['digit_acc'] for r in cell]):.3f}"
        if cell and "nll" in cell[0]:
            s += f" answer_nll={np.mean([r['nll'] for r in cell]):.3f}"
    s += f" ({sum(r['seconds'] for r in cell):.0f}s, items {gen_s:.1f}s)"
    return s
