"""The steps of `moa_jax.profile.run`: calibrate -> profile -> search -> validate.

Each step takes the run's `ProfileConfig` and what the steps before it made; the method itself
lives in `moa_jax.search` (calibration, profile, rules, optimize, validate).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from moa_jax.corpora import cache_dir
from moa_jax.errors import ConfigError
from moa_jax.plan import Plan, model_metadata
from moa_jax.search import calibration as cal
from moa_jax.search import sensitivity
from moa_jax.search.answer_loss import make_batches
from moa_jax.search.estimators import FAST_PATH_ESTIMATORS, ROWS_ONLY_ESTIMATORS
from moa_jax.search.influence_profile import InfluenceProfile
from moa_jax.search.optimize import (
    SearchProblem,
    Solution,
    check_budget,
    epsilon_sweep,
    pareto_front,
)
from moa_jax.search.rules import RuleGrid
from moa_jax.search.validate import measure_plans, pick_best

if TYPE_CHECKING:  # a type only: the package imports this module
    from moa_jax.profile import ProfileConfig

logger = logging.getLogger(__name__)


def check_model(config: ProfileConfig, cfg, grid: RuleGrid, lengths: Sequence[int]) -> None:
    """The checks on the model's config (`ModelConfig`), before its weights load: a model with a
    sliding window of its own profiles within it; the density band must be reachable with the
    rule grid at every density length (the MILP's first check, here before any profiling).
    Lengths beyond the model's trained context are a warning."""
    longest = max([*lengths, config.validation_length])
    try:
        sensitivity.refuse_model_window(cfg, max([longest, *config.band_lengths()]))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.max_position_embeddings and longest > cfg.max_position_embeddings:
        logger.warning(
            f"length {longest} exceeds the model's context {cfg.max_position_embeddings}"
        )
    zeros = np.zeros((cfg.num_layers, cfg.num_heads, len(grid)))
    check_budget(search_problem(config, cfg, grid, {n: zeros for n in lengths}))


def check_corpus(config: ProfileConfig, docs: Sequence[Any]) -> None:
    """Calibration holds documents out for validation: the corpus needs two at least."""
    if len(docs) < 2:
        raise ConfigError(
            f"--corpus {config.corpus} holds {len(docs)} document; calibration holds one out "
            f"for validation and needs at least 2"
        )


def check_prompts(config: ProfileConfig, tokenizer, counts: dict[int, int]) -> None:
    """Every calibration and validation length leaves room for a document after the prompt
    and the answer (--answer-tokens)."""
    builder = cal.PromptBuilder(tokenizer, chat=not config.no_chat_template)
    cal.document_budgets(
        builder,
        {**counts, config.validation_length: config.validation_items},
        cal.DEFAULT_TASKS,
        config.recall_fraction,
        config.answer_tokens,
    )


def model_config_dict(cfg) -> dict[str, Any]:
    """The model config's shape fields (part of the calibration key and of the plan's
    metadata)."""
    keys = (
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "hidden_size",
        "vocab_size",
        "max_position_embeddings",
    )
    return {k: getattr(cfg, k) for k in keys}


def _spread(n: int, k: int) -> list[int]:
    if k >= n:
        return list(range(n))
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, k)})


# ------------------------------------------------------------------------------- calibration
@dataclasses.dataclass
class Calibration:
    """key / val_key: the cache keys of the calibration and held-out sets (val_key None
    with --no-validate); items: profile length -> items; val_items: the held-out items at the
    validation length (none with --no-validate)."""

    key: str
    val_key: str | None
    items: dict[int, list]
    val_items: list


def calibrate(
    config: ProfileConfig, model, tokenizer, docs: Sequence[str], counts: dict[int, int]
) -> Calibration:
    """Calibration items at every profile length and held-out items at the validation length:
    long documents with the dense model's own greedy answers, cached on disk (resumable)."""

    progress = not config.no_progress
    # held-out documents are set aside even with --no-validate, so the calibration set (and
    # its cache) does not depend on that flag
    # at most a third of the documents are held out (a corpus of a few long novels gives
    # several held-out items per document, from different excerpts)
    n_holdout = max(1, min(config.validation_items, len(docs) // 3))
    calib_docs, val_docs = cal.split_documents(
        docs, n_holdout, config.seed, min_chars=3 * config.validation_length
    )
    n_val = 0 if config.no_validate else config.validation_items
    cache_root = (
        Path(config.calibration_cache) if config.calibration_cache else cache_dir() / "calibration"
    )
    ident = dict(
        model=config.model,
        config=model_config_dict(model.config),
        dtype=config.dtype,
        corpus=cal.corpus_fingerprint(docs),
        seed=config.seed,
        answer_tokens=config.answer_tokens,
        chat=not config.no_chat_template,
        tasks=list(cal.DEFAULT_TASKS),
        n_val=config.validation_items,
        val_length=config.validation_length,
    )
    if config.recall_fraction:
        ident["recall_fraction"] = config.recall_fraction
    key = cal.calibration_key(split="calibration", counts=counts, **ident)
    logger.info(
        f"calibration set {key}: {sum(counts.values())} items over {len(calib_docs)} documents "
        f"(cache {cache_root})"
    )
    items = cal.build_items(
        model,
        tokenizer,
        calib_docs,
        counts,
        answer_tokens=config.answer_tokens,
        chat=not config.no_chat_template,
        recall_fraction=config.recall_fraction,
        seed=config.seed,
        batch_size=config.batch_size,
        cache_file=cache_root / f"{key}.jsonl",
        q_chunk=config.attn_chunk,
        progress=progress,
    )
    val_items: list = []
    val_key = None
    if n_val:
        val_key = cal.calibration_key(
            split="validation", counts={config.validation_length: n_val}, **ident
        )
        val_items = cal.build_items(
            model,
            tokenizer,
            val_docs,
            {config.validation_length: n_val},
            answer_tokens=config.answer_tokens,
            chat=not config.no_chat_template,
            recall_fraction=config.recall_fraction,
            seed=config.seed + 1,
            batch_size=config.batch_size,
            cache_file=cache_root / f"{val_key}.jsonl",
            q_chunk=config.attn_chunk,
            progress=progress,
            desc="held-out items",
        )[config.validation_length]
    cal.describe(items, tokenizer)
    return Calibration(key, val_key, items, val_items)


# --------------------------------------------------------------------------------- profiling
def uniform_baseline(config: ProfileConfig, cfg, grid: RuleGrid) -> Plan:
    """One rule for every head at the budget density (alpha 0, beta d) with the run's sinks."""

    return Plan(
        alphas=np.zeros((cfg.num_layers, cfg.num_heads)).tolist(),
        betas=config.density,
        sinks=config.sink,
        granularity=grid.granularity,
        min_span=grid.min_span,
        metadata={"source": "uniform", "beta": config.density},
    )


def profile(
    config: ProfileConfig,
    model,
    calib: Calibration,
    grid: RuleGrid,
    uniform: Plan,
    lengths: Sequence[int],
    pdir: Path,
    mesh=None,
) -> dict[int, InfluenceProfile]:
    """Influence profiles (jax.grad) at each profile length, saved per length in `pdir` and
    resumed from there; a cached profile without the sums `--estimator` needs is profiled
    again, keeping the sums it had."""

    if mesh is not None:
        logger.info(f"profiling on a {dict(mesh.shape)} mesh of {mesh.devices.size} devices")
    profiles = {}
    for n in lengths:
        # the rules' windows (and the uniform baseline's), scored in the backward pass only for
        # the 'window' estimator (the other estimators read the |E| sums)
        windows = (
            sorted(
                w
                for w in {int(w) for w in grid.windows(n)} | {int(uniform.resolve(n)[0, 0])}
                if w < n
            )
            if config.estimator == "window"
            else []
        )  # a window >= N drops nothing
        # the 'answer' estimators need the answer rows alone (the fast path: any exact
        # attention kernel, the answer rows recomputed); the others every row's sums
        answer = config.estimator in ROWS_ONLY_ESTIMATORS
        fast_only = config.estimator in FAST_PATH_ESTIMATORS
        token = not answer
        path = pdir / f"profile-{n}-{calib.key}-{config.sink}-v2.npz"
        prof = InfluenceProfile.load(path) if path.exists() else None
        missing = prof is not None and (
            not set(windows) <= set(prof.windows.tolist())
            or (answer and prof.answer is None)
            or (fast_only and (prof.answer_max is None or prof.copy is None))
            or (token and not prof.token)
        )
        if missing:  # profiled again, keeping the sums the old one had
            logger.info(
                f"N={n}: the cached profile lacks the {config.estimator} estimator's sums; "
                f"profiling again"
            )
            windows = sorted(set(windows) | set(prof.windows.tolist()))
            answer = answer or prof.answer is not None
            if fast_only:  # only the answer-rows pass has the maxima and copy sums
                token, windows = False, []
            else:
                token = token or prof.token or bool(windows)
            prof = None
        if prof is not None:  # a partial profile goes on with the sums it has
            answer = prof.answer is not None
            token = prof.token
            windows = prof.windows.tolist()
        if prof is not None and prof.count >= len(calib.items[n]):
            logger.info(f"N={n}: profile loaded from {path}")
        else:
            prof = sensitivity.profile_items(
                model,
                calib.items[n],
                n,
                sink=config.sink,
                batch_size=config.batch_size,
                q_chunk=config.q_chunk,
                remat=config.remat,
                windows=windows,
                answer=answer,
                token=token,
                progress=not config.no_progress,
                profile=prof,
                mesh=mesh,
                on_batch=lambda p, path=path: p.save(path),
            )
            prof.save(path)
        profiles[n] = prof
        logger.info(f"N={n}: {prof.count} items, dense answer loss {prof.dense_loss:.4f}")
    return profiles


# ------------------------------------------------------------------------------ optimisation
def search_problem(
    config: ProfileConfig, cfg, grid: RuleGrid, losses: dict[int, np.ndarray]
) -> SearchProblem:
    """The MILP's data: estimated losses {N: [L, H, R]} per profile length, the rules'
    densities at the profile lengths and the band lengths, the budget options."""
    dlen = sorted(set(losses) | set(config.band_lengths()))
    return SearchProblem(
        losses,
        {n: grid.kv_density(n) for n in dlen},
        config.density,
        config.band,
        config.max_rules_per_layer,
        cfg.num_heads // cfg.num_kv_heads,
        config.budget_on,
    )


@dataclasses.dataclass
class Search:
    """problem: the MILP's data; candidates: the non-dominated solutions by name (c0, c1, ...);
    plans: their plans; to_measure: the names spread along the front that validation
    measures."""

    problem: SearchProblem
    candidates: dict[str, Solution]
    plans: dict[str, Plan]
    to_measure: list[str]

    @property
    def names(self) -> list[str]:
        return list(self.candidates)


def search(
    config: ProfileConfig,
    cfg,
    grid: RuleGrid,
    profiles: dict[int, InfluenceProfile],
    lengths: Sequence[int],
    cdir: Path,
) -> Search:
    """A HiGHS MILP per objective under the density budget, epsilon-constraint sweep, the
    non-dominated set; every candidate's plan is written to `cdir`."""

    losses = {n: p.rule_losses(grid, config.estimator) for n, p in profiles.items()}
    problem = search_problem(config, cfg, grid, losses)
    logger.info(grid.describe(sorted(problem.densities)))
    sols = epsilon_sweep(
        problem,
        config.eps_intervals,
        time_limit=config.milp_time_limit,
        gap=config.milp_gap,
        progress=not config.no_progress,
    )
    front = pareto_front(sols)
    logger.info(f"{len(sols)} MILP solutions, {len(front)} non-dominated")

    names = [f"c{i}" for i in range(len(front))]
    cands = {nm: s for nm, s in zip(names, front)}
    # candidates to measure: spread along the front (sorted by the longest length's estimate)
    by_long = sorted(names, key=lambda nm: cands[nm].objectives[lengths[-1]])
    chosen_set = [by_long[i] for i in _spread(len(by_long), max(1, config.max_candidates))]
    meta = model_metadata(cfg)
    plans = {nm: grid.plan(cands[nm].choice, metadata={"candidate": nm, **meta}) for nm in names}
    cdir.mkdir(exist_ok=True)
    for nm in names:
        plans[nm].save(cdir / f"{nm}.json")
    return Search(problem, cands, plans, chosen_set)


# -------------------------------------------------------------------------------- validation
def validate(
    config: ProfileConfig,
    model,
    calib: Calibration,
    found: Search,
    uniform: Plan,
    lengths: Sequence[int],
) -> tuple[dict[str, np.ndarray], str]:
    """(measured answer losses by name, the chosen candidate): the dense model, the uniform
    baseline and the spread candidates on the held-out items; with --no-validate nothing is
    measured and the candidate with the lowest summed (per-length normalised) estimate wins."""

    cfg = model.config
    measured: dict[str, np.ndarray] = {}
    val_n = config.validation_length
    if calib.val_key is not None:
        dense = Plan.dense(cfg.num_layers, cfg.num_heads)
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        batches = make_batches(calib.val_items, val_n, config.batch_size, pad)
        to_measure = {
            "dense": dense,
            "uniform": uniform,
            **{nm: found.plans[nm] for nm in found.to_measure},
        }
        measured = measure_plans(
            model,
            batches,
            to_measure,
            val_n,
            backend=config.validate_backend,
            q_chunk=config.attn_chunk,
            progress=not config.no_progress,
        )
        return measured, pick_best(measured, found.to_measure)
    front = list(found.candidates.values())
    norm = {n: max(s.objectives[n] for s in front) or 1.0 for n in lengths}
    best = min(
        found.to_measure,
        key=lambda nm: sum(found.candidates[nm].objectives[n] / norm[n] for n in lengths),
    )
    return measured, best
