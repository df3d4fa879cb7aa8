"""The settings of `python -m moa_jax.bench.decode`: one field per flag (and YAML key), each
with its declared domain (`moa_jax.domains`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from moa_jax.bench.random_model import SHAPE_NAMES
from moa_jax.cli import option
from moa_jax.domains import (
    NON_NEGATIVE,
    POSITIVE,
    TEXT,
    Choice,
    Domain,
    Float,
    Int,
    Options,
    Relation,
)
from moa_jax.errors import ConfigError
from moa_jax.methods import METHODS as REGISTRY
from moa_jax.methods import parse_method_options, split_method_options
from moa_jax.pallas_kernels import BACKENDS

# the registry's methods (`moa_jax.methods`) and the Hugging Face baseline
METHODS = (*REGISTRY, "hf")
MOA_DENSITIES = (0.5, 0.25)
"""The KV densities of the synthetic MoA plans (`head_configs.plan_windows`: het50, het25)."""
_STRIDE = "set with --recycle-stride (dynamic schedule: --recycle-check)"
VARIANT_KEYS = {
    ("recycled", "k"): "set with --recycle-k",
    ("recycled", "stride"): _STRIDE,
    ("recycled", "s"): _STRIDE,
    ("recycled", "threshold"): "set with --recycle-threshold",
    ("streaming", "k"): "set with --recycle-k",
    ("h2o", "k"): "set with --recycle-k",
    ("moa", "dense_when_full"): "the benchmark times a plan's kernels",
}
"""The method options the benchmark sets itself (from the variant flags), not `--method-opt`."""
DISTINCT_POSITIVE = Int(1, distinct=True, min_items=1)


@dataclasses.dataclass(frozen=True)
class BatchDomain(Domain):
    """Batch sizes: integers >= 1, or 'max' (the estimated largest batch that fits)."""

    def describe(self) -> str:
        return "an integer >= 1 or 'max'"

    def parse(self, text: str) -> int | str:
        return "max" if text.strip() == "max" else super().parse(text)

    def check(self, value: Any) -> int | str:
        return "max" if value == "max" else super().check(value)


BATCHES = BatchDomain(int, lo=1, distinct=True, min_items=1)


def mesh_ok(text: str | None) -> bool:
    """Whether `text` is a mesh DATA,FSDP,TENSOR: three integers >= 1, at most one of them -1
    (the devices left); None (one device) is."""
    if text is None:
        return True
    try:
        dims = [int(x, 10) for x in text.split(",")]
    except ValueError:
        return False
    return len(dims) == 3 and all(d >= 1 or d == -1 for d in dims) and dims.count(-1) <= 1


MESH_RULE = "--mesh must be DATA,FSDP,TENSOR: three integers >= 1, one of them may be -1"


def _has(values: list | None, item: Any) -> bool:
    return values is not None and item in values


@dataclasses.dataclass
class DecodeConfig(Options):
    """What to time and how; None entries take their `--tiny`-dependent default in
    `resolved()` (a value given is kept as given)."""

    method: list[str] | None = option(
        None,
        "methods to run: any registered attention method (moa_jax.methods) or hf "
        "(default: dense dense-kernel moa streaming recycled)",
        Domain(str, choices=METHODS, distinct=True, min_items=1),
        nargs="+",
    )
    method_opt: list[str] = option(
        [],
        "an option of a method (repeatable), e.g. uniform.density=0.25; recycled's, "
        "streaming's and h2o's K, stride and threshold are the variant flags below "
        "(--recycle-k ...)",
        TEXT,
        action="append",
        metavar="METHOD.KEY=VALUE",
    )
    contexts: list[int] | None = option(
        None, "prompt lengths C (default 32768 65536; --tiny: 40)", DISTINCT_POSITIVE, nargs="+"
    )
    batches: list[int | str] | None = option(
        None,
        "batch sizes tried in order until OOM; 'max' = the estimated largest "
        "that fits (default 1 2 4 ... 256; --tiny: 1 2)",
        BATCHES,
        nargs="+",
    )
    refine: bool = option(False, "bisect between the largest batch that fit and the first OOM")
    steps: int | None = option(
        None, "decode steps per timed call (default 100; --tiny: 4)", POSITIVE
    )
    warmup: int | None = option(None, "untimed calls first (default 1)", NON_NEGATIVE)
    iters: int | None = option(
        None, "timed calls, the median is reported (default 3; --tiny: 1)", POSITIVE
    )
    shape: str | None = option(
        None,
        "model shapes, random bf16 weights (moa_jax.bench.random_model; default llama3-8b, "
        "--tiny: tiny)",
        Choice(*SHAPE_NAMES),
    )
    layers: int | None = option(None, "override the layer count", POSITIVE)
    narrow: bool = option(
        False,
        "the shape at CPU-sized widths, its structure kept (family switches, layers, heads, KV "
        "heads; head_dim 16, FFN 128, vocab 256): with --tiny, a smoke run of a full-size preset",
    )
    recycle_k: int | None = option(
        None, "K of streaming / h2o / recycled (default 4096; --tiny: 16)", POSITIVE
    )
    recycle_stride: list[int] | None = option(
        None,
        "fixed strides S of the recycled runs, 0 = never refresh (SnapKV) "
        "(default 10 50; --tiny: 2)",
        Int(0, distinct=True, min_items=1),
        nargs="+",
    )
    recycle_threshold: list[float] | None = option(
        None,
        "dynamic-schedule thresholds in [-1, 1] (one recycled run each)",
        Float(-1.0, 1.0, distinct=True),
    )
    recycle_check: int = option(10, "query check interval QC of the dynamic schedule", POSITIVE)
    moa_densities: list[float] = option(
        list(MOA_DENSITIES),
        "synthetic MoA plans by KV density (0.5, 0.25)",
        Domain(float, choices=MOA_DENSITIES, distinct=True),
    )
    plan: list[str] | None = option(
        None,
        "MoA plan files or specs, run besides the synthetic --moa-densities "
        "(pass --moa-densities with no value for none)",
        Domain(str, nonempty=True, distinct=True, min_items=1),
        nargs="+",
    )
    kernel_backend: str = option(
        "auto", "Pallas kernel backend (moa_jax.pallas_kernels.BACKENDS)", Choice(*BACKENDS)
    )
    interpret: bool = option(False, "Pallas interpret mode")
    block: int | None = option(
        None, "cache block of the recycled caches (default 64; 128 on TPU; --tiny: 16)", POSITIVE
    )
    num_splits: int | None = option(None, "GPU split-K of the decode", POSITIVE)
    kernel_profile: bool = option(
        False,
        "after timing, run one call under jax.profiler and report the device "
        "time per kernel and step (row field kernel_profile)",
    )
    hf_static_cache: bool = option(False, "hf: generate with cache_implementation='static'")
    bandwidth_gib: float | None = option(
        None,
        "size of the copy-bandwidth probe (default 2 GiB; --tiny 0.01)",
        Float(0.0, lo_open=True),
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
        TEXT,
        metavar="DATA,FSDP,TENSOR",
    )
    compile_cache: str | None = option(None, "persistent XLA compilation cache dir", TEXT)
    out: str | None = option(None, "write the JSON report here", TEXT)

    relations = (
        Relation(("mesh",), lambda c: mesh_ok(c.mesh), MESH_RULE),
        Relation(
            ("method", "batches"),
            lambda c: not (_has(c.method, "hf") and _has(c.batches, "max")),
            "--batches max is not available for --method hf: give batch sizes",
        ),
        Relation(
            ("method", "mesh"),
            lambda c: not (_has(c.method, "hf") and c.mesh is not None),
            "--mesh is for the JAX methods; run hf without it",
        ),
        Relation(
            ("method", "moa_densities", "plan"),
            lambda c: not _has(c.method, "moa") or bool(c.moa_densities or c.plan),
            "--method moa needs --moa-densities or --plan (it runs one plan per value)",
        ),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_variant_options(self.method_opt)

    def resolved(self) -> DecodeConfig:
        """This config with every None default filled in (smaller ones with `tiny`, which
        also forces interpret mode). A value given is kept as given."""
        t = self.tiny

        def pick(value, default, tiny_default=None):
            if value is not None:
                return value
            return tiny_default if t and tiny_default is not None else default

        return dataclasses.replace(
            self,
            shape=pick(self.shape, "llama3-8b", "tiny"),
            method=pick(self.method, ["dense", "dense-kernel", "moa", "streaming", "recycled"]),
            contexts=pick(self.contexts, [32768, 65536], [40]),
            batches=pick(self.batches, [1, 2, 4, 8, 16, 32, 64, 128, 256], [1, 2]),
            steps=pick(self.steps, 100, 4),
            warmup=pick(self.warmup, 1),
            iters=pick(self.iters, 3, 1),
            recycle_k=pick(self.recycle_k, 4096, 16),
            recycle_stride=pick(self.recycle_stride, [10, 50], [2]),
            bandwidth_gib=pick(self.bandwidth_gib, 2.0, 0.01),
            block=self.block if self.block is not None or not t else 16,
            interpret=self.interpret or t,
        )

    def cache_len(self, context: int) -> int:
        """Cache slots for a prompt of `context` tokens and every decode step of the timed
        calls (of a resolved config)."""
        return context + self.steps * (self.warmup + self.iters) + 1


def check_variant_options(entries: list[str]) -> None:
    """`--method-opt` entries parsed (a bad one is a `ConfigError` naming it), none of them an
    option the benchmark sets itself (`VARIANT_KEYS`)."""
    parse_method_options(entries)
    for method, kv in split_method_options(entries).items():
        for key in kv:
            why = VARIANT_KEYS.get((method, key))
            if why is not None:
                raise ConfigError(f"--method-opt {method}.{key}: {why}")
