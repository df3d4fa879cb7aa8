"""Continued pretraining: a jitted, sharded optax loop with orbax checkpoints and exact resume.

    python -m moa_jax.train --config configs/train/tiny_cpu.yaml [--flag value ...]

Every field of `TrainConfig` is a flag (`--prefix-len 8064`) and a key of the YAML config file
(`prefix_len: 8064`); flags override the file, an unknown key is an error.

What one run does (`train`):

1. Loads the model (`registry.load_model`: a preset, an HF directory or a .gguf) with the compute
   dtype `dtype` and the master-weight dtype `param_dtype` (bf16 compute, f32 weights and
   optimizer state: `dtype: bfloat16, param_dtype: float32`).
2. Reads the corpus (`moa_jax.train.data`), holds out `heldout_docs` documents (or evaluates on
   `eval_corpus`), tokenises and packs rows of `seq_len + 1` tokens.
3. Places params and optimizer state on the mesh (`parallel.param_shardings`; the AdamW moments
   mirror the params' shardings, scalars are replicated) and every batch over data x fsdp.
4. Steps: AdamW (`optax.adamw`, decay on matrices only) after global-norm clipping, learning
   rate warm-up then cosine / linear decay / constant, gradient accumulation over `grad_accum`
   micro-batches inside the jitted step (a `lax.scan`; the loss is normalised by the token count
   of the whole batch, so accumulation equals one bigger batch).
5. Logs loss, learning rate, gradient norm, tokens/s and MFU to a tqdm bar and to
   `<out_dir>/metrics.jsonl`; evaluates held-out perplexity (all positions, and the last
   `tail_len` positions, with the training attention and with dense attention) before training,
   every `eval_every` steps and at the end.
6. Checkpoints (orbax, `moa_jax.train.checkpoint`) every `checkpoint_every` steps and at the end,
   keeping `keep_checkpoints`; `--resume` continues from the latest one (params, optimizer state,
   PRNG key, step, data position) and reproduces an uninterrupted run's losses exactly.
7. Exports the final weights to an HF directory (`export_hf`) that
   `transformers.LlamaForCausalLM.from_pretrained` loads.

Attention (`attention`):
- `dense`: `TrainDenseAttention` (cuDNN flash attention on GPU in bf16; with `packing: segments`
  it masks across documents).
- `recycled`: Recycled Attention's continued-pretraining recipe (`RecycledTrainAttention.paper`):
  rows of `prefix_len + tail_len` tokens, the last `tail_len` see the `top_k` tokens selected per
  layer and KV head plus the tail. `refresh_stride > 0` uses the decoder's fixed schedule instead
  (a full row every `refresh_stride` tail tokens).
- `moa`: an MoA plan (`plan`: a file or `streaming:W:S`) through `MoAAttention`, i.e. the
  block-sparse Pallas kernel with its custom backward.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moa_jax.cli import atomic_write_text
from moa_jax.config import ModelConfig, parse_dtype
from moa_jax.models.attention import AttentionBackend
from moa_jax.parallel import MeshConfig, logical_to_spec, make_mesh, mesh_context, param_shardings
from moa_jax.train.checkpoint import Checkpointer, CheckpointError
from moa_jax.train.data import (
    PACKINGS,
    Batch,
    BatchIterator,
    PackedData,
    eval_rows,
    load_documents,
    pack,
    split_documents,
    tokenize_documents,
)
from moa_jax.train.recycled import RecycledTrainAttention, TrainDenseAttention

ATTENTIONS = ("dense", "recycled", "moa")
SCHEDULES = ("cosine", "linear", "constant")

# Peak dense bf16 matmul throughput by device kind, for MFU (FLOP/s).
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "TPU v5p": 459e12,
    "TPU v5e": 197e12,
    "TPU v4": 275e12,
    "TPU v6": 918e12,
}


def _f(default: Any, help: str, **kw: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass
class TrainConfig:
    """Every field is a CLI flag and a YAML key (see the module docstring)."""

    # --- model ---
    model: str = _f("tiny-random", "preset name, HF checkpoint directory or .gguf file")
    dtype: str = _f("float32", "compute dtype (bfloat16 for mixed precision)")
    param_dtype: str = _f("float32", "dtype of the master weights and optimizer state")
    # --- attention ---
    attention: str = _f("dense", f"training attention: {' | '.join(ATTENTIONS)}")
    attention_impl: str = _f(
        "auto",
        "kernel of full causal blocks: auto | reference | xla | "
        "cudnn | pallas (auto: cuDNN on GPU in bf16/fp16, else the jnp "
        "reference; pallas: the block-sparse kernel, all windows dense)",
    )
    prefix_len: int = _f(0, "recycled: L, the rows with full causal attention")
    tail_len: int = _f(0, "recycled: S, the rows that attend to the selected top-K + tail")
    top_k: int = _f(0, "recycled: K, tokens selected per layer and KV head")
    refresh_stride: int = _f(
        0,
        "recycled: 0 = the paper's recipe (one selection at row L); "
        "n > 0 = the decoder's schedule, every n-th tail row full",
    )
    pool_kernel: int = _f(7, "recycled: max-pool kernel over tokens before top-K")
    decode_eviction: bool = _f(
        False,
        "recycled: tail row j sees only the K - j best (the decoder's cache) instead of all K",
    )
    plan: str | None = _f(None, "moa: plan file or 'dense' / 'streaming:WINDOW[:SINK]'")
    kernel_backend: str = _f(
        "auto", "moa: sparse kernel backend auto | gpu | mgpu | tpu | reference"
    )
    # --- data ---
    corpus: str = _f("shakespeare", "built-in corpus name or local json/jsonl/parquet/txt path")
    text_field: str = _f("text", "text column of json/parquet data")
    seq_len: int = _f(0, "tokens per training row (0: prefix_len + tail_len for recycled)")
    packing: str = _f("chunk", f"row packing: {' | '.join(PACKINGS)}")
    max_documents: int = _f(0, "use only the first N documents of the corpus (0: all)")
    heldout_docs: int = _f(0, "documents of the corpus held out for evaluation")
    eval_corpus: str | None = _f(None, "evaluate on this corpus instead of the held-out documents")
    eval_sequences: int = _f(
        0, "held-out rows evaluated before, during and after training (0: no evaluation)"
    )
    eval_every: int = _f(0, "evaluate every N steps (0: only before and after)")
    eval_batch_size: int = _f(0, "rows per evaluation batch (0: the micro-batch)")
    eval_top_k: int = _f(0, "recycled evaluation K (0: top_k)")
    eval_strides: list[int] = _f(
        (0,),
        "recycled evaluation schedules: 0 = the training "
        "recipe, n > 0 = the decoder's stride-n schedule",
        nargs="*",
    )
    eval_decode_eviction: bool = _f(True, "recycled evaluation with the decoder's eviction")
    data_seed: int = _f(0, "seed of the held-out split and of the shuffling")
    # --- optimisation ---
    steps: int = _f(100, "optimizer steps")
    batch_size: int = _f(8, "sequences per optimizer step (global)")
    grad_accum: int = _f(1, "micro-batches per step (batch_size must be a multiple)")
    lr: float = _f(3e-4, "peak learning rate")
    schedule: str = _f("cosine", f"decay after warm-up: {' | '.join(SCHEDULES)}")
    warmup_steps: int = _f(0, "linear warm-up steps (step s < warmup uses lr * s / warmup)")
    min_lr_ratio: float = _f(0.0, "final learning rate as a fraction of lr")
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay (matrices only)")
    b1: float = _f(0.9, "AdamW beta1")
    b2: float = _f(0.95, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW epsilon")
    clip_norm: float = _f(1.0, "global gradient-norm clip (0: none)")
    remat: bool = _f(
        False,
        "recompute each layer's activations in the backward pass instead of "
        "keeping them (long rows of large models: memory for ~1/3 more compute)",
    )
    seed: int = _f(0, "PRNG seed of the run's key (saved and restored with checkpoints)")
    # --- mesh ---
    mesh_data: int = _f(-1, "data-parallel mesh axis (-1: the remaining devices)")
    mesh_fsdp: int = _f(1, "FSDP mesh axis (params and batch sharded)")
    mesh_tensor: int = _f(1, "tensor-parallel mesh axis (heads and MLP sharded)")
    # --- output ---
    out_dir: str = _f("out/train", "run directory: checkpoints/, metrics.jsonl, summary.json")
    checkpoint_every: int = _f(0, "save every N steps (0: only at the end); the end always saves")
    keep_checkpoints: int = _f(3, "most recent checkpoints kept")
    async_checkpointing: bool = _f(True, "write checkpoints in the background")
    resume: bool = _f(False, "continue from the latest checkpoint in out_dir")
    export_hf: str | None = _f(None, "write the final weights to this HF directory")
    export_dtype: str | None = _f(None, "dtype of the exported tensors (default: param_dtype)")
    log_every: int = _f(10, "print a metrics line every N steps")
    peak_tflops: float = _f(0.0, "peak TFLOP/s per device for MFU (0: by device kind)")
    progress: bool = _f(True, "show a progress bar")
    stop_after: int = _f(
        0,
        "stop after this step as if killed (no final checkpoint, export or "
        "evaluation); for testing resume",
    )

    def effective_seq_len(self) -> int:
        if self.seq_len:
            return self.seq_len
        if self.attention == "recycled":
            return self.prefix_len + self.tail_len
        return 0

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum


# Keys a resumed run must share with the checkpoint's run (they change the data stream, the
# model or the update rule, so the continuation would not be the same run).
_RESUME_KEYS = (
    "model",
    "dtype",
    "param_dtype",
    "attention",
    "attention_impl",
    "prefix_len",
    "tail_len",
    "top_k",
    "refresh_stride",
    "pool_kernel",
    "decode_eviction",
    "plan",
    "corpus",
    "text_field",
    "seq_len",
    "packing",
    "max_documents",
    "heldout_docs",
    "data_seed",
    "batch_size",
    "grad_accum",
    "lr",
    "schedule",
    "warmup_steps",
    "min_lr_ratio",
    "weight_decay",
    "b1",
    "b2",
    "eps",
    "clip_norm",
    "seed",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m moa_jax.train",
        description="Continued pretraining (dense, Recycled Attention or an MoA plan) with "
        "optax, orbax checkpoints and exact resume.",
    )
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        default = f.default
        if f.type in ("bool", bool):
            parser.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=help_,
            )
        elif f.metadata.get("nargs"):
            parser.add_argument(
                flag,
                dest=f.name,
                type=int,
                nargs=f.metadata["nargs"],
                default=list(default),
                help=help_,
            )
        else:
            typ = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(
                flag, dest=f.name, type=typ, default=default, help=f"{help_} (default: {default})"
            )
    return parser


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """TrainConfig from argv (`--config FILE.yaml` plus flags); unknown YAML keys are an error."""
    from moa_jax.cli import parse_args

    parser = build_parser()
    ns = vars(parse_args(parser, argv))
    ns.pop("config", None)
    ns.pop("debug", None)  # read by moa_jax.cli.run
    cfg = TrainConfig(**ns)
    # YAML may give scalars where a list is expected, and ints where floats are.
    if isinstance(cfg.eval_strides, int):
        cfg.eval_strides = [cfg.eval_strides]
    cfg.eval_strides = [int(s) for s in cfg.eval_strides]
    for name in (
        "lr",
        "min_lr_ratio",
        "weight_decay",
        "b1",
        "b2",
        "eps",
        "clip_norm",
        "peak_tflops",
    ):
        setattr(cfg, name, float(getattr(cfg, name)))
    return cfg


def validate_config(cfg: TrainConfig) -> None:
    """Checks that need neither the model nor the data; raises ValueError with the reason."""

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ValueError(msg)

    need(
        cfg.attention in ATTENTIONS, f"attention must be one of {ATTENTIONS}, got {cfg.attention!r}"
    )
    need(cfg.packing in PACKINGS, f"packing must be one of {PACKINGS}, got {cfg.packing!r}")
    need(cfg.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
    parse_dtype(cfg.dtype)
    parse_dtype(cfg.param_dtype)
    if cfg.export_dtype:
        parse_dtype(cfg.export_dtype)
    if cfg.attention == "recycled":
        need(
            cfg.prefix_len >= 1 and cfg.tail_len >= 1 and cfg.top_k >= 1,
            "attention 'recycled' needs prefix_len, tail_len and top_k >= 1 (got "
            f"{cfg.prefix_len}, {cfg.tail_len}, {cfg.top_k})",
        )
        need(
            cfg.seq_len in (0, cfg.prefix_len + cfg.tail_len),
            f"seq_len {cfg.seq_len} != prefix_len + tail_len = {cfg.prefix_len + cfg.tail_len}"
            " (leave seq_len 0 for recycled attention)",
        )
        need(cfg.refresh_stride >= 0, "refresh_stride must be >= 0")
        need(all(s >= 0 for s in cfg.eval_strides), "eval_strides must be >= 0")
    else:
        need(
            cfg.seq_len >= 1,
            f"--seq-len must be >= 1 for attention {cfg.attention!r}, got {cfg.seq_len}; e.g. "
            f"--seq-len 2048, or start from a preset: --config configs/train/tiny_cpu.yaml",
        )
    if cfg.attention == "moa":
        need(bool(cfg.plan), "attention 'moa' needs a plan (a file or 'streaming:W:S')")
    need(
        cfg.attention == "dense" or cfg.packing != "segments",
        f"packing 'segments' resets positions inside a row, which attention "
        f"{cfg.attention!r} does not support; use 'chunk' or 'concat'",
    )
    need(cfg.steps >= 1, f"steps must be >= 1, got {cfg.steps}")
    need(cfg.batch_size >= 1 and cfg.grad_accum >= 1, "batch_size and grad_accum must be >= 1")
    need(
        cfg.batch_size % cfg.grad_accum == 0,
        f"batch_size {cfg.batch_size} is not a multiple of grad_accum {cfg.grad_accum}",
    )
    need(cfg.lr > 0, f"lr must be > 0, got {cfg.lr}")
    need(cfg.warmup_steps >= 0, "warmup_steps must be >= 0")
    need(0.0 <= cfg.min_lr_ratio <= 1.0, "min_lr_ratio must be in [0, 1]")
    need(cfg.clip_norm >= 0, "clip_norm must be >= 0")
    need(
        cfg.checkpoint_every >= 0 and cfg.keep_checkpoints >= 1,
        "checkpoint_every must be >= 0 and keep_checkpoints >= 1",
    )
    need(
        cfg.eval_sequences >= 0 and cfg.eval_every >= 0 and cfg.eval_batch_size >= 0,
        "eval_sequences, eval_every and eval_batch_size must be >= 0",
    )
    need(cfg.stop_after >= 0, "stop_after must be >= 0")
    need(cfg.log_every >= 1, "log_every must be >= 1")


def check_batch_divides(cfg: TrainConfig, mesh: Mesh) -> None:
    """The micro-batch (and evaluation batch) must split evenly over data x fsdp."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.micro_batch % shards:
        raise ValueError(
            f"the micro-batch of {cfg.micro_batch} sequences (batch_size {cfg.batch_size} / "
            f"grad_accum {cfg.grad_accum}) does not divide over the mesh's data x fsdp = "
            f"{mesh.shape['data']} x {mesh.shape['fsdp']} = {shards} devices; use a multiple "
            f"of {shards}"
        )
    ebs = cfg.eval_batch_size or cfg.micro_batch
    if cfg.eval_sequences and ebs % shards:
        raise ValueError(
            f"eval_batch_size {ebs} does not divide over data x fsdp = {shards} devices"
        )


# ------------------------------------------------------------------------------------------
# Attention, optimizer, FLOPs.
# ------------------------------------------------------------------------------------------


def make_attention(
    cfg: TrainConfig,
    mc: ModelConfig,
    *,
    top_k: int | None = None,
    stride: int | None = None,
    decode_eviction: bool | None = None,
) -> AttentionBackend:
    """The training attention for model `mc` (or an evaluation variant with another K /
    stride)."""
    if cfg.attention == "dense":
        return TrainDenseAttention(cfg.attention_impl, segments=cfg.packing == "segments")
    if cfg.attention == "recycled":
        k = top_k or cfg.top_k
        s = cfg.refresh_stride if stride is None else stride
        ev = cfg.decode_eviction if decode_eviction is None else decode_eviction
        kw = dict(pool_kernel=cfg.pool_kernel, decode_eviction=ev, impl=cfg.attention_impl)
        if s:
            return RecycledTrainAttention.strided(cfg.prefix_len, cfg.tail_len, s, k, **kw)
        return RecycledTrainAttention.paper(cfg.prefix_len, cfg.tail_len, k, **kw)
    from moa_jax.models.moa_attention import MoAAttention

    return MoAAttention(
        load_plan(cfg, mc), length=cfg.effective_seq_len(), kernel_backend=cfg.kernel_backend
    )


def load_plan(cfg: TrainConfig, mc: ModelConfig):
    """The MoA plan of the config, checked against the model."""
    from moa_jax.plan import Plan

    try:
        return Plan.from_spec(cfg.plan, mc.num_layers, mc.num_heads).validate(mc)
    except FileNotFoundError as e:
        raise ValueError(f"plan {cfg.plan!r}: {e}") from None


def eval_attentions(cfg: TrainConfig, mc: ModelConfig) -> dict[str, AttentionBackend]:
    """Evaluation methods: the training attention (recycled: one per eval stride, at eval_top_k;
    with the decoder's eviction when `eval_decode_eviction` and the blocks fit in K) and dense
    attention."""
    out: dict[str, AttentionBackend] = {}
    if cfg.attention == "recycled":
        k = cfg.eval_top_k or cfg.top_k
        for s in cfg.eval_strides:
            name = f"recycled_K{k}" + (f"_stride{s}" if s else "")
            longest_block = (s - 1) if s else cfg.tail_len
            ev = cfg.eval_decode_eviction and longest_block <= k
            out[name] = make_attention(cfg, mc, top_k=k, stride=s, decode_eviction=ev)
    elif cfg.attention == "moa":
        out["moa"] = make_attention(cfg, mc)
    out["dense"] = TrainDenseAttention(cfg.attention_impl, segments=False)
    return out


def lr_schedule(cfg: TrainConfig):
    """optax-style schedule count -> lr (count 0 is step 1): warm-up lr * (count + 1) / warmup,
    then cosine / linear decay to lr * min_lr_ratio at the last step, or constant."""
    peak, warm, total, floor = cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio

    def schedule(count):
        c = jnp.asarray(count, jnp.float32)
        warm_lr = peak * jnp.minimum(1.0, (c + 1.0) / max(warm, 1))
        frac = jnp.clip((c - warm) / max(total - warm, 1), 0.0, 1.0)
        if cfg.schedule == "cosine":
            decay = floor + (1 - floor) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
        elif cfg.schedule == "linear":
            decay = 1 - (1 - floor) * frac
        else:
            decay = jnp.ones_like(frac)
        return jnp.where(c < warm, warm_lr, peak * decay)

    return schedule


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    def decay_mask(params):
        return jax.tree.map(lambda x: x.ndim >= 2, params)

    adamw = optax.adamw(
        lr_schedule(cfg),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    return adamw


def matmul_params(mc: ModelConfig) -> int:
    """Parameters used in matrix products per token (projections, MLP, LM head)."""
    e, h, kv, d, f = (
        mc.hidden_size,
        mc.num_heads,
        mc.num_kv_heads,
        mc.head_dim,
        mc.intermediate_size,
    )
    per_layer = e * h * d * 2 + e * kv * d * 2 + 3 * e * f
    return mc.num_layers * per_layer + e * mc.vocab_size


def train_flops_per_sequence(mc: ModelConfig, seq_len: int, attention_entries: int) -> float:
    """Model FLOPs of one training sequence (forward + backward = 3x forward): 6 per matmul
    parameter per token, and 4 * head_dim per kept (query, key) pair per head per layer, x3."""
    return (
        6.0 * matmul_params(mc) * seq_len
        + 12.0 * mc.num_layers * mc.num_heads * mc.head_dim * attention_entries
    )


def attention_entries(attention: AttentionBackend, seq_len: int, num_heads: int) -> int:
    """Kept (query, key) pairs per head of one sequence (mean over heads for MoA plans)."""
    fn = getattr(attention, "attention_entries", None)
    if fn is not None:
        return int(fn(seq_len))
    plan = getattr(attention, "plan", None)
    if plan is not None:
        return int(np.mean(plan.kept_entries(seq_len)))
    return seq_len * (seq_len + 1) // 2


def peak_flops(cfg: TrainConfig) -> float | None:
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops * 1e12
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return None


# ------------------------------------------------------------------------------------------
# Jitted steps (cached across `train` calls in one process: same model, attention, optimizer
# settings and mesh reuse the compiled step).
# ------------------------------------------------------------------------------------------


def loss_sums(
    graphdef: nnx.GraphDef,
    params: Any,
    batch: dict[str, jax.Array],
    attention: AttentionBackend,
    tail: int = 0,
    remat: bool = False,
) -> dict[str, jax.Array]:
    """Summed next-token NLL and token counts of a batch ([B, T] arrays); `tail` > 0 also sums
    over the last `tail` positions only; `remat` recomputes layers in the backward pass."""
    model = nnx.merge(graphdef, params)
    logits, _ = model(batch["inputs"], batch["positions"], None, attention, remat=remat)
    logz = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    nll = (logz - tgt) * batch["loss_mask"]
    out = {"nll": jnp.sum(nll), "tokens": jnp.sum(batch["loss_mask"])}
    if tail:
        out["tail_nll"] = jnp.sum(nll[:, -tail:])
        out["tail_tokens"] = jnp.sum(batch["loss_mask"][:, -tail:])
    return out


def _train_step_fn(graphdef, attention, optimizer, remat: bool = False):
    def step(params, opt_state, rng, batch):
        # batch arrays are [grad_accum, micro_batch, T].
        def micro(acc, mb):
            def f(p):
                s = loss_sums(graphdef, p, mb, attention, remat=remat)
                return s["nll"], s["tokens"]

            (nll, n), g = jax.value_and_grad(f, has_aux=True)(params)
            g_acc, nll_acc, n_acc = acc
            return (jax.tree.map(jnp.add, g_acc, g), nll_acc + nll, n_acc + n), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (g, nll, n), _ = jax.lax.scan(micro, (zeros, jnp.float32(0), jnp.float32(0)), batch)
        n = jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda x: x / n, g)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        rng, _ = jax.random.split(rng)
        return params, opt_state, rng, {"loss": nll / n, "grad_norm": grad_norm, "tokens": n}

    return step


_JIT_CACHE: dict[Any, Any] = {}


def _optimizer_key(cfg: TrainConfig) -> tuple:
    return tuple(
        getattr(cfg, k)
        for k in (
            "lr",
            "schedule",
            "warmup_steps",
            "min_lr_ratio",
            "weight_decay",
            "b1",
            "b2",
            "eps",
            "clip_norm",
            "steps",
        )
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def opt_state_shardings(opt_state: Any, params: Any, p_sh: Any, mesh: Mesh) -> Any:
    """Shardings of an optax state: every sub-tree shaped like the params (AdamW's moments) gets
    the params' shardings, everything else (step counts) is replicated."""
    ptree = jax.tree.structure(params)
    rep = replicated(mesh)

    def is_param_tree(x):
        return jax.tree.structure(x) == ptree

    return jax.tree.map(
        lambda x: p_sh if is_param_tree(x) else rep, opt_state, is_leaf=is_param_tree
    )


def batch_shardings(mesh: Mesh, shape: Sequence[int], lead: int = 0) -> NamedSharding:
    """Sharding of a batch array whose axis `lead` is the batch (over data x fsdp)."""
    axes = [None] * len(shape)
    axes[lead] = "batch"
    return NamedSharding(mesh, logical_to_spec(tuple(axes), tuple(shape), mesh))


def get_train_step(
    graphdef, attention, cfg: TrainConfig, mesh: Mesh, p_sh, o_sh, batch_shape: tuple[int, ...]
):
    key = ("train", graphdef, attention, _optimizer_key(cfg), cfg.remat, mesh, batch_shape)
    if key not in _JIT_CACHE:
        b_sh = batch_shardings(mesh, batch_shape, lead=1)
        bs = {k: b_sh for k in ("inputs", "targets", "positions", "loss_mask")}
        rep = replicated(mesh)
        _JIT_CACHE[key] = jax.jit(
            _train_step_fn(graphdef, attention, make_optimizer(cfg), cfg.remat),
            in_shardings=(p_sh, o_sh, rep, bs),
            out_shardings=(p_sh, o_sh, rep, rep),
            donate_argnums=(0, 1),
        )
    return _JIT_CACHE[key]


def get_eval_step(graphdef, attention, tail: int, mesh: Mesh, p_sh, batch_shape):
    key = ("eval", graphdef, attention, tail, mesh, batch_shape)
    if key not in _JIT_CACHE:
        b_sh = batch_shardings(mesh, batch_shape, lead=0)
        bs = {k: b_sh for k in ("inputs", "targets", "positions", "loss_mask")}
        _JIT_CACHE[key] = jax.jit(
            lambda params, batch: loss_sums(graphdef, params, batch, attention, tail),
            in_shardings=(p_sh, bs),
            out_shardings=replicated(mesh),
        )
    return _JIT_CACHE[key]


def _put_batch(batch: Batch, mesh: Mesh, lead: int) -> dict[str, jax.Array]:
    d = batch.as_dict()
    sh = batch_shardings(mesh, d["inputs"].shape, lead)
    return {k: jax.device_put(v, sh) for k, v in d.items()}


def evaluate(
    graphdef,
    params,
    data: PackedData,
    rows: np.ndarray,
    methods: dict[str, Any],
    tail: int,
    batch_size: int,
    mesh: Mesh,
    p_sh,
) -> dict[str, dict[str, float]]:
    """Mean NLL and perplexity of the rows under each attention method (all positions, and the
    last `tail` positions when tail > 0)."""
    out = {}
    pad = (-len(rows)) % batch_size
    rows_p = np.concatenate([rows, np.repeat(rows[:1], pad)]) if pad else rows
    for name, attention in methods.items():
        sums: dict[str, float] = {}
        for i in range(0, len(rows_p), batch_size):
            b = data.batch(rows_p[i : i + batch_size])
            if i + batch_size > len(rows):  # padding rows count for nothing
                b.loss_mask[len(rows) - i :] = 0.0
            fn = get_eval_step(graphdef, attention, tail, mesh, p_sh, b.inputs.shape)
            res = jax.device_get(fn(params, _put_batch(b, mesh, 0)))
            for k, v in res.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        m = {"loss": sums["nll"] / max(sums["tokens"], 1.0), "tokens": sums["tokens"]}
        m["ppl"] = math.exp(m["loss"])
        if tail:
            m["loss_tail"] = sums["tail_nll"] / max(sums["tail_tokens"], 1.0)
            m["ppl_tail"] = math.exp(m["loss_tail"])
            m["tail_tokens"] = sums["tail_tokens"]
        out[name] = m
    return out


# ------------------------------------------------------------------------------------------
# The run.
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
    out_dir: Path
    losses: dict[int, float]  # step -> loss of the steps run by this call
    final_step: int
    interrupted: bool
    evals: list[dict[str, Any]]  # eval records written by this call
    summary: dict[str, Any]


class _Metrics:
    """metrics.jsonl, written by the lead process only (the others run the same steps).

    `resume_from`: the checkpoint step a run continues from. Records of later steps (written
    after that checkpoint by the run that was interrupted, and about to be written again) and a
    half-written last line are dropped first, so every step has one record.
    """

    def __init__(self, path: Path, write: bool = True, resume_from: int | None = None):
        self.path = path
        if write and resume_from is not None and path.is_file():
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and rec.get("step", 0) <= resume_from:
                    kept.append(line)
            atomic_write_text(path, "".join(x + "\n" for x in kept))
        self.f = open(path, "a", encoding="utf-8") if write else None

    def write(self, record: dict[str, Any]) -> None:
        if self.f is not None:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()

    def read(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def _check_resume_config(saved: dict[str, Any], cfg: TrainConfig, where: Path) -> None:
    now = dataclasses.asdict(cfg)
    diff = [k for k in _RESUME_KEYS if k in saved and saved[k] != now[k]]
    if diff:
        detail = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in diff)
        raise ValueError(
            f"--resume with settings that differ from the checkpoint's run in "
            f"{where} ({detail}); the continuation would not be the same run. "
            "Use the original settings or a new out_dir."
        )
    if "steps" in saved and saved["steps"] != cfg.steps:
        print(
            f"warning: steps changed from {saved['steps']} to {cfg.steps} on resume: the "
            "learning-rate schedule after the checkpoint differs from the original run's",
            file=sys.stderr,
        )


def export_hf(
    graphdef, params, path: str | Path, *, dtype: str | None = None, tokenizer: Any = None
) -> Path:
    """Writes the params as an HF Llama directory (`weights.save_hf`)."""
    from moa_jax.models.hf_weights import save_hf

    model = nnx.merge(graphdef, jax.device_get(params))
    save_hf(model, path, dtype=dtype, tokenizer=tokenizer)
    return Path(path)


def train(cfg: TrainConfig, *, devices: Sequence[Any] | None = None) -> TrainResult:
    """Runs (or resumes) a training run; see the module docstring."""
    from tqdm.auto import tqdm

    from moa_jax.models.registry import load_model

    validate_config(cfg)
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out-dir {out} is a file, not a directory")
    mesh = make_mesh(MeshConfig(cfg.mesh_data, cfg.mesh_fsdp, cfg.mesh_tensor), devices)
    check_batch_divides(cfg, mesh)
    # the run folder is made once the corpus and the model have loaded (a bad input leaves
    # none); an existing run's checkpoints are checked first, without creating anything
    ckpt = None
    if (out / "checkpoints").is_dir():
        ckpt = Checkpointer(
            out / "checkpoints", keep=cfg.keep_checkpoints, async_save=cfg.async_checkpointing
        )
    latest = ckpt.latest_step() if ckpt is not None else None
    if latest is not None and not cfg.resume:
        raise ValueError(
            f"{out} already holds checkpoints (latest step {latest}); pass "
            "--resume to continue that run, or choose another --out-dir"
        )
    if cfg.resume and latest is not None and (out / "config.json").is_file():
        _check_resume_config(json.loads((out / "config.json").read_text()), cfg, out)

    seq_len = cfg.effective_seq_len()
    # Data first: a missing corpus fails before the model is loaded.
    docs = load_documents(cfg.corpus, text_field=cfg.text_field, max_documents=cfg.max_documents)
    train_docs, held = split_documents(docs, cfg.heldout_docs, cfg.data_seed)
    eval_docs = (
        load_documents(cfg.eval_corpus, text_field=cfg.text_field)
        if cfg.eval_corpus and cfg.eval_sequences
        else held
    )
    if cfg.eval_sequences and not eval_docs:
        raise ValueError("eval_sequences > 0 needs heldout_docs > 0 or an eval_corpus")

    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    mc = model.config
    if tokenizer is None:
        raise ValueError(f"model {cfg.model!r} comes without a tokenizer; training needs one")
    out.mkdir(parents=True, exist_ok=True)
    if ckpt is None:
        ckpt = Checkpointer(
            out / "checkpoints", keep=cfg.keep_checkpoints, async_save=cfg.async_checkpointing
        )
    if seq_len > mc.max_position_embeddings:
        print(
            f"warning: seq_len {seq_len} exceeds the model's max_position_embeddings "
            f"{mc.max_position_embeddings}",
            file=sys.stderr,
        )
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
    eval_data, rows = None, np.zeros((0,), np.int64)
    if cfg.eval_sequences:
        eval_data = pack(tokenize_documents(eval_docs, tokenizer), seq_len, "chunk", eos)
        rows = eval_rows(eval_data, cfg.eval_sequences)
        if not len(rows):
            raise ValueError(
                f"no evaluation rows: every evaluation document is shorter than "
                f"{seq_len + 1} tokens"
            )

    attention = make_attention(cfg, mc)
    methods = eval_attentions(cfg, mc)
    tail = cfg.tail_len if cfg.attention == "recycled" else 0

    graphdef, params = nnx.split(model)
    del model
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
    elif cfg.resume:
        print(f"--resume: no checkpoint in {ckpt.directory}, starting from step 0", file=sys.stderr)
    lead = jax.process_index() == 0  # multi-process runs: one writer, one log
    if lead:
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
    log = tqdm.write if lead else (lambda *a, **k: None)
    metrics = _Metrics(out / "metrics.jsonl", write=lead, resume_from=start if start else None)
    ebs = cfg.eval_batch_size or cfg.micro_batch
    entries = attention_entries(attention, seq_len, mc.num_heads)
    flops_step = cfg.batch_size * train_flops_per_sequence(mc, seq_len, entries)
    peak = peak_flops(cfg)
    tokens_step = cfg.batch_size * seq_len
    schedule = lr_schedule(cfg)
    step_jit = get_train_step(
        graphdef, attention, cfg, mesh, p_sh, o_sh, (cfg.grad_accum, cfg.micro_batch, seq_len)
    )

    def step_fn(*args):
        with mesh_context(mesh):  # the model's activation constraints see the mesh
            return step_jit(*args)

    info = {
        "event": "start",
        "step": start,
        "devices": len(mesh.devices.flat),
        "mesh": dict(mesh.shape),
        "device_kind": jax.devices()[0].device_kind,
        "train_rows": len(train_data),
        "train_documents": len(train_docs),
        "dropped_documents": train_data.dropped_documents,
        "train_tokens": int(train_data.tokens.size),
        "eval_rows": len(rows),
        "attention": repr(attention)[:300],
        "attention_entries_per_head": entries,
        "flops_per_step": flops_step,
        "peak_flops_per_device": peak,
        "time": time.time(),
    }
    metrics.write(info)

    evals: list[dict[str, Any]] = []

    def run_eval(step: int) -> None:
        if eval_data is None:
            return
        t0 = time.perf_counter()
        with mesh_context(mesh):
            res = evaluate(graphdef, params, eval_data, rows, methods, tail, ebs, mesh, p_sh)
        rec = {
            "event": "eval",
            "step": step,
            "eval": res,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        metrics.write(rec)
        evals.append(rec)
        line = " ".join(
            f"{k}: ppl {v['ppl']:.3f}" + (f" tail {v['ppl_tail']:.3f}" if tail else "")
            for k, v in res.items()
        )
        log(f"eval step {step}: {line}")

    if start == 0:
        run_eval(0)
    losses: dict[int, float] = {}
    interrupted = False
    bar = tqdm(
        total=cfg.steps,
        initial=start,
        desc="train",
        disable=not (cfg.progress and lead),
        dynamic_ncols=True,
        file=sys.stderr,
    )
    step = start
    try:
        for step in range(start + 1, cfg.steps + 1):
            batch = next(it).reshape(cfg.grad_accum, cfg.micro_batch)
            t0 = time.perf_counter()
            params, opt_state, rng, m = step_fn(params, opt_state, rng, _put_batch(batch, mesh, 1))
            m = jax.device_get(m)
            dt = time.perf_counter() - t0
            loss = float(m["loss"])
            losses[step] = loss
            rec = {
                "event": "train",
                "step": step,
                "loss": loss,
                "grad_norm": float(m["grad_norm"]),
                "lr": float(schedule(step - 1)),
                "tokens": int(m["tokens"]),
                "step_time_s": dt,
                "tokens_per_s": tokens_step / dt,
                "epoch": it.epoch,
            }
            if peak:
                rec["mfu"] = flops_step / dt / (peak * len(mesh.devices.flat))
            metrics.write(rec)
            bar.update(1)
            bar.set_postfix(
                loss=f"{loss:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}"
            )
            if step % cfg.log_every == 0 or step == cfg.steps:
                log(
                    f"step {step}: loss {loss:.4f} lr {rec['lr']:.3e} grad_norm "
                    f"{rec['grad_norm']:.3f} tokens/s {rec['tokens_per_s']:.0f}"
                    + (f" mfu {rec['mfu']:.3f}" if peak else "")
                )
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step}")
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps:
                ckpt.save(
                    step,
                    {"params": params, "opt_state": opt_state, "rng": rng},
                    {"data": it.state(), "config": dataclasses.asdict(cfg), "time": time.time()},
                )
            if cfg.stop_after and step >= cfg.stop_after and step < cfg.steps:
                interrupted = True
                break
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                run_eval(step)
        if not interrupted and start < cfg.steps:
            run_eval(cfg.steps)
    finally:
        bar.close()
        ckpt.close()
        metrics.close()

    if not interrupted and cfg.export_hf:
        if jax.process_count() > 1:  # every process takes part in the gather
            from jax.experimental import multihost_utils

            params = multihost_utils.process_allgather(params, tiled=True)
        if lead:
            export_hf(
                graphdef,
                params,
                cfg.export_hf,
                dtype=cfg.export_dtype or cfg.param_dtype,
                tokenizer=tokenizer,
            )
            log(f"exported HF checkpoint to {cfg.export_hf}")
    if lead:
        summary = _summary(out, cfg)
        if not interrupted:
            (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    else:
        summary = {}
    return TrainResult(out, losses, step, interrupted, evals, summary)


def _summary(out: Path, cfg: TrainConfig) -> dict[str, Any]:
    """Before / after evaluation and throughput from the run's metrics.jsonl."""
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    evals = [r for r in records if r.get("event") == "eval"]
    train_recs = [r for r in records if r.get("event") == "train"]
    # The first step of each process compiles; leave it out of the throughput.
    starts = {r["step"] + 1 for r in records if r.get("event") == "start"}
    timed = [r for r in train_recs if r["step"] not in starts]
    s: dict[str, Any] = {
        "steps": max((r["step"] for r in train_recs), default=0),
        "final_loss": train_recs[-1]["loss"] if train_recs else None,
    }
    if evals:
        s["eval_before"] = next((e["eval"] for e in evals if e["step"] == 0), None)
        s["eval_after"] = evals[-1]["eval"] if evals[-1]["step"] == cfg.steps else None
    if timed:
        s["tokens_per_s_median"] = float(np.median([r["tokens_per_s"] for r in timed]))
        s["step_time_s_median"] = float(np.median([r["step_time_s"] for r in timed]))
        if "mfu" in timed[0]:
            s["mfu_median"] = float(np.median([r["mfu"] for r in timed]))
    return s


def main(argv: Sequence[str] | None = None) -> int:
    from moa_jax.cli import enable_compilation_cache
    from moa_jax.parallel import initialize_distributed

    cfg = parse_config(argv)
    try:
        initialize_distributed()
        enable_compilation_cache()
        result = train(cfg)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = result.summary
    if s:  # the lead process's
        print(json.dumps({k: s[k] for k in s if k not in ("eval_before", "eval_after")}))
    if result.interrupted:
        print(
            f"stopped after step {result.final_step} (stop_after); resume with --resume",
            file=sys.stderr,
        )
    return 0
