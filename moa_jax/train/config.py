"""The training run's typed config: `TrainConfig` (every field is a CLI flag and a YAML key),
its checks (`validate_config`, `check_batch_divides`) and the keys a resumed run must keep
(`RESUME_KEYS`, `check_resume_config`).

    python -m moa_jax.train --config configs/train/tiny_cpu.yaml [--flag value ...]

Every field of `TrainConfig` is a flag (`--prefix-len 8064`) and a key of the YAML config file
(`prefix_len: 8064`); flags override the file, an unknown key is an error. YAML values go
through the flag's type (`lr: 1` is 1.0, `eval_strides: 0` is [0]).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jax.sharding import Mesh

from moa_jax.cli import MODEL_HELP, option
from moa_jax.cli import parse_config as parse_typed_config
from moa_jax.config import parse_dtype
from moa_jax.methods import trainable
from moa_jax.pallas_kernels import BACKENDS
from moa_jax.train.data import PACKINGS

# the registered methods with a training form (`moa_jax.methods`)
ATTENTIONS = tuple(trainable())
SCHEDULES = ("cosine", "linear", "constant")

PROG = "python -m moa_jax.train"
DESCRIPTION = (
    "Continued pretraining (dense, Recycled Attention or an MoA plan) with optax, orbax "
    "checkpoints and exact resume."
)


@dataclasses.dataclass
class TrainConfig:
    """Every field is a CLI flag and a YAML key (see the module docstring)."""

    # --- model ---
    model: str = option("tiny-random", MODEL_HELP)
    dtype: str = option("float32", "compute dtype (bfloat16 for mixed precision)")
    param_dtype: str = option("float32", "dtype of the master weights and optimizer state")
    # --- attention ---
    attention: str = option(
        "dense",
        f"training attention: a method with a training form ({' | '.join(ATTENTIONS)})",
    )
    method: str | None = option(
        None, "the same as --attention (the name every command takes); sets attention"
    )
    attention_impl: str = option(
        "auto",
        "kernel of full causal blocks: auto | reference | xla | "
        "cudnn | pallas (auto: cuDNN on GPU in bf16/fp16, else the jnp "
        "reference; pallas: the block-sparse kernel, all windows dense)",
    )
    prefix_len: int = option(0, "recycled: L, the rows with full causal attention")
    tail_len: int = option(0, "recycled: S, the rows that attend to the selected top-K + tail")
    top_k: int = option(0, "recycled: K, tokens selected per layer and KV head")
    refresh_stride: int = option(
        0,
        "recycled: 0 = the paper's recipe (one selection at row L); "
        "n > 0 = the decoder's schedule, every n-th tail row full",
    )
    pool_kernel: int = option(7, "recycled: max-pool kernel over tokens before top-K")
    decode_eviction: bool = option(
        False,
        "recycled: tail row j sees only the K - j best (the decoder's cache) instead of all K",
    )
    plan: str | None = option(None, "moa: plan file or 'dense' / 'streaming:WINDOW[:SINK]'")
    kernel_backend: str = option(
        "auto",
        "moa: Pallas kernel backend (falls back in order where one cannot run)",
        choices=list(BACKENDS),
    )
    # --- data ---
    corpus: str = option("shakespeare", "built-in corpus name or local json/jsonl/parquet/txt path")
    text_field: str = option("text", "text column of json/parquet data")
    seq_len: int = option(0, "tokens per training row (0: prefix_len + tail_len for recycled)")
    packing: str = option("chunk", f"row packing: {' | '.join(PACKINGS)}")
    max_documents: int = option(0, "use only the first N documents of the corpus (0: all)")
    heldout_docs: int = option(0, "documents of the corpus held out for evaluation")
    eval_corpus: str | None = option(
        None, "evaluate on this corpus instead of the held-out documents"
    )
    eval_sequences: int = option(
        0, "held-out rows evaluated before, during and after training (0: no evaluation)"
    )
    eval_every: int = option(0, "evaluate every N steps (0: only before and after)")
    eval_batch_size: int = option(0, "rows per evaluation batch (0: the micro-batch)")
    eval_top_k: int = option(0, "recycled evaluation K (0: top_k)")
    eval_strides: list[int] = option(
        (0,),
        "recycled evaluation schedules: 0 = the training "
        "recipe, n > 0 = the decoder's stride-n schedule",
        nargs="*",
    )
    eval_decode_eviction: bool = option(True, "recycled evaluation with the decoder's eviction")
    data_seed: int = option(0, "seed of the held-out split and of the shuffling")
    # --- optimisation ---
    steps: int = option(100, "optimizer steps")
    batch_size: int = option(8, "sequences per optimizer step (global)")
    grad_accum: int = option(1, "micro-batches per step (batch_size must be a multiple)")
    lr: float = option(3e-4, "peak learning rate")
    schedule: str = option("cosine", f"decay after warm-up: {' | '.join(SCHEDULES)}")
    warmup_steps: int = option(0, "linear warm-up steps (step s < warmup uses lr * s / warmup)")
    min_lr_ratio: float = option(0.0, "final learning rate as a fraction of lr")
    weight_decay: float = option(0.0, "AdamW decoupled weight decay (matrices only)")
    b1: float = option(0.9, "AdamW beta1")
    b2: float = option(0.95, "AdamW beta2")
    eps: float = option(1e-8, "AdamW epsilon")
    clip_norm: float = option(1.0, "global gradient-norm clip (0: none)")
    remat: bool = option(
        False,
        "recompute each layer's activations in the backward pass instead of "
        "keeping them (long rows of large models: memory for ~1/3 more compute)",
    )
    seed: int = option(0, "PRNG seed of the run's key (saved and restored with checkpoints)")
    # --- mesh ---
    mesh_data: int = option(-1, "data-parallel mesh axis (-1: the remaining devices)")
    mesh_fsdp: int = option(1, "FSDP mesh axis (params and batch sharded)")
    mesh_tensor: int = option(1, "tensor-parallel mesh axis (heads and MLP sharded)")
    # --- output ---
    out_dir: str = option("out/train", "run directory: checkpoints/, metrics.jsonl, summary.json")
    checkpoint_every: int = option(
        0, "save every N steps (0: only at the end); the end always saves"
    )
    keep_checkpoints: int = option(3, "most recent checkpoints kept")
    async_checkpointing: bool = option(True, "write checkpoints in the background")
    resume: bool = option(False, "continue from the latest checkpoint in out_dir")
    export_hf: str | None = option(None, "write the final weights to this HF directory")
    export_dtype: str | None = option(None, "dtype of the exported tensors (default: param_dtype)")
    log_every: int = option(10, "log a metrics line every N steps")
    peak_tflops: float = option(0.0, "peak TFLOP/s per device for MFU (0: by device kind)")
    progress: bool = option(True, "show a progress bar")
    stop_after: int = option(
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
RESUME_KEYS = (
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


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """TrainConfig from argv (`--config FILE.yaml` plus flags); unknown YAML keys are an error."""
    cfg = parse_typed_config(TrainConfig, argv, prog=PROG, description=DESCRIPTION)
    if cfg.method is not None:
        if cfg.method != cfg.attention and cfg.attention != "dense":
            raise ValueError(f"--method {cfg.method} and attention {cfg.attention} disagree")
        cfg = dataclasses.replace(cfg, attention=cfg.method, method=None)
    return cfg


def validate_config(cfg: TrainConfig) -> None:
    """Checks that need neither the model nor the data; raises ValueError with the reason."""

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ValueError(msg)

    need(
        cfg.attention in trainable(),
        f"attention must be one of {tuple(trainable())}, got {cfg.attention!r}",
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


def check_resume_config(saved: dict[str, Any], cfg: TrainConfig, where: Path) -> None:
    """Raises ValueError when `cfg` differs from the checkpoint's run (`saved`, its config.json)
    in a `RESUME_KEYS` key; warns when only the step count changed."""
    now = dataclasses.asdict(cfg)
    diff = [k for k in RESUME_KEYS if k in saved and saved[k] != now[k]]
    if diff:
        detail = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in diff)
        raise ValueError(
            f"--resume with settings that differ from the checkpoint's run in "
            f"{where} ({detail}); the continuation would not be the same run. "
            "Use the original settings or a new out_dir."
        )
    if "steps" in saved and saved["steps"] != cfg.steps:
        warnings.warn(
            f"steps changed from {saved['steps']} to {cfg.steps} on resume: the "
            "learning-rate schedule after the checkpoint differs from the original run's",
            stacklevel=2,
        )
