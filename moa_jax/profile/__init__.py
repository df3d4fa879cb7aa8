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
from typing import Any

import jax

from moa_jax.cli import MODEL_HELP, option
from moa_jax.corpora import load_corpus
from moa_jax.models.registry import load_model
from moa_jax.parallel import MeshConfig, make_mesh
from moa_jax.profile import outputs, steps
from moa_jax.search import sensitivity
from moa_jax.search.estimators import ESTIMATORS
from moa_jax.search.rules import scaled_grid

logger = logging.getLogger(__name__)

FAST = dict(
    lengths=[512, 1024, 2048],
    items=[1],
    validation_length=3072,
    validation_items=1,
    answer_tokens=48,
    eps_intervals=1,
    max_candidates=2,
)
"""What --fast changes (configs/profile/fast.yaml spells out the same values)."""


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
    """The flags of `python -m moa_jax.profile` (and the keys of its YAML configs)."""

    # model and data
    model: str = option("smollm2-135m", MODEL_HELP)
    dtype: str = option("float32", "compute dtype")
    corpus: str = option(
        "shakespeare", "built-in corpus name or a local json/jsonl/parquet/txt file or directory"
    )
    text_field: str = option("text", "text column of a json/parquet corpus")
    no_chat_template: bool = option(
        False, "plain 'document + instruction + Answer:' prompts", action="store_true"
    )
    answer_tokens: int = option(64, "max new tokens of each dense-model answer (the loss targets)")
    recall_fraction: float = option(
        0.0,
        "share of calibration (and held-out) items that are synthetic recall "
        "items: facts 'The <colour> <box> holds <object>.' hidden in the "
        "document and a question about one; the dense model's own answer is "
        "the target. Puts long-range retrieval into the influence profile",
    )
    seed: int = option(0, "document shuffling seed")
    calibration_cache: str | None = option(
        None, "directory of cached calibration sets (default: $MOA_JAX_CACHE/calibration)"
    )
    # search
    lengths: list[int] = option(
        [1024, 2048, 3072], "profile lengths N (one objective each; multiples of 64)", nargs="+"
    )
    items: list[int] = option(
        [3, 3, 1],
        "calibration items per profile length (one value for all, or one each)",
        nargs="+",
    )
    density: float = option(
        0.5, "KV density budget d: mean kept KV / N over all heads, in [band*d, d]"
    )
    budget_on: str = option(
        "kv-cache",
        "what the budget bounds: the KV-cache size (the default: with GQA "
        "each KV head keeps its query heads' largest span, so this is decode "
        "memory), or the mean over query heads (the paper; with GQA the cache "
        "then grows past the budget)",
        choices=("heads", "kv-cache"),
    )
    band: float = option(0.9, "lower end of the band as a fraction of d")
    density_lengths: list[int] | None = option(
        None,
        "extra lengths where the band must hold (default: the validation length)",
        nargs="*",
    )
    max_rules_per_layer: int = option(2, "distinct rules a layer's heads may use")
    sink: int = option(64, "sink tokens inside every span")
    extend_length: int | None = option(
        None, "longest length rules must stay valid at (grid filter; default 2*max N)"
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
        choices=tuple(ESTIMATORS),
    )
    eps_intervals: int = option(
        2, "epsilon-constraint points per secondary objective (reference: 4)"
    )
    milp_time_limit: float = option(
        30.0, "seconds per MILP (the best solution found so far is used)"
    )
    milp_gap: float = option(1e-2, "relative MIP gap")
    # validation
    validation_length: int = option(
        4096, "length of the held-out items the candidates are measured at"
    )
    validation_items: int = option(1, "held-out items measured")
    max_candidates: int = option(2, "Pareto candidates measured (spread over the front)")
    validate_backend: str = option(
        "auto",
        "masked: chunked jnp oracle (CPU); moa: the Pallas MoA backend",
        choices=("auto", "masked", "moa"),
    )
    no_validate: bool = option(
        False,
        "skip measuring; pick the candidate with the lowest summed estimate",
        action="store_true",
    )
    # compute
    batch_size: int = option(1, "items per forward/backward")
    q_chunk: int | None = option(None, "influence rows per step (auto)")
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
        metavar="DATA,FSDP,TENSOR",
    )
    attn_chunk: int = option(
        512, "query chunk of the memory-light attention used by profiling/validation"
    )
    # output
    out: str | None = option(None, "output directory (default runs/profile/<model>)")
    heatmap_length: int | None = option(
        None, "N of the span heatmap (default: the validation length)"
    )
    fast: bool = option(
        False, f"small end-to-end run (overrides defaults: {FAST})", action="store_true"
    )
    no_progress: bool = option(False, "no progress bars", action="store_true")

    def resolved(self) -> ProfileConfig:
        """With --fast, FAST's values where this config has the built-in defaults (YAML keys
        and explicit flags that differ from them win)."""
        if not self.fast:
            return self
        base = ProfileConfig()
        return dataclasses.replace(
            self,
            **{
                k: list(v) if isinstance(v, list) else v
                for k, v in FAST.items()
                if getattr(self, k) == getattr(base, k)
            },
        )

    def as_dict(self) -> dict[str, Any]:
        """The config as JSON values (report.json's "args")."""
        return {
            f.name: str(v) if isinstance(v := getattr(self, f.name), Path) else v
            for f in dataclasses.fields(self)
        }


def _model_slug(name: str) -> str:
    base = Path(name).name or name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base.removesuffix(".gguf")) or "model"


def run(config: ProfileConfig) -> dict[str, Any]:
    """The whole pipeline; returns the report dict (also written to report.json)."""
    config = config.resolved()
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    lengths = sorted(int(n) for n in config.lengths)
    for n in lengths + [config.validation_length]:
        if n % 64:
            raise SystemExit(f"lengths must be multiples of 64, got {n}")
    counts = steps.item_counts(config.lengths, config.items)
    counts = {n: counts[n] for n in lengths}
    if not 0 < config.density <= 1:
        raise ValueError(f"--density must be in (0, 1], got {config.density}")
    if any(c < 1 for c in counts.values()):
        raise ValueError(f"--items must be >= 1, got {config.items}")
    out = Path(config.out or Path("runs") / "profile" / _model_slug(config.model))
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a directory")
    mesh = None
    if config.mesh:
        mesh = make_mesh(MeshConfig.parse(config.mesh))
    # the folder is made once the corpus and the model have loaded (a bad input leaves none)
    docs = load_corpus(config.corpus, text_field=config.text_field)

    t0 = time.perf_counter()
    model, tokenizer = load_model(config.model, dtype=config.dtype)
    if tokenizer is None:
        raise SystemExit(f"model {config.model!r} has no tokenizer; calibration needs one")
    cfg = model.config
    timings["load_model"] = time.perf_counter() - t0
    longest = max(lengths + [config.validation_length])
    try:  # before the calibration's answers are generated
        sensitivity.refuse_model_window(cfg, max([longest, *(config.density_lengths or [])]))
    except ValueError as e:
        raise SystemExit(f"moa_jax.profile: {e}") from None
    if cfg.max_position_embeddings and longest > cfg.max_position_embeddings:
        context = cfg.max_position_embeddings
        logger.warning(f"length {longest} exceeds the model's context {context}")
    logger.info(
        f"model {config.model}: {cfg.num_layers} layers x {cfg.num_heads} heads "
        f"({cfg.num_kv_heads} KV heads), jax backend {jax.default_backend()}"
    )
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    calib = steps.calibrate(config, model, tokenizer, docs, counts)
    timings["calibration"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    grid = scaled_grid(lengths, config.extend_length, sink=config.sink)
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
