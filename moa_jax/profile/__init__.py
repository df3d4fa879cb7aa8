"""`python -m moa_jax.profile`, or `run(ProfileConfig(...))` from Python: search a MoA plan for a
model (calibrate -> profile -> optimise -> validate -> plan + report).

    python -m moa_jax.profile                         # SmolLM2-135M, CPU-sized defaults
    python -m moa_jax.profile --fast                  # a few minutes end to end
    python -m moa_jax.profile --config configs/profile/gpu.yaml --model path/to/hf_dir

Steps (see moa_jax/search/*.py for the method):
1. calibration: long documents (default: the Shakespeare corpus) with the dense model's own
   greedy answers; items at every profile length and held-out items at the validation length,
   cached on disk (resumable).
2. influence profiling with jax.grad at each profile length (saved per length, resumable);
   a rule's estimated loss is the influence of the entries it drops in the rows that predict
   the answer plus, on the same scale, the attention those rows put on earlier places of the
   tokens they predict that it drops (--estimator answer-copy, the default: the attention runs
   on the fastest exact kernel and only the answer rows are recomputed; see
   moa_jax/search/influence_profile.py for the others).
3. candidate rules alpha + beta * N scaled to the profile lengths; a HiGHS MILP per objective
   under the density budget at every length (the KV-cache size, --budget-on kv-cache, the
   default; or the paper's band on the mean over query heads, --budget-on heads), at most two
   rules per layer, epsilon-constraint sweep, non-dominated set.
4. validation: answer loss on held-out documents at the validation length for the dense model,
   a uniform window + 64 sinks of the budget density, and the candidates; the best candidate
   becomes the plan.
Outputs in --out: plan.json (moa_jax.plan.Plan; its metadata records the model family and shape
it was searched for, which every command that takes the plan checks), report.json, spans.png
(layers x heads span heatmap), loss_vs_density.png, candidates/*.json, profiles/*.npz.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from pathlib import Path
from typing import Any, ClassVar

import jax

from moa_jax.cli import MODEL_HELP, option
from moa_jax.config import DTYPE_NAMES
from moa_jax.corpora import load_corpus
from moa_jax.domains import (
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    PROBABILITY,
    TEXT,
    Choice,
    Float,
    Int,
    Options,
    Relation,
)
from moa_jax.errors import ConfigError
from moa_jax.models.registry import load_config, load_model
from moa_jax.parallel import MeshConfig, make_mesh
from moa_jax.profile import outputs, steps
from moa_jax.search.estimators import ESTIMATORS
from moa_jax.search.rules import scaled_grid

logger = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = dict(
    lengths=[1024, 2048, 3072],
    items=[3, 3, 1],
    validation_length=4096,
    validation_items=1,
    answer_tokens=64,
    eps_intervals=2,
    max_candidates=2,
)
"""The built-in values of the options --fast changes (None until set; these without --fast)."""
FAST: dict[str, Any] = dict(
    lengths=[512, 1024, 2048],
    items=[1],
    validation_length=3072,
    validation_items=1,
    answer_tokens=48,
    eps_intervals=1,
    max_candidates=2,
)
"""What --fast changes (configs/profile/fast.yaml spells out the same values)."""

LENGTH = Int(64, multiple_of=64)
"""A profile or validation length: whole 64-token blocks (the influence kernel's block)."""


def _sized(help_: str, key: str) -> str:
    """The help of an option --fast changes, with both of its defaults."""

    def words(v: Any) -> str:
        return " ".join(map(str, v)) if isinstance(v, list) else str(v)

    return f"{help_} (default: {words(DEFAULTS[key])}; with --fast: {words(FAST[key])})"


@dataclasses.dataclass(frozen=True)
class ProfileConfig(Options):
    """The flags of `python -m moa_jax.profile` (and the keys of its YAML configs).

    The options --fast changes (`DEFAULTS`, `FAST`) are None until set: a config fills the
    unset ones from FAST with --fast, else from DEFAULTS, so a value given by a flag, a YAML
    key or the Python caller is never replaced.
    """

    # model and data
    model: str = option("smollm2-135m", MODEL_HELP, TEXT)
    dtype: str = option("float32", "compute dtype", Choice(*DTYPE_NAMES))
    corpus: str = option(
        "shakespeare",
        "built-in corpus name or a local json/jsonl/parquet/txt file or directory",
        TEXT,
    )
    text_field: str = option("text", "text column of a json/parquet corpus", TEXT)
    no_chat_template: bool = option(
        False, "plain 'document + instruction + Answer:' prompts", action="store_true"
    )
    answer_tokens: int | None = option(
        None,
        _sized("max new tokens of each dense-model answer (the loss targets)", "answer_tokens"),
        POSITIVE,
    )
    recall_fraction: float = option(
        0.0,
        "share of calibration (and held-out) items that are synthetic recall "
        "items: facts 'The <colour> <box> holds <object>.' hidden in the "
        "document and a question about one; the dense model's own answer is "
        "the target. Puts long-range retrieval into the influence profile",
        PROBABILITY,
    )
    seed: int = option(0, "document shuffling seed", NON_NEGATIVE)
    calibration_cache: str | None = option(
        None, "directory of cached calibration sets (default: $MOA_JAX_CACHE/calibration)", TEXT
    )
    # search
    lengths: list[int] | None = option(
        None,
        _sized("profile lengths N (one objective each; multiples of 64)", "lengths"),
        dataclasses.replace(LENGTH, distinct=True, min_items=1),
        nargs="+",
    )
    items: list[int] | None = option(
        None,
        _sized("calibration items per profile length (one value for all, or one each)", "items"),
        Int(1, min_items=1),
        nargs="+",
    )
    density: float = option(
        0.5, "KV density budget d: mean kept KV / N over all heads, in [band*d, d]", FRACTION
    )
    budget_on: str = option(
        "kv-cache",
        "what the budget bounds: the KV-cache size (the default: with GQA "
        "each KV head keeps its query heads' largest span, so this is decode "
        "memory), or the mean over query heads (the paper; with GQA the cache "
        "then grows past the budget)",
        Choice("heads", "kv-cache"),
    )
    band: float = option(
        0.9, "lower end of the band as a fraction of d (0: no lower end)", PROBABILITY
    )
    density_lengths: list[int] | None = option(
        None,
        "extra lengths where the band must hold (default: the validation length; none given: "
        "the profile lengths only)",
        Int(1, distinct=True),
        nargs="*",
    )
    max_rules_per_layer: int = option(2, "distinct rules a layer's heads may use", POSITIVE)
    sink: int = option(64, "sink tokens inside every span", NON_NEGATIVE)
    extend_length: int | None = option(
        None, "longest length rules must stay valid at (grid filter; default 2*max N)", POSITIVE
    )
    estimator: str = option(
        "answer-copy",
        "rule loss: sum of |E| over the exact dropped entries (token), over "
        "the dropped entries of the rows that predict the answer (answer), the "
        "largest of those (answer-max, mean over items), the answer rows' "
        "dropped attention on earlier places of the tokens they predict "
        "(copy), answer + copy on one scale (answer-copy), the reference's "
        "64x64 blocks (block), or the signed first-order loss change of "
        "dropping the whole window with rows renormalised (window)",
        Choice(*ESTIMATORS),
    )
    eps_intervals: int | None = option(
        None,
        _sized(
            "epsilon-constraint points per secondary objective (0: the single-objective "
            "solutions only; reference: 4)",
            "eps_intervals",
        ),
        NON_NEGATIVE,
    )
    milp_time_limit: float = option(
        30.0,
        "seconds per MILP (the best solution found so far is used)",
        Float(0.0, lo_open=True),
    )
    milp_gap: float = option(1e-2, "relative MIP gap", Float(0.0))
    # validation
    validation_length: int | None = option(
        None,
        _sized("length of the held-out items the candidates are measured at", "validation_length"),
        LENGTH,
    )
    validation_items: int | None = option(
        None, _sized("held-out items measured", "validation_items"), POSITIVE
    )
    max_candidates: int | None = option(
        None,
        _sized("Pareto candidates measured (spread over the front)", "max_candidates"),
        POSITIVE,
    )
    validate_backend: str = option(
        "auto",
        "masked: chunked jnp oracle (CPU); moa: the Pallas MoA backend",
        Choice("auto", "masked", "moa"),
    )
    no_validate: bool = option(
        False,
        "skip measuring; pick the candidate with the lowest summed estimate",
        action="store_true",
    )
    # compute
    batch_size: int = option(1, "items per forward/backward", POSITIVE)
    q_chunk: int | None = option(None, "influence rows per step (auto)", POSITIVE)
    remat: bool = option(
        False,
        "recompute each layer's activations in the profiling backward pass "
        "(less memory, about a third more compute)",
        action="store_true",
    )
    mesh: str | None = option(
        None,
        "profile on a device mesh (moa_jax.parallel), e.g. 8,1,1 or 2,2,2; -1 "
        "takes the remaining devices; batches split over data x fsdp (make "
        "--batch-size a multiple), heads and MLP over tensor. Default: one "
        "device",
        TEXT,
        metavar="DATA,FSDP,TENSOR",
    )
    attn_chunk: int = option(
        512, "query chunk of the memory-light attention used by profiling/validation", POSITIVE
    )
    # output
    out: str | None = option(None, "output directory (default runs/profile/<model>)", TEXT)
    heatmap_length: int | None = option(
        None, "N of the span heatmap (default: the validation length)", POSITIVE
    )
    fast: bool = option(
        False,
        f"small end-to-end run: the options of {sorted(FAST)} that are not given take --fast's "
        "values",
        action="store_true",
    )
    no_progress: bool = option(False, "no progress bars", action="store_true")

    relations: ClassVar[tuple[Relation, ...]] = (
        Relation(
            ("items", "lengths"),
            lambda c: len(c.items) in (1, len(c.lengths)),
            "--items takes one value, or one per --lengths value (its default, "
            f"{' '.join(map(str, DEFAULTS['items']))}, is one per default length)",
        ),
        Relation(
            ("sink", "lengths", "validation_length"),
            lambda c: c.sink < min([*c.lengths, c.validation_length]),
            "--sink must be smaller than every profile and validation length (--lengths, "
            "--validation-length)",
        ),
        Relation(
            ("extend_length", "lengths"),
            lambda c: c.extend_length is None or c.extend_length >= max(c.lengths),
            "--extend-length must be at least the longest --lengths value",
        ),
    )

    def __post_init__(self) -> None:
        preset = {**DEFAULTS, **FAST} if self.fast else DEFAULTS
        for key, value in preset.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, list(value) if isinstance(value, list) else value)
        super().__post_init__()

    def item_counts(self) -> dict[int, int]:
        """Calibration items per profile length, the lengths in increasing order."""
        counts = self.items * len(self.lengths) if len(self.items) == 1 else self.items
        return dict(sorted(zip(self.lengths, counts)))

    def band_lengths(self) -> list[int]:
        """The lengths (besides the profile lengths) where the density band must hold."""
        if self.density_lengths is None:
            return [self.validation_length]
        return list(self.density_lengths)

    def as_dict(self) -> dict[str, Any]:
        """The config as JSON values (report.json's "args")."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _model_slug(name: str) -> str:
    base = Path(name).name or name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base.removesuffix(".gguf")) or "model"


def run(config: ProfileConfig) -> dict[str, Any]:
    """The whole pipeline; returns the report dict (also written to report.json).

    Every check that needs no model run (the lengths against the model, the density band
    against the rule grid, the corpus, the prompts' room at every length) comes before the
    calibration; the output folder is made after it, before the first profile is saved."""
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    lengths = sorted(config.lengths)
    counts = config.item_counts()
    out = Path(config.out or Path("runs") / "profile" / _model_slug(config.model))
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a directory")
    mesh = make_mesh(MeshConfig.parse(config.mesh)) if config.mesh else None
    grid = scaled_grid(lengths, config.extend_length, sink=config.sink)
    steps.check_model(config, load_config(config.model), grid, lengths)
    docs = load_corpus(config.corpus, text_field=config.text_field)
    steps.check_corpus(config, docs)

    t0 = time.perf_counter()
    model, tokenizer = load_model(config.model, dtype=config.dtype)
    if tokenizer is None:
        raise ConfigError(f"model {config.model!r} has no tokenizer; calibration needs one")
    cfg = model.config
    timings["load_model"] = time.perf_counter() - t0
    steps.check_prompts(config, tokenizer, counts)
    logger.info(
        f"model {config.model}: {cfg.num_layers} layers x {cfg.num_heads} heads "
        f"({cfg.num_kv_heads} KV heads), jax backend {jax.default_backend()}"
    )

    t0 = time.perf_counter()
    calib = steps.calibrate(config, model, tokenizer, docs, counts)
    timings["calibration"] = time.perf_counter() - t0

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    uniform = steps.uniform_baseline(config, cfg, grid)
    profiles = steps.profile(config, model, calib, grid, uniform, lengths, out / "profiles", mesh)
    timings["profile"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    found = steps.search(config, cfg, grid, profiles, lengths, out / "candidates")
    timings["optimise"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    measured, best = steps.validate(config, model, calib, found, uniform, lengths)
    timings["validate"] = time.perf_counter() - t0

    report = outputs.write_outputs(
        config,
        out,
        cfg,
        grid,
        uniform,
        calib,
        profiles,
        found,
        measured,
        best,
        lengths,
        timings,
        t_start,
    )
    outputs.print_summary(report, lengths, config.validation_length, measured)
    return report
