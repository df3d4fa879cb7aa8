"""The settings of `python -m moa_jax.bench.decode`: one field per flag (and YAML key)."""

from __future__ import annotations

import argparse
import dataclasses

from moa_jax.bench.random_model import SHAPE_NAMES
from moa_jax.cli import option
from moa_jax.methods import METHODS as REGISTRY
from moa_jax.pallas_kernels import BACKENDS

# the registry's methods (`moa_jax.methods`) and the Hugging Face baseline
METHODS = (*REGISTRY, "hf")


def parse_batch(s: str) -> int | str:
    """A `--batches` entry: a positive integer or 'max'."""
    if s == "max":
        return s
    try:
        b = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"batch must be a positive integer or 'max', got {s!r}"
        ) from None
    if b < 1:
        raise argparse.ArgumentTypeError(f"batch must be positive, got {b}")
    return b


@dataclasses.dataclass
class DecodeConfig:
    """What to time and how; None entries take their `--tiny`-dependent default in
    `resolved()`."""

    method: list[str] | None = option(
        None,
        "methods to run: any registered attention method (moa_jax.methods) or hf "
        "(default: dense dense-kernel moa streaming recycled)",
        nargs="+",
        choices=METHODS,
    )
    method_opt: list[str] = option(
        [],
        "an option of a method (repeatable), e.g. uniform.density=0.25; the variant flags "
        "below (--recycle-k ...) set recycled / streaming / h2o's",
        action="append",
        metavar="METHOD.KEY=VALUE",
    )
    contexts: list[int] | None = option(
        None, "prompt lengths C (default 32768 65536; --tiny: 40)", nargs="+"
    )
    batches: list[int | str] | None = option(
        None,
        "batch sizes tried in order until OOM; 'max' = the estimated largest "
        "that fits (default 1 2 4 ... 256)",
        type=parse_batch,
        nargs="+",
    )
    refine: bool = option(False, "bisect between the largest batch that fit and the first OOM")
    steps: int | None = option(None, "decode steps per timed call (default 100; --tiny: 4)")
    warmup: int = option(1, "untimed calls first")
    iters: int = option(3, "timed calls (the median is reported)")
    shape: str | None = option(
        None,
        "model shapes, random bf16 weights (moa_jax.bench.random_model; default llama3-8b, "
        "--tiny: tiny)",
        choices=SHAPE_NAMES,
    )
    layers: int | None = option(None, "override the layer count")
    narrow: bool = option(
        False,
        "the shape at CPU-sized widths, its structure kept (family switches, layers, heads, KV "
        "heads; head_dim 16, FFN 128, vocab 256): with --tiny, a smoke run of a full-size preset",
    )
    recycle_k: int | None = option(
        None, "K of streaming / h2o / recycled (default 4096; --tiny: 16)"
    )
    recycle_stride: list[int] | None = option(
        None,
        "fixed strides S of the recycled runs, 0 = never refresh (SnapKV) "
        "(default 10 50; --tiny: 2)",
        nargs="+",
    )
    recycle_threshold: list[float] | None = option(
        None, "dynamic-schedule thresholds (one recycled run each)"
    )
    recycle_check: int = option(10, "query check interval QC of the dynamic schedule")
    moa_densities: list[float] = option(
        [0.5, 0.25], "synthetic MoA plans by KV density (0.5, 0.25)"
    )
    plan: list[str] | None = option(
        None,
        "MoA plan files or specs, run besides the synthetic --moa-densities "
        "(pass --moa-densities with no value for none)",
        nargs="+",
    )
    kernel_backend: str = option(
        "auto", "Pallas kernel backend (moa_jax.pallas_kernels.BACKENDS)", choices=list(BACKENDS)
    )
    interpret: bool = option(False, "Pallas interpret mode")
    block: int | None = option(None, "cache block of the recycled caches (default 64; 128 on TPU)")
    num_splits: int | None = option(None, "GPU split-K of the decode")
    kernel_profile: bool = option(
        False,
        "after timing, run one call under jax.profiler and report the device "
        "time per kernel and step (row field kernel_profile)",
    )
    hf_static_cache: bool = option(False, "hf: generate with cache_implementation='static'")
    bandwidth_gib: float | None = option(
        None, "size of the copy-bandwidth probe (default 2 GiB; --tiny 0.01)"
    )
    tiny: bool = option(
        False,
        "CPU smoke run: small contexts and batches, interpret mode, and the 2-layer tiny model "
        "unless --shape names another",
    )
    trace_only: bool = option(
        False,
        "trace each run's decode loop on the abstract model and caches instead of running it "
        "(nothing allocated or compiled: checks a shape, plan and method on any machine)",
    )
    mesh: str | None = option(
        None,
        "decode on a device mesh (moa_jax.parallel): rows over data x fsdp, "
        "heads over tensor (weights by the library's rules, caches by their "
        "logical axes), e.g. 8,1,1 (data parallel) or 1,1,8 (tensor parallel); "
        "default: one device",
        metavar="DATA,FSDP,TENSOR",
    )
    compile_cache: str | None = option(None, "persistent XLA compilation cache dir")
    out: str | None = option(None, "write the JSON report here")

    def resolved(self) -> DecodeConfig:
        """This config with every None default filled in (smaller ones with `tiny`, which
        also forces interpret mode and at most one warmup and one timed call)."""
        t = self.tiny
        c = dataclasses.replace(
            self,
            shape=self.shape or ("tiny" if t else "llama3-8b"),
            method=(
                ["dense", "dense-kernel", "moa", "streaming", "recycled"]
                if self.method is None
                else self.method
            ),
            contexts=self.contexts or ([40] if t else [32768, 65536]),
            batches=self.batches or ([1, 2] if t else [1, 2, 4, 8, 16, 32, 64, 128, 256]),
            steps=self.steps or (4 if t else 100),
            recycle_k=self.recycle_k or (16 if t else 4096),
            recycle_stride=self.recycle_stride or ([2] if t else [10, 50]),
            bandwidth_gib=self.bandwidth_gib or (0.01 if t else 2.0),
        )
        if t:
            c = dataclasses.replace(
                c,
                interpret=True,
                block=c.block or 16,
                warmup=min(c.warmup, 1),
                iters=min(c.iters, 1),
            )
        return c

    def cache_len(self, context: int) -> int:
        """Cache slots for a prompt of `context` tokens and every decode step of the timed
        calls (of a resolved config)."""
        return context + self.steps * (self.warmup + self.iters) + 1
