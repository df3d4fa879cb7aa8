"""The training run's typed config: `TrainConfig` (every field is a CLI flag and a YAML key,
with its declared domain; the rules between fields are its `relations`), the check that needs the
mesh (`check_batch_divides`) and the keys a resumed run must keep (`RESUME_KEYS`,
`check_resume_config`).

    python -m moa_jax.train --config configs/train/tiny_cpu.yaml [--flag value ...]

Every field of `TrainConfig` is a flag (`--prefix-len 8064`) and a key of the YAML config file
(`prefix_len: 8064`); flags override the file, an unknown key is an error. A value outside its
domain (`--lr inf`, `--b1 1`, `--batch-size 0`) or a combination the relations refuse
(`--batch-size 6 --grad-accum 4`) is a `ConfigError` naming the flag, for the flag, the YAML key
and a `TrainConfig(...)` built in Python alike.
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
from moa_jax.config import DTYPE_NAMES
from moa_jax.domains import (
    NON_NEGATIVE,
    POSITIVE,
    PROBABILITY,
    TEXT,
    Choice,
    Domain,
    Float,
    Int,
    Options,
    Relation,
)
from moa_jax.errors import ConfigError
from moa_jax.methods import trainable
from moa_jax.models.dense_attention import ATTENTION_IMPLS
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

DTYPE = Choice(*DTYPE_NAMES)
SEED = Int(0, 2**32 - 1)
MESH_AXIS = Int(-1)
"""A mesh axis size: -1 (the remaining devices) or >= 1 (0 is refused by a relation)."""
BETA = Float(0.0, 1.0, hi_open=True)
"""An AdamW moment decay in [0, 1): 1 would never update the moment, > 1 diverges."""
STRIDES = Domain(int, lo=0, distinct=True)


def _recycled_blocks_fit_k(c: TrainConfig) -> bool:
    """The decoder's eviction needs every recycled block to be at most K rows: the tail (the
    paper's recipe) or the rows between two full rows (`refresh_stride`)."""
    longest = (c.refresh_stride - 1) if c.refresh_stride else c.tail_len
    return longest <= c.top_k


_MESH_FIELDS = ("mesh_data", "mesh_fsdp", "mesh_tensor")

RELATIONS = (
    Relation(
        ("method", "attention"),
        lambda c: c.method is None or c.attention in ("dense", c.method),
        "--method and --attention name different methods (--method is another name of "
        "--attention: give one of them)",
    ),
    Relation(
        ("batch_size", "grad_accum"),
        lambda c: c.batch_size % c.grad_accum == 0,
        "--batch-size must be a multiple of --grad-accum (the step's micro-batches are "
        "batch_size / grad_accum rows each)",
    ),
    Relation(
        ("attention", "prefix_len", "tail_len", "top_k"),
        lambda c: c.training_attention != "recycled" or min(c.prefix_len, c.tail_len, c.top_k) >= 1,
        "--attention recycled needs --prefix-len, --tail-len and --top-k >= 1",
    ),
    Relation(
        ("attention", "top_k", "eval_top_k", "prefix_len"),
        lambda c: c.training_attention != "recycled" or max(c.top_k, c.eval_top_k) <= c.prefix_len,
        "--top-k and --eval-top-k must be at most --prefix-len (K of the L prefix tokens)",
    ),
    Relation(
        ("attention", "seq_len", "prefix_len", "tail_len"),
        lambda c: c.training_attention != "recycled" or c.seq_len in (0, c.prefix_len + c.tail_len),
        "--seq-len must be 0 or --prefix-len + --tail-len with --attention recycled (leave it 0)",
    ),
    Relation(
        ("attention", "seq_len"),
        lambda c: c.training_attention == "recycled" or c.seq_len >= 1,
        "--seq-len must be >= 1 (0 means prefix_len + tail_len, for --attention recycled only); "
        "e.g. --seq-len 2048, or start from a preset: --config configs/train/tiny_cpu.yaml",
    ),
    Relation(
        ("attention", "plan"),
        lambda c: c.training_attention != "moa" or c.plan is not None,
        "--attention moa needs --plan (a plan file, 'dense' or 'streaming:WINDOW[:SINK]')",
    ),
    Relation(
        ("attention", "plan"),
        lambda c: c.plan is None or c.training_attention == "moa",
        "--plan is a plan of --attention moa; pass --attention moa or leave out --plan",
    ),
    Relation(
        ("attention", "packing"),
        lambda c: c.packing != "segments" or c.training_attention == "dense",
        "--packing segments restarts positions inside a row, which only --attention dense "
        "supports; use --packing chunk or concat",
    ),
    Relation(
        ("pool_kernel",),
        lambda c: c.pool_kernel % 2 == 1,
        "--pool-kernel must be odd (1: no pooling)",
    ),
    Relation(
        ("decode_eviction", "tail_len", "refresh_stride", "top_k"),
        lambda c: (
            not (c.decode_eviction and c.training_attention == "recycled")
            or _recycled_blocks_fit_k(c)
        ),
        "--decode-eviction needs every recycled block within --top-k rows: --tail-len <= "
        "--top-k (or, with --refresh-stride N, N - 1 <= --top-k)",
    ),
    Relation(
        ("eval_sequences", "heldout_docs", "eval_corpus"),
        lambda c: c.eval_sequences == 0 or c.heldout_docs > 0 or c.eval_corpus is not None,
        "--eval-sequences > 0 needs --heldout-docs > 0 or an --eval-corpus",
    ),
    Relation(
        _MESH_FIELDS,
        lambda c: all(getattr(c, f) != 0 for f in _MESH_FIELDS),
        "--mesh-data, --mesh-fsdp and --mesh-tensor must be -1 (the remaining devices) or >= 1",
    ),
    Relation(
        _MESH_FIELDS,
        lambda c: sum(getattr(c, f) == -1 for f in _MESH_FIELDS) <= 1,
        "at most one of --mesh-data, --mesh-fsdp and --mesh-tensor may be -1",
    ),
    Relation(
        ("stop_after", "steps"),
        lambda c: c.stop_after < c.steps,
        "--stop-after must be smaller than --steps (0: run to the end)",
    ),
)


@dataclasses.dataclass(frozen=True)
class TrainConfig(Options):
    """Every field is a CLI flag and a YAML key (see the module docstring). `method`, when
    given, becomes `attention` (and `method` None) once the fields are checked."""

    relations = RELATIONS

    # --- model ---
    model: str = option("tiny-random", MODEL_HELP, TEXT)
    dtype: str = option("float32", "compute dtype (bfloat16 for mixed precision)", DTYPE)
    param_dtype: str = option("float32", "dtype of the master weights and optimizer state", DTYPE)
    beyond_context: bool = option(
        False, "allow rows longer than the model's trained context (max_position_embeddings)"
    )
    # --- attention ---
    attention: str = option(
        "dense",
        f"training attention: a method with a training form ({' | '.join(ATTENTIONS)})",
        Choice(*ATTENTIONS),
    )
    method: str | None = option(
        None,
        "the same as --attention (the name every command takes); sets attention",
        Choice(*ATTENTIONS),
    )
    attention_impl: str = option(
        "auto",
        "kernel of full causal blocks: auto | reference | xla | "
        "cudnn | pallas (auto: cuDNN on GPU in bf16/fp16, else the jnp "
        "reference; pallas: the block-sparse kernel, all windows dense)",
        Choice(*ATTENTION_IMPLS),
    )
    prefix_len: int = option(0, "recycled: L, the rows with full causal attention", NON_NEGATIVE)
    tail_len: int = option(
        0, "recycled: S, the rows that attend to the selected top-K + tail", NON_NEGATIVE
    )
    top_k: int = option(0, "recycled: K, tokens selected per layer and KV head", NON_NEGATIVE)
    refresh_stride: int = option(
        0,
        "recycled: 0 = the paper's recipe (one selection at row L); "
        "n > 0 = the decoder's schedule, every n-th tail row full",
        NON_NEGATIVE,
    )
    pool_kernel: int = option(
        7, "recycled: max-pool kernel over tokens before top-K (odd; 1: none)", POSITIVE
    )
    decode_eviction: bool = option(
        False,
        "recycled: tail row j sees only the K - j best (the decoder's cache) instead of all K",
    )
    plan: str | None = option(None, "moa: plan file or 'dense' / 'streaming:WINDOW[:SINK]'", TEXT)
    kernel_backend: str = option(
        "auto",
        "moa: Pallas kernel backend (falls back in order where one cannot run)",
        Choice(*BACKENDS),
    )
    # --- data ---
    corpus: str = option(
        "shakespeare", "built-in corpus name or local json/jsonl/parquet/txt path", TEXT
    )
    text_field: str = option("text", "text column of json/parquet data", TEXT)
    seq_len: int = option(
        0, "tokens per training row (0: prefix_len + tail_len for recycled)", NON_NEGATIVE
    )
    packing: str = option("chunk", f"row packing: {' | '.join(PACKINGS)}", Choice(*PACKINGS))
    max_documents: int = option(
        0, "use only the first N documents of the corpus (0: all)", NON_NEGATIVE
    )
    heldout_docs: int = option(0, "documents of the corpus held out for evaluation", NON_NEGATIVE)
    eval_corpus: str | None = option(
        None, "evaluate on this corpus instead of the held-out documents", TEXT
    )
    eval_sequences: int = option(
        0,
        "held-out rows evaluated before, during and after training (0: no evaluation)",
        NON_NEGATIVE,
    )
    eval_every: int = option(0, "evaluate every N steps (0: only before and after)", NON_NEGATIVE)
    eval_batch_size: int = option(0, "rows per evaluation batch (0: the micro-batch)", NON_NEGATIVE)
    eval_top_k: int = option(0, "recycled evaluation K (0: top_k)", NON_NEGATIVE)
    eval_strides: list[int] = option(
        (0,),
        "recycled evaluation schedules: 0 = the training "
        "recipe, n > 0 = the decoder's stride-n schedule",
        STRIDES,
        nargs="*",
    )
    eval_decode_eviction: bool = option(True, "recycled evaluation with the decoder's eviction")
    data_seed: int = option(0, "seed of the held-out split and of the shuffling", SEED)
    # --- optimisation ---
    steps: int = option(100, "optimizer steps", POSITIVE)
    batch_size: int = option(8, "sequences per optimizer step (global)", POSITIVE)
    grad_accum: int = option(1, "micro-batches per step (batch_size must be a multiple)", POSITIVE)
    lr: float = option(3e-4, "peak learning rate", Float(0.0, lo_open=True))
    schedule: str = option(
        "cosine", f"decay after warm-up: {' | '.join(SCHEDULES)}", Choice(*SCHEDULES)
    )
    warmup_steps: int = option(
        0,
        "linear warm-up steps (step s < warmup uses lr * s / warmup; longer than --steps: the "
        "run ends before the peak)",
        NON_NEGATIVE,
    )
    min_lr_ratio: float = option(0.0, "final learning rate as a fraction of lr", PROBABILITY)
    weight_decay: float = option(0.0, "AdamW decoupled weight decay (matrices only)", Float(0.0))
    b1: float = option(0.9, "AdamW beta1", BETA)
    b2: float = option(0.95, "AdamW beta2", BETA)
    eps: float = option(1e-8, "AdamW epsilon", Float(0.0, lo_open=True))
    clip_norm: float = option(1.0, "global gradient-norm clip (0: none)", Float(0.0))
    remat: bool = option(
        False,
        "recompute each layer's activations in the backward pass instead of "
        "keeping them (long rows of large models: memory for ~1/3 more compute)",
    )
    seed: int = option(0, "PRNG seed of the run's key (saved and restored with checkpoints)", SEED)
    # --- mesh ---
    mesh_data: int = option(-1, "data-parallel mesh axis (-1: the remaining devices)", MESH_AXIS)
    mesh_fsdp: int = option(1, "FSDP mesh axis (params and batch sharded; -1: the rest)", MESH_AXIS)
    mesh_tensor: int = option(
        1, "tensor-parallel mesh axis (heads and MLP sharded; -1: the rest)", MESH_AXIS
    )
    # --- output ---
    out_dir: str = option(
        "out/train", "run directory: checkpoints/, metrics.jsonl, summary.json", TEXT
    )
    checkpoint_every: int = option(
        0, "save every N steps (0: only at the end); the end always saves", NON_NEGATIVE
    )
    keep_checkpoints: int = option(3, "most recent checkpoints kept", POSITIVE)
    async_checkpointing: bool = option(True, "write checkpoints in the background")
    resume: bool = option(False, "continue from the latest checkpoint in out_dir")
    export_hf: str | None = option(None, "write the final weights to this HF directory", TEXT)
    export_dtype: str | None = option(
        None, "dtype of the exported tensors (default: param_dtype)", DTYPE
    )
    log_every: int = option(10, "log a metrics line every N steps", POSITIVE)
    peak_tflops: float = option(
        0.0, "peak TFLOP/s per device for MFU (0: by device kind)", Float(0.0)
    )
    progress: bool = option(True, "show a progress bar")
    stop_after: int = option(
        0,
        "stop after this step as if killed (no final checkpoint, export or "
        "evaluation); for testing resume",
        NON_NEGATIVE,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method is not None:
            object.__setattr__(self, "attention", self.method)
            object.__setattr__(self, "method", None)

    @property
    def training_attention(self) -> str:
        """The method trained with: `method` where given, else `attention`."""
        return self.method or self.attention

    def effective_seq_len(self) -> int:
        """Tokens per training row: `seq_len`, or prefix_len + tail_len (recycled, seq_len 0)."""
        return self.seq_len or self.prefix_len + self.tail_len

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
    """TrainConfig from argv (`--config FILE.yaml` plus flags); an unknown YAML key or a value
    outside its domain is a `ConfigError` naming it."""
    return parse_typed_config(TrainConfig, argv, prog=PROG, description=DESCRIPTION)


def check_batch_divides(cfg: TrainConfig, mesh: Mesh) -> None:
    """The micro-batch (and evaluation batch) must split evenly over data x fsdp."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.micro_batch % shards:
        raise ConfigError(
            f"the micro-batch of {cfg.micro_batch} sequences (batch_size {cfg.batch_size} / "
            f"grad_accum {cfg.grad_accum}) does not divide over the mesh's data x fsdp = "
            f"{mesh.shape['data']} x {mesh.shape['fsdp']} = {shards} devices; use a multiple "
            f"of {shards}"
        )
    ebs = cfg.eval_batch_size or cfg.micro_batch
    if cfg.eval_sequences and ebs % shards:
        raise ConfigError(
            f"eval_batch_size {ebs} does not divide over data x fsdp = {shards} devices"
        )


def check_resume_config(saved: dict[str, Any], cfg: TrainConfig, where: Path) -> None:
    """Raises ConfigError when `cfg` differs from the checkpoint's run (`saved`, its config.json)
    in a `RESUME_KEYS` key; warns when only the step count changed."""
    now = dataclasses.asdict(cfg)
    diff = [k for k in RESUME_KEYS if k in saved and saved[k] != now[k]]
    if diff:
        detail = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in diff)
        raise ConfigError(
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
