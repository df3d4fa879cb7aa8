"""Continued pretraining: a jitted, sharded optax loop with orbax checkpoints and exact resume.

    python -m moa_jax.train --config configs/train/tiny_cpu.yaml [--flag value ...]

Every field of `TrainConfig` (`moa_jax.train.config`) is a flag (`--prefix-len 8064`) and a key
of the YAML config file (`prefix_len: 8064`); flags override the file, an unknown key is an error.

What one run does (`train`):

1. Loads the model (`registry.load_model`: a preset, an HF directory or a .gguf) with the compute
   dtype `dtype` and the master-weight dtype `param_dtype` (bf16 compute, f32 weights and
   optimizer state: `dtype: bfloat16, param_dtype: float32`).
2. Reads the corpus (`moa_jax.train.data`), holds out `heldout_docs` documents (or evaluates on
   `eval_corpus`), tokenises and packs rows of `seq_len + 1` tokens.
3. Places params and optimizer state on the mesh (`parallel.param_shardings`; the AdamW moments
   mirror the params' shardings, scalars are replicated) and every batch over data x fsdp.
4. Steps (`moa_jax.train.step`): AdamW (`moa_jax.train.optimizer`: `optax.adamw`, decay on
   matrices only) after global-norm clipping, learning rate warm-up then cosine / linear decay /
   constant, gradient accumulation over `grad_accum`
   micro-batches inside the jitted step (a `lax.scan`; the loss is normalised by the token count
   of the whole batch, so accumulation equals one bigger batch).
5. Logs loss, learning rate, gradient norm, tokens/s and MFU (`moa_jax.train.metrics`) to a
   tqdm bar, the log and `<out_dir>/metrics.jsonl`; evaluates (`moa_jax.train.evaluate`)
   held-out perplexity (all positions, and the last
   `tail_len` positions, with the training attention and with dense attention) before training,
   every `eval_every` steps and at the end.
6. Checkpoints (orbax, `moa_jax.train.checkpoint`) every `checkpoint_every` steps and at the end,
   keeping `keep_checkpoints`; `--resume` continues from the latest one (params, optimizer state,
   PRNG key, step, data position) and reproduces an uninterrupted run's losses exactly.
7. Exports the final weights to an HF directory (`export_hf`) that
   `transformers.LlamaForCausalLM.from_pretrained` loads.

Before anything is written, every input is checked: the options (`TrainConfig`'s domains and
relations), the mesh, the run folder's checkpoints against `--resume`, the model's config (rows
within its context), the plan, the corpus (readable, non-empty) and the rows it gives (at least a
batch of them). A run that fails a check leaves no folder behind.

A step whose loss, gradient norm or updated weights are not finite stops the run with a
`DivergenceError` (exit 1) before anything of that step is saved: the last checkpoint stays the
latest, and `--resume` continues from it. SIGINT and SIGTERM stop the run after the step in
progress, with a checkpoint of that step (`moa_jax.train.signals`); `--resume` continues from it
as if the run had not stopped.

The training attention is chosen in `moa_jax.train.attention`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from moa_jax.cli import setup_logging
from moa_jax.config import ModelConfig
from moa_jax.errors import ConfigError, DivergenceError
from moa_jax.models.hf_weights import save_hf
from moa_jax.models.registry import load_config, load_model
from moa_jax.parallel import (
    MeshConfig,
    initialize_distributed,
    make_mesh,
    mesh_context,
    param_shardings,
)
from moa_jax.runtime import enable_compilation_cache
from moa_jax.train.attention import eval_attentions, load_plan, make_attention
from moa_jax.train.checkpoint import Checkpointer, CheckpointError
from moa_jax.train.config import (
    TrainConfig,
    check_batch_divides,
    check_resume_config,
    parse_config,
)
from moa_jax.train.data import (
    BatchIterator,
    PackedData,
    eval_rows,
    load_documents,
    pack,
    split_documents,
    tokenize_documents,
)
from moa_jax.train.evaluate import evaluate
from moa_jax.train.metrics import (
    MetricsFile,
    attention_entries,
    peak_flops,
    summarize,
    train_flops_per_sequence,
)
from moa_jax.train.optimizer import lr_schedule, make_optimizer
from moa_jax.train.signals import StopSignals
from moa_jax.train.step import get_train_step, opt_state_shardings, put_batch, replicated

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    out_dir: Path
    losses: dict[int, float]  # step -> loss of the steps run by this call
    final_step: int
    interrupted: bool
    evals: list[dict[str, Any]]  # eval records written by this call
    summary: dict[str, Any]


def export_hf(
    graphdef, params, path: str | Path, *, dtype: str | None = None, tokenizer: Any = None
) -> Path:
    """Writes the params as an HF Llama directory (`weights.save_hf`)."""
    model = nnx.merge(graphdef, jax.device_get(params))
    save_hf(model, path, dtype=dtype, tokenizer=tokenizer)
    return Path(path)


def train(cfg: TrainConfig, *, devices: Sequence[Any] | None = None) -> TrainResult:
    """Runs (or resumes) a training run; see the module docstring."""
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out-dir {out} is a file, not a directory")
    mesh = make_mesh(MeshConfig(cfg.mesh_data, cfg.mesh_fsdp, cfg.mesh_tensor), devices)
    check_batch_divides(cfg, mesh)
    # The cheap checks first, then the data and the weights; the run folder is made only once
    # all of them have passed (an existing run's checkpoints are read without writing).
    ckpt, latest = _existing_checkpoints(cfg, out)
    seq_len = cfg.effective_seq_len()
    model_config = load_config(cfg.model)
    _check_context(cfg, model_config, seq_len)
    if cfg.attention == "moa":  # the plan against the model's config, before the weights load
        load_plan(cfg, model_config)
    train_docs, eval_docs = _documents(cfg)
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    mc = model.config
    if tokenizer is None:
        raise ValueError(f"model {cfg.model!r} comes without a tokenizer; training needs one")
    data = _pack_data(cfg, mc, tokenizer, train_docs, eval_docs, seq_len)
    attention = make_attention(cfg, mc)
    methods = eval_attentions(cfg, mc)
    tail = cfg.tail_len if cfg.attention == "recycled" else 0

    out.mkdir(parents=True, exist_ok=True)
    if ckpt is None:
        ckpt = _checkpointer(cfg, out)
    state = _initial_state(cfg, model, mesh, ckpt, latest, data.it)
    del model
    loop = _Loop(cfg, mc, mesh, out, ckpt, data, state, attention, methods, tail)
    interrupted = loop.run()
    params = loop.state.params

    if not interrupted and cfg.export_hf:
        if jax.process_count() > 1:  # every process takes part in the gather
            params = multihost_utils.process_allgather(params, tiled=True)
        if loop.lead:
            export_hf(
                state.graphdef,
                params,
                cfg.export_hf,
                dtype=cfg.export_dtype or cfg.param_dtype,
                tokenizer=tokenizer,
            )
            loop.log("exported HF checkpoint to %s", cfg.export_hf)
    if loop.lead:
        summary = summarize(out, cfg)
        if not interrupted:
            (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    else:
        summary = {}
    return TrainResult(out, loop.losses, loop.step, interrupted, loop.evals, summary)


def _checkpointer(cfg: TrainConfig, out: Path) -> Checkpointer:
    return Checkpointer(
        out / "checkpoints", keep=cfg.keep_checkpoints, async_save=cfg.async_checkpointing
    )


def _existing_checkpoints(cfg: TrainConfig, out: Path) -> tuple[Checkpointer | None, int | None]:
    """The checkpointer of a run folder that holds checkpoints (None if it holds none) and its
    latest step. An error when they are there without `--resume`, when `--resume` finds none,
    or when they are another config's run."""
    ckpt = _checkpointer(cfg, out) if (out / "checkpoints").is_dir() else None
    latest = ckpt.latest_step() if ckpt is not None else None
    if latest is not None and not cfg.resume:
        raise ConfigError(
            f"{out} already holds checkpoints (latest step {latest}); pass "
            "--resume to continue that run, or choose another --out-dir"
        )
    if cfg.resume and latest is None:
        raise ConfigError(
            f"--resume: {out / 'checkpoints'} holds no checkpoint to continue from; leave out "
            "--resume to start a new run there"
        )
    if cfg.resume and (out / "config.json").is_file():
        check_resume_config(json.loads((out / "config.json").read_text()), cfg, out)
    return ckpt, latest


def _check_context(cfg: TrainConfig, mc: ModelConfig, seq_len: int) -> None:
    """Rows within the model's trained context, unless `--beyond-context`."""
    if seq_len > mc.max_position_embeddings and not cfg.beyond_context:
        given = "--seq-len" if cfg.seq_len else "--prefix-len + --tail-len"
        raise ConfigError(
            f"rows of {seq_len} tokens ({given}) exceed the context of {cfg.model} "
            f"({mc.max_position_embeddings} tokens, max_position_embeddings); use shorter rows "
            "or pass --beyond-context"
        )


def _documents(cfg: TrainConfig) -> tuple[list[Any], list[Any]]:
    """The training documents and the evaluation ones (held out, or `eval_corpus`)."""
    docs = load_documents(cfg.corpus, text_field=cfg.text_field, max_documents=cfg.max_documents)
    train_docs, held = split_documents(docs, cfg.heldout_docs, cfg.data_seed)
    eval_docs = (
        load_documents(cfg.eval_corpus, text_field=cfg.text_field)
        if cfg.eval_corpus and cfg.eval_sequences
        else held
    )
    return train_docs, eval_docs


@dataclasses.dataclass
class _Data:
    """A run's tokenised data: the training rows and their batch iterator, the evaluation rows."""

    train_docs: list[Any]
    train: PackedData
    it: BatchIterator
    eval: PackedData | None
    rows: np.ndarray


def _pack_data(
    cfg: TrainConfig,
    mc: ModelConfig,
    tokenizer: Any,
    train_docs: list[Any],
    eval_docs: list[Any],
    seq_len: int,
) -> _Data:
    """Tokenises and packs the documents into rows of `seq_len + 1` tokens."""
    eos = (
        tokenizer.eos_token_id
        if tokenizer.eos_token_id is not None
        else (mc.eos_token_ids[0] if mc.eos_token_ids else None)
    )
    train_data = pack(tokenize_documents(train_docs, tokenizer), seq_len, cfg.packing, eos)
    if len(train_data) and int(train_data.tokens.max()) >= mc.vocab_size:
        raise ValueError(
            f"token id {int(train_data.tokens.max())} >= the model's vocab_size "
            f"{mc.vocab_size}: the tokenizer does not match the model"
        )
    it = BatchIterator(train_data, cfg.batch_size, seed=cfg.data_seed)
    if len(train_data) < cfg.batch_size:
        raise ConfigError(
            f"the corpus gives {len(train_data)} training rows of {seq_len + 1} tokens, fewer "
            f"than --batch-size {cfg.batch_size}; use a smaller --batch-size or --seq-len, "
            "or more text"
        )
    eval_data, rows = None, np.zeros((0,), np.int64)
    if cfg.eval_sequences:
        eval_data = pack(tokenize_documents(eval_docs, tokenizer), seq_len, "chunk", eos)
        rows = eval_rows(eval_data, cfg.eval_sequences)
        if not len(rows):
            raise ValueError(
                f"no evaluation rows: every evaluation document is shorter than "
                f"{seq_len + 1} tokens"
            )
    return _Data(train_docs, train_data, it, eval_data, rows)


@dataclasses.dataclass
class _State:
    """What the steps update (params, optimizer state, PRNG key), where it lives, and the step
    it is at."""

    graphdef: Any
    params: Any
    opt_state: Any
    rng: Any
    param_shardings: Any
    opt_shardings: Any
    start: int


def _initial_state(
    cfg: TrainConfig,
    model: nnx.Module,
    mesh: Any,
    ckpt: Checkpointer,
    latest: int | None,
    it: BatchIterator,
) -> _State:
    """The model's params and a fresh optimizer state placed on the mesh, or, with `--resume`,
    the latest checkpoint's (the data iterator is moved to its position)."""
    graphdef, params = nnx.split(model)
    p_sh = param_shardings(params, mesh)
    params = jax.device_put(params, p_sh)
    optimizer = make_optimizer(cfg)
    o_sh = opt_state_shardings(jax.eval_shape(optimizer.init, params), params, p_sh, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=o_sh)(params)
    rng = jax.device_put(jax.random.PRNGKey(cfg.seed), replicated(mesh))
    start = 0
    if cfg.resume and latest is not None:
        state, meta = ckpt.restore({"params": params, "opt_state": opt_state, "rng": rng})
        params, opt_state, rng = state["params"], state["opt_state"], state["rng"]
        start = int(meta["step"])
        try:
            it.restore(meta["data"])
        except (KeyError, TypeError) as e:
            raise CheckpointError(
                f"checkpoint step {start} in {ckpt.directory} has no valid data position: {e}"
            ) from None
    return _State(graphdef, params, opt_state, rng, p_sh, o_sh, start)


class _Loop:
    """The steps of one run, with their metrics, evaluations and checkpoints.

    Multi-process runs have one writer and one log: the lead process (index 0).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        mc: ModelConfig,
        mesh: Any,
        out: Path,
        ckpt: Checkpointer,
        data: _Data,
        state: _State,
        attention: Any,
        methods: Any,
        tail: int,
    ):
        self.cfg, self.mesh, self.ckpt, self.data, self.state = cfg, mesh, ckpt, data, state
        self.methods, self.tail = methods, tail
        self.ckpt_dir = out / "checkpoints"  # as the user named it, for messages
        self.signals = StopSignals()
        self.lead = jax.process_index() == 0
        if self.lead:
            (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
        self.log = logger.info if self.lead else (lambda *a: None)
        start = state.start
        self.metrics = MetricsFile(
            out / "metrics.jsonl", write=self.lead, resume_from=start if start else None
        )
        seq_len = cfg.effective_seq_len()
        entries = attention_entries(attention, seq_len, mc.num_heads)
        self.flops_step = cfg.batch_size * train_flops_per_sequence(mc, seq_len, entries)
        self.peak = peak_flops(cfg)
        self.tokens_step = cfg.batch_size * seq_len
        self.schedule = lr_schedule(cfg)
        self.step_jit = get_train_step(
            state.graphdef,
            attention,
            cfg,
            mesh,
            state.param_shardings,
            state.opt_shardings,
            (cfg.grad_accum, cfg.micro_batch, seq_len),
        )
        self.metrics.write(
            {
                "event": "start",
                "step": start,
                "devices": len(mesh.devices.flat),
                "mesh": dict(mesh.shape),
                "device_kind": jax.devices()[0].device_kind,
                "train_rows": len(data.train),
                "train_documents": len(data.train_docs),
                "dropped_documents": data.train.dropped_documents,
                "train_tokens": int(data.train.tokens.size),
                "eval_rows": len(data.rows),
                "attention": repr(attention)[:300],
                "attention_entries_per_head": entries,
                "flops_per_step": self.flops_step,
                "peak_flops_per_device": self.peak,
                "time": time.time(),
            }
        )
        self.losses: dict[int, float] = {}
        self.evals: list[dict[str, Any]] = []
        self.step = start
        self.saved = start  # the step of the latest checkpoint (0: none)

    def run(self) -> bool:
        """Evaluates before training (a fresh run), runs the steps up to `steps` (or
        `stop_after`), evaluating every `eval_every` and at the end. True if it stopped early
        (`stop_after`); SIGINT / SIGTERM stop it after a checkpoint (`stop_if_asked`)."""
        cfg, start = self.cfg, self.state.start
        bar = tqdm(
            total=cfg.steps,
            initial=start,
            desc="train",
            disable=not (cfg.progress and self.lead),
            dynamic_ncols=True,
            file=sys.stderr,
        )
        interrupted = False
        # log lines go through tqdm.write, above the bar
        redirect = logging_redirect_tqdm(loggers=[logging.getLogger("moa_jax")], tqdm_class=tqdm)
        with self.signals, redirect:
            try:
                if start == 0:
                    self.evaluate(0)
                for step in range(start + 1, cfg.steps + 1):
                    self.step = step
                    rec = self.train_step(step)
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{rec['loss']:.4f}",
                        lr=f"{rec['lr']:.2e}",
                        tok_s=f"{rec['tokens_per_s']:.0f}",
                    )
                    self.after_step(step, rec)
                    if cfg.stop_after and step >= cfg.stop_after:
                        interrupted = True
                        break
                    if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                        self.evaluate(step)
                if not interrupted and start < cfg.steps:
                    self.evaluate(cfg.steps)
            finally:
                bar.close()
                self.metrics.close()
                with self.signals.shielded():
                    self.ckpt.close()
        return interrupted

    def train_step(self, step: int) -> dict[str, Any]:
        """Runs one step on the next batch and writes its metrics record."""
        s, cfg = self.state, self.cfg
        batch = next(self.data.it).reshape(cfg.grad_accum, cfg.micro_batch)
        t0 = time.perf_counter()
        batch = put_batch(batch, self.mesh, 1)
        with mesh_context(self.mesh):  # the model's activation constraints see the mesh
            s.params, s.opt_state, s.rng, m = self.step_jit(s.params, s.opt_state, s.rng, batch)
        m = jax.device_get(m)
        dt = time.perf_counter() - t0
        loss = float(m["loss"])
        self.losses[step] = loss
        rec = {
            "event": "train",
            "step": step,
            "loss": loss,
            "grad_norm": float(m["grad_norm"]),
            "lr": float(self.schedule(step - 1)),
            "tokens": int(m["tokens"]),
            "step_time_s": dt,
            "tokens_per_s": self.tokens_step / dt,
            "epoch": self.data.it.epoch,
            "weights_finite": bool(m["weights_finite"]),
        }
        if self.peak:
            rec["mfu"] = self.flops_step / dt / (self.peak * len(self.mesh.devices.flat))
        self.metrics.write(rec)
        return rec

    def after_step(self, step: int, rec: dict[str, Any]) -> None:
        """Stops on a diverged step (before anything of it is saved), logs every `log_every`
        steps, checkpoints every `checkpoint_every` steps and at the last, and stops here when
        a signal asked to."""
        cfg, loss = self.cfg, rec["loss"]
        why = _divergence(rec)
        if why is not None:
            self.diverged(step, why)
        if step % cfg.log_every == 0 or step == cfg.steps:
            self.log(
                f"step {step}: loss {loss:.4f} lr {rec['lr']:.3e} grad_norm "
                f"{rec['grad_norm']:.3f} tokens/s {rec['tokens_per_s']:.0f}"
                + (f" mfu {rec['mfu']:.3f}" if self.peak else "")
            )
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps:
            self.save(step)
        self.stop_if_asked()

    def save(self, step: int) -> None:
        """Checkpoints the state after `step` (written in the background when async)."""
        s = self.state
        with self.signals.shielded():
            self.ckpt.save(
                step,
                {"params": s.params, "opt_state": s.opt_state, "rng": s.rng},
                {
                    "data": self.data.it.state(),
                    "config": dataclasses.asdict(self.cfg),
                    "time": time.time(),
                },
            )
        self.saved = step

    def stop_if_asked(self) -> None:
        """After SIGINT / SIGTERM: checkpoints the last completed step (unless it is saved),
        waits for the write and raises the signal's `KeyboardInterrupt`."""
        kind = self.signals.requested()
        if kind is None:
            return
        if self.step > self.saved:
            self.save(self.step)
        with self.signals.shielded():
            self.ckpt.wait()
        if self.saved:
            self.log(
                "stopped after step %d; its checkpoint is in %s (--resume continues from it)",
                self.step,
                self.ckpt_dir,
            )
        raise kind()

    def diverged(self, step: int, why: str) -> typing.NoReturn:
        """Raises `DivergenceError` naming the step and the last checkpoint (written first)."""
        with self.signals.shielded():
            self.ckpt.wait()
        last = self.ckpt.latest_step()
        kept = (
            f"the last good checkpoint (step {last}) is kept in {self.ckpt_dir}; --resume "
            "continues from it"
            if last is not None
            else "no checkpoint was saved before it"
        )
        raise DivergenceError(f"training diverged at step {step}: {why}; {kept}")

    def evaluate(self, step: int) -> None:
        """Held-out perplexity of the current params with every evaluation attention (then
        stops if a signal asked to)."""
        d, s = self.data, self.state
        if d.eval is None:
            return
        t0 = time.perf_counter()
        with mesh_context(self.mesh):
            res = evaluate(
                s.graphdef,
                s.params,
                d.eval,
                d.rows,
                self.methods,
                self.tail,
                self.cfg.eval_batch_size or self.cfg.micro_batch,
                self.mesh,
                s.param_shardings,
            )
        rec = {
            "event": "eval",
            "step": step,
            "eval": res,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        self.metrics.write(rec)
        self.evals.append(rec)
        line = " ".join(
            f"{k}: ppl {v['ppl']:.3f}" + (f" tail {v['ppl_tail']:.3f}" if self.tail else "")
            for k, v in res.items()
        )
        self.log("eval step %d: %s", step, line)
        self.stop_if_asked()


def _divergence(rec: dict[str, Any]) -> str | None:
    """Why a step's metrics record shows a diverged run (None: it does not)."""
    for key, name in (("loss", "loss"), ("grad_norm", "the gradient norm")):
        if not math.isfinite(rec[key]):
            return f"{name} is {rec[key]}"
    if not rec["weights_finite"]:
        return "the updated weights are not finite"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m moa_jax.train`: prints the run's summary (JSON) on stdout. Run it through
    `moa_jax.cli.run` (as `python -m` does): a user error is one line and exit 2, a diverged
    run exit 1, SIGINT / SIGTERM 130 / 143 after a checkpoint."""
    setup_logging()
    cfg = parse_config(argv)
    initialize_distributed()
    enable_compilation_cache()
    result = train(cfg)
    s = result.summary
    if s:  # the lead process's
        print(json.dumps({k: s[k] for k in s if k not in ("eval_before", "eval_after")}))
    if result.interrupted:
        logger.info("stopped after step %d (stop_after); resume with --resume", result.final_step)
    return 0
