"""`python -m moa_jax.profile`: search a MoA plan for a model (calibrate -> profile -> optimise ->
validate -> plan + report).

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
   moa_jax/search/profile.py for the others).
3. candidate rules alpha + beta * N scaled to the profile lengths; a HiGHS MILP per objective
   under the density budget at every length (the KV-cache size, --budget-on kv-cache, the
   default; or the paper's band on the mean over query heads, --budget-on heads), at most two
   rules per layer, epsilon-constraint sweep, non-dominated set.
4. validation: answer loss on held-out documents at the validation length for the dense model,
   a uniform window + 64 sinks of the budget density, and the candidates; the best candidate
   becomes the plan.
Outputs in --out: plan.json (moa_jax.plan.Plan), report.json, spans.png (layers x heads span
heatmap), loss_vs_density.png, candidates/*.json, profiles/*.npz.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from moa_jax.cli import atomic_write_text
from moa_jax.search.estimators import ESTIMATORS, FAST_PATH_ESTIMATORS, ROWS_ONLY_ESTIMATORS

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


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m moa_jax.profile",
        description="Search a MoA plan (per-head elastic spans) for a model: calibrate, profile "
        "head influence with jax.grad, solve a MILP per length under a KV-density "
        "budget, validate the Pareto candidates, write plan.json and a report.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--model", default="smollm2-135m", help="preset name, HF checkpoint directory or .gguf file"
    )
    g.add_argument("--dtype", default="float32", help="compute dtype")
    g.add_argument(
        "--corpus",
        default="shakespeare",
        help="built-in corpus name or a local json/jsonl/parquet/txt file or directory",
    )
    g.add_argument("--text-field", default="text", help="text column of a json/parquet corpus")
    g.add_argument(
        "--no-chat-template",
        action="store_true",
        help="plain 'document + instruction + Answer:' prompts",
    )
    g.add_argument(
        "--answer-tokens",
        type=int,
        default=64,
        help="max new tokens of each dense-model answer (the loss targets)",
    )
    g.add_argument(
        "--recall-fraction",
        type=float,
        default=0.0,
        help="share of calibration (and held-out) items that are synthetic recall "
        "items: facts 'The <colour> <box> holds <object>.' hidden in the "
        "document and a question about one; the dense model's own answer is "
        "the target. Puts long-range retrieval into the influence profile",
    )
    g.add_argument("--seed", type=int, default=0, help="document shuffling seed")
    g.add_argument(
        "--calibration-cache",
        default=None,
        help="directory of cached calibration sets (default: $MOA_JAX_CACHE/calibration)",
    )
    s = p.add_argument_group("search")
    s.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=[1024, 2048, 3072],
        help="profile lengths N (one objective each; multiples of 64)",
    )
    s.add_argument(
        "--items",
        type=int,
        nargs="+",
        default=[3, 3, 1],
        help="calibration items per profile length (one value for all, or one each)",
    )
    s.add_argument(
        "--density",
        type=float,
        default=0.5,
        help="KV density budget d: mean kept KV / N over all heads, in [band*d, d]",
    )
    s.add_argument(
        "--budget-on",
        choices=("heads", "kv-cache"),
        default="kv-cache",
        help="what the budget bounds: the KV-cache size (the default: with GQA "
        "each KV head keeps its query heads' largest span, so this is decode "
        "memory), or the mean over query heads (the paper; with GQA the cache "
        "then grows past the budget)",
    )
    s.add_argument(
        "--band", type=float, default=0.9, help="lower end of the band as a fraction of d"
    )
    s.add_argument(
        "--density-lengths",
        type=int,
        nargs="*",
        default=None,
        help="extra lengths where the band must hold (default: the validation length)",
    )
    s.add_argument("--max-rules-per-layer", type=int, default=2)
    s.add_argument("--sink", type=int, default=64, help="sink tokens inside every span")
    s.add_argument(
        "--extend-length",
        type=int,
        default=None,
        help="longest length rules must stay valid at (grid filter; default 2*max N)",
    )
    s.add_argument(
        "--estimator",
        choices=tuple(ESTIMATORS),
        default="answer-copy",
        help="rule loss: sum of |E| over the exact dropped entries (token), over "
        "the dropped entries of the rows that predict the answer (answer), the "
        "largest of those (answer-max, mean over items), the answer rows' "
        "dropped attention on earlier places of the tokens they predict "
        "(copy), answer + copy on one scale (answer-copy), the reference's "
        "64x64 blocks (block), or the signed first-order loss change of "
        "dropping the whole window with rows renormalised (window)",
    )
    s.add_argument(
        "--eps-intervals",
        type=int,
        default=2,
        help="epsilon-constraint points per secondary objective (reference: 4)",
    )
    s.add_argument(
        "--milp-time-limit",
        type=float,
        default=30.0,
        help="seconds per MILP (the best solution found so far is used)",
    )
    s.add_argument("--milp-gap", type=float, default=1e-2, help="relative MIP gap")
    v = p.add_argument_group("validation")
    v.add_argument(
        "--validation-length",
        type=int,
        default=4096,
        help="length of the held-out items the candidates are measured at",
    )
    v.add_argument("--validation-items", type=int, default=1)
    v.add_argument(
        "--max-candidates",
        type=int,
        default=2,
        help="Pareto candidates measured (spread over the front)",
    )
    v.add_argument(
        "--validate-backend",
        choices=("auto", "masked", "moa"),
        default="auto",
        help="masked: chunked jnp oracle (CPU); moa: the Pallas MoA backend",
    )
    v.add_argument(
        "--no-validate",
        action="store_true",
        help="skip measuring; pick the candidate with the lowest summed estimate",
    )
    c = p.add_argument_group("compute")
    c.add_argument("--batch-size", type=int, default=1, help="items per forward/backward")
    c.add_argument("--q-chunk", type=int, default=None, help="influence rows per step (auto)")
    c.add_argument(
        "--remat",
        action="store_true",
        help="recompute each layer's activations in the profiling backward pass "
        "(less memory, about a third more compute)",
    )
    c.add_argument(
        "--mesh",
        default=None,
        metavar="DATA,FSDP,TENSOR",
        help="profile on a device mesh (moa_jax.parallel), e.g. 8,1,1 or 2,2,2; -1 "
        "takes the remaining devices; batches split over data x fsdp (make "
        "--batch-size a multiple), heads and MLP over tensor. Default: one "
        "device",
    )
    c.add_argument(
        "--attn-chunk",
        type=int,
        default=512,
        help="query chunk of the memory-light attention used by profiling/validation",
    )
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, help="output directory (default runs/profile/<model>)")
    o.add_argument(
        "--heatmap-length",
        type=int,
        default=None,
        help="N of the span heatmap (default: the validation length)",
    )
    o.add_argument(
        "--fast", action="store_true", help=f"small end-to-end run (overrides defaults: {FAST})"
    )
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _log(msg: str) -> None:
    print(f"[moa_jax.profile] {msg}", file=sys.stderr, flush=True)


def _model_slug(name: str) -> str:
    base = Path(name).name or name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base.removesuffix(".gguf")) or "model"


def _window_estimate(profile, window: int, estimator: str) -> float | None:
    """Estimated loss of `window` in every head of `profile`; None when the 'window' estimator
    has no estimate for it (a profile reused from a run at another --density)."""
    if (
        estimator == "window"
        and window < profile.length
        and window not in set(profile.windows.tolist())
    ):
        return None
    return float(profile.window_losses(np.array([window]), estimator).sum())


def _counts(lengths: Sequence[int], items: Sequence[int]) -> dict[int, int]:
    if len(items) == 1:
        return {int(n): int(items[0]) for n in lengths}
    if len(items) != len(lengths):
        raise SystemExit(
            f"--items takes one value or one per length ({len(lengths)}), got {len(items)}"
        )
    return {int(n): int(c) for n, c in zip(lengths, items)}


def _config_dict(cfg) -> dict[str, Any]:
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


def layer_groups(plan, n: int) -> list[str]:
    """Per layer: 'span@N x heads' groups, e.g. 'L3: 1024+0.25N=2048 x5, N x4'."""
    lines = []
    spans = plan.resolve(n)
    for layer in range(plan.num_layers):
        groups: dict[tuple, list[int]] = {}
        for h in range(plan.num_heads):
            key = (plan.alphas[layer][h], plan.betas[layer][h])
            groups.setdefault(key, []).append(h)
        parts = []
        for (a, b), heads in sorted(groups.items(), key=lambda kv: kv[1][0]):
            w = int(spans[layer, heads[0]])
            kept = "dense" if w >= n else f"{w + plan.sinks[layer][heads[0]]}"
            parts.append(f"{a:g}{b:+g}N ({kept}) x{len(heads)}")
        lines.append(f"L{layer:02d}: " + ", ".join(parts))
    return lines


def _plots(
    out: Path,
    plan,
    problem,
    grid,
    candidates,
    front_names,
    chosen,
    measured,
    budget,
    heatmap_n,
    val_n,
    dens_val,
) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    # spans heatmap
    kept = plan.kept_kv(heatmap_n)
    fig, ax = plt.subplots(
        figsize=(max(4, plan.num_heads * 0.6 + 2), max(3, plan.num_layers * 0.25 + 1.5))
    )
    im = ax.imshow(kept / heatmap_n, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_title(f"kept KV / N at N={heatmap_n} (mean {plan.kv_density(heatmap_n):.3f})")
    if plan.num_layers * plan.num_heads <= 400:
        for (l, h), v in np.ndenumerate(kept):
            ax.text(
                h,
                l,
                f"{v}" if v < heatmap_n else "all",
                ha="center",
                va="center",
                fontsize=5,
                color="w" if v < 0.6 * heatmap_n else "k",
            )
    fig.colorbar(im, ax=ax, label="density")
    fig.tight_layout()
    fig.savefig(out / "spans.png", dpi=130)
    plt.close(fig)
    written.append("spans.png")

    # estimated loss vs density per profile length (+ measured at validation length)
    lengths = problem.lengths
    ncol = len(lengths) + (1 if measured else 0)
    fig, axes = plt.subplots(1, ncol, figsize=(4.2 * ncol, 3.6), squeeze=False)
    for ax, n in zip(axes[0], lengths):
        dens = grid.kv_density(n)
        uni = problem.losses[n].sum(axis=(0, 1))
        pos = uni[uni > 0]
        floor = float(pos.min()) / 3 if pos.size else 1e-9  # dense rules (loss 0) plot here
        order = np.argsort(dens)
        ax.plot(
            dens[order],
            np.maximum(uni[order], floor),
            ".",
            color="0.6",
            label="one rule for all heads",
        )
        labelled = set()
        for name, sol in candidates.items():
            kind = (
                "chosen plan"
                if name == chosen
                else "Pareto candidate"
                if name in front_names
                else "dominated MILP solution"
            )
            mark = {"chosen plan": "*", "Pareto candidate": "o"}.get(kind, "x")
            ax.plot(
                sol.densities[n],
                max(sol.objectives[n], floor),
                mark,
                ms=16 if mark == "*" else 6,
                color="C3" if name == chosen else "C0",
                mec="k" if mark == "*" else None,
                zorder=3 if mark == "*" else 2,
                label=None if kind in labelled else kind,
            )
            labelled.add(kind)
        ax.axvline(budget, color="k", lw=0.6, ls="--", label=f"density budget {budget:g}")
        ax.set_yscale("log")
        ax.set_xlabel(f"KV density at N={n}")
        ax.set_ylabel("estimated loss increase")
        ax.set_title(f"N={n}")
    axes[0][0].legend(fontsize=7)
    if measured:
        ax = axes[0][-1]
        for name, losses in measured.items():
            d = dens_val.get(name, 1.0)
            color = "C3" if name == chosen else ("k" if name in ("dense", "uniform") else "C0")
            ax.plot(
                d,
                float(np.mean(losses)),
                "*" if name == chosen else "o",
                color=color,
                ms=16 if name == chosen else 6,
                mec="k" if name == chosen else None,
            )
            ax.annotate(
                name,
                (d, float(np.mean(losses))),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        ax.set_xlabel(f"KV density at N={val_n}")
        ax.set_ylabel("measured answer loss (held out)")
        ax.set_title(f"validation N={val_n}")
    fig.tight_layout()
    fig.savefig(out / "loss_vs_density.png", dpi=130)
    plt.close(fig)
    written.append("loss_vs_density.png")
    return written


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole pipeline; returns the report dict (also written to report.json)."""
    import jax

    from moa_jax.corpora import cache_dir, load_corpus
    from moa_jax.models.registry import load_model
    from moa_jax.plan import Plan
    from moa_jax.search import calibration as cal
    from moa_jax.search.optimize import SearchProblem, epsilon_sweep, pareto_front
    from moa_jax.search.answer_loss import make_batches
    from moa_jax.search.influence_profile import InfluenceProfile
    from moa_jax.search.sensitivity import profile_items
    from moa_jax.search.rules import scaled_grid
    from moa_jax.search.validate import measure_plans, pick_best

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    progress = not args.no_progress
    lengths = sorted(int(n) for n in args.lengths)
    for n in lengths + [args.validation_length]:
        if n % 64:
            raise SystemExit(f"lengths must be multiples of 64, got {n}")
    counts = _counts(args.lengths, args.items)
    counts = {n: counts[n] for n in lengths}
    if not 0 < args.density <= 1:
        raise ValueError(f"--density must be in (0, 1], got {args.density}")
    if any(c < 1 for c in counts.values()):
        raise ValueError(f"--items must be >= 1, got {args.items}")
    out = Path(args.out or Path("runs") / "profile" / _model_slug(args.model))
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a directory")
    mesh = None
    if args.mesh:
        from moa_jax.parallel import MeshConfig, make_mesh

        mesh = make_mesh(MeshConfig.parse(args.mesh))
    # the folder is made once the corpus and the model have loaded (a bad input leaves none)
    docs = load_corpus(args.corpus, text_field=args.text_field)

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    if tokenizer is None:
        raise SystemExit(f"model {args.model!r} has no tokenizer; calibration needs one")
    cfg = model.config
    timings["load_model"] = time.perf_counter() - t0
    longest = max(lengths + [args.validation_length])
    if cfg.max_position_embeddings and longest > cfg.max_position_embeddings:
        _log(f"warning: length {longest} exceeds the model's context {cfg.max_position_embeddings}")
    _log(
        f"model {args.model}: {cfg.num_layers} layers x {cfg.num_heads} heads "
        f"({cfg.num_kv_heads} KV heads), jax backend {jax.default_backend()}"
    )

    out.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- calibration
    t0 = time.perf_counter()
    # held-out documents are set aside even with --no-validate, so the calibration set (and
    # its cache) does not depend on that flag
    # at most a third of the documents are held out (a corpus of a few long novels gives
    # several held-out items per document, from different excerpts)
    n_holdout = max(1, min(args.validation_items, len(docs) // 3))
    calib_docs, val_docs = cal.split_documents(
        docs, n_holdout, args.seed, min_chars=3 * args.validation_length
    )
    n_val = 0 if args.no_validate else args.validation_items
    cache_root = (
        Path(args.calibration_cache) if args.calibration_cache else cache_dir() / "calibration"
    )
    ident = dict(
        model=args.model,
        config=_config_dict(cfg),
        dtype=args.dtype,
        corpus=cal.corpus_fingerprint(docs),
        seed=args.seed,
        answer_tokens=args.answer_tokens,
        chat=not args.no_chat_template,
        tasks=list(cal.DEFAULT_TASKS),
        n_val=args.validation_items,
        val_length=args.validation_length,
    )
    if args.recall_fraction:
        ident["recall_fraction"] = args.recall_fraction
    key = cal.calibration_key(split="calibration", counts=counts, **ident)
    _log(
        f"calibration set {key}: {sum(counts.values())} items over {len(calib_docs)} documents "
        f"(cache {cache_root})"
    )
    items = cal.build_items(
        model,
        tokenizer,
        calib_docs,
        counts,
        answer_tokens=args.answer_tokens,
        chat=not args.no_chat_template,
        recall_fraction=args.recall_fraction,
        seed=args.seed,
        batch_size=args.batch_size,
        cache_file=cache_root / f"{key}.jsonl",
        q_chunk=args.attn_chunk,
        progress=progress,
    )
    val_items: list = []
    val_key = None
    if n_val:
        val_key = cal.calibration_key(
            split="validation", counts={args.validation_length: n_val}, **ident
        )
        val_items = cal.build_items(
            model,
            tokenizer,
            val_docs,
            {args.validation_length: n_val},
            answer_tokens=args.answer_tokens,
            chat=not args.no_chat_template,
            recall_fraction=args.recall_fraction,
            seed=args.seed + 1,
            batch_size=args.batch_size,
            cache_file=cache_root / f"{val_key}.jsonl",
            q_chunk=args.attn_chunk,
            progress=progress,
            desc="held-out items",
        )[args.validation_length]
    cal.describe(items, tokenizer)
    timings["calibration"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- profiling
    t0 = time.perf_counter()
    if mesh is not None:
        _log(f"profiling on a {dict(mesh.shape)} mesh of {mesh.devices.size} devices")
    grid = scaled_grid(lengths, args.extend_length, sink=args.sink)
    uniform = Plan(
        alphas=np.zeros((cfg.num_layers, cfg.num_heads)).tolist(),
        betas=args.density,
        sinks=args.sink,
        granularity=grid.granularity,
        min_span=grid.min_span,
        metadata={"source": "uniform", "beta": args.density},
    )
    profiles = {}
    pdir = out / "profiles"
    for n in lengths:
        # the rules' windows (and the uniform baseline's), scored in the backward pass only for
        # the 'window' estimator (the other estimators read the |E| sums)
        windows = (
            sorted(
                w
                for w in {int(w) for w in grid.windows(n)} | {int(uniform.resolve(n)[0, 0])}
                if w < n
            )
            if args.estimator == "window"
            else []
        )  # a window >= N drops nothing
        # the 'answer' estimators need the answer rows alone (the fast path: any exact
        # attention kernel, the answer rows recomputed); the others every row's sums
        answer = args.estimator in ROWS_ONLY_ESTIMATORS
        fast_only = args.estimator in FAST_PATH_ESTIMATORS
        token = not answer
        path = pdir / f"profile-{n}-{key}-{args.sink}-v2.npz"
        prof = InfluenceProfile.load(path) if path.exists() else None
        missing = prof is not None and (
            not set(windows) <= set(prof.windows.tolist())
            or (answer and prof.answer is None)
            or (fast_only and (prof.answer_max is None or prof.copy is None))
            or (token and not prof.token)
        )
        if missing:  # profiled again, keeping the sums the old one had
            _log(
                f"N={n}: the cached profile lacks the {args.estimator} estimator's sums; "
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
        if prof is not None and prof.count >= len(items[n]):
            _log(f"N={n}: profile loaded from {path}")
        else:
            prof = profile_items(
                model,
                items[n],
                n,
                sink=args.sink,
                batch_size=args.batch_size,
                q_chunk=args.q_chunk,
                remat=args.remat,
                windows=windows,
                answer=answer,
                token=token,
                progress=progress,
                profile=prof,
                mesh=mesh,
                on_batch=lambda p, path=path: p.save(path),
            )
            prof.save(path)
        profiles[n] = prof
        _log(f"N={n}: {prof.count} items, dense answer loss {prof.dense_loss:.4f}")
    timings["profile"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- optimisation
    t0 = time.perf_counter()
    dlen = args.density_lengths if args.density_lengths is not None else [args.validation_length]
    problem = SearchProblem.from_profiles(
        grid,
        profiles,
        args.density,
        density_lengths=dlen,
        band=args.band,
        max_rules_per_layer=args.max_rules_per_layer,
        estimator=args.estimator,
        kv_group=cfg.num_heads // cfg.num_kv_heads,
        budget_on=args.budget_on,
    )
    _log(grid.describe(sorted(problem.densities)))
    sols = epsilon_sweep(
        problem,
        args.eps_intervals,
        time_limit=args.milp_time_limit,
        gap=args.milp_gap,
        progress=progress,
    )
    front = pareto_front(sols)
    timings["optimise"] = time.perf_counter() - t0
    _log(f"{len(sols)} MILP solutions, {len(front)} non-dominated")

    def as_plan(sol, name):
        return grid.plan(sol.choice, metadata={"candidate": name})

    names = [f"c{i}" for i in range(len(front))]
    cands = {nm: s for nm, s in zip(names, front)}
    # candidates to measure: spread along the front (sorted by the longest length's estimate)
    by_long = sorted(names, key=lambda nm: cands[nm].objectives[lengths[-1]])
    chosen_set = [by_long[i] for i in _spread(len(by_long), max(1, args.max_candidates))]
    plans = {nm: as_plan(cands[nm], nm) for nm in names}
    cdir = out / "candidates"
    cdir.mkdir(exist_ok=True)
    for nm in names:
        plans[nm].save(cdir / f"{nm}.json")

    # ---------------------------------------------------------------- validation
    t0 = time.perf_counter()
    measured: dict[str, np.ndarray] = {}
    val_n = args.validation_length
    dense = Plan.dense(cfg.num_layers, cfg.num_heads)
    if n_val:
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        batches = make_batches(val_items, val_n, args.batch_size, pad)
        to_measure = {"dense": dense, "uniform": uniform, **{nm: plans[nm] for nm in chosen_set}}
        measured = measure_plans(
            model,
            batches,
            to_measure,
            val_n,
            backend=args.validate_backend,
            q_chunk=args.attn_chunk,
            progress=progress,
        )
        best = pick_best(measured, chosen_set)
    else:
        norm = {n: max(s.objectives[n] for s in front) or 1.0 for n in lengths}
        best = min(
            chosen_set, key=lambda nm: sum(cands[nm].objectives[n] / norm[n] for n in lengths)
        )
    timings["validate"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- outputs
    sol = cands[best]
    report_lengths = sorted(set(lengths) | set(problem.densities) | {val_n})
    density_kv = {n: plans[best].kv_density(n) for n in report_lengths}
    density_attn = {n: plans[best].attention_density(n) for n in report_lengths}
    density_cache = {n: plans[best].kv_cache_density(n, cfg.num_kv_heads) for n in report_lengths}
    meta = {
        "model": args.model,
        "model_config": _config_dict(cfg),
        "dtype": args.dtype,
        "created_by": "moa_jax.profile",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "budget": {
            "kv_density": args.density,
            "band": args.band,
            "on": args.budget_on,
            "density_lengths": sorted(problem.densities),
            "max_rules_per_layer": args.max_rules_per_layer,
        },
        "profile_lengths": lengths,
        "validation_length": val_n,
        "calibration": {
            "corpus": args.corpus,
            "key": key,
            "validation_key": val_key,
            "items": {str(n): len(items[n]) for n in lengths},
            "validation_items": len(val_items),
            "answer_tokens": args.answer_tokens,
            "recall_fraction": args.recall_fraction,
        },
        "estimator": args.estimator,
        "estimated_loss": {str(n): sol.objectives[n] for n in lengths},
        "dense_answer_loss": {str(n): profiles[n].dense_loss for n in lengths},
        "kv_density": {str(n): v for n, v in density_kv.items()},
        "attention_density": {str(n): v for n, v in density_attn.items()},
        "kv_cache_density": {str(n): v for n, v in density_cache.items()},
        "rule_grid": grid.to_dict(),
        "candidate": best,
    }
    if measured:
        meta["validated_loss"] = float(np.mean(measured[best]))
        meta["validation"] = {nm: float(np.mean(v)) for nm, v in measured.items()}
    plan = grid.plan(sol.choice, metadata=meta)
    plan.validate(cfg)
    plan_path = plan.save(out / "plan.json")

    dens_val = {nm: plans[nm].kv_density(val_n) for nm in names}
    dens_val.update({"dense": 1.0, "uniform": uniform.kv_density(val_n)})

    def uniform_estimate(n):
        return _window_estimate(profiles[n], int(uniform.resolve(n)[0, 0]), args.estimator)

    heat_n = args.heatmap_length or val_n
    figs = _plots(
        out,
        plan,
        problem,
        grid,
        cands,
        set(chosen_set),
        best,
        measured,
        args.density,
        heat_n,
        val_n,
        dens_val,
    )
    timings["total"] = time.perf_counter() - t_start
    report = {
        "plan": str(plan_path),
        "figures": figs,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "kv_density": meta["kv_density"],
        "attention_density": meta["attention_density"],
        "kv_cache_density": meta["kv_cache_density"],
        "estimated_loss": meta["estimated_loss"],
        "dense_answer_loss": meta["dense_answer_loss"],
        "validation": meta.get("validation"),
        "chosen": best,
        "candidates": {
            nm: {
                **cands[nm].to_json(),
                "measured": nm in chosen_set,
                "validated_loss": (float(np.mean(measured[nm])) if nm in measured else None),
            }
            for nm in names
        },
        "uniform_baseline": {
            "alpha": 0,
            "beta": args.density,
            "sink": args.sink,
            "estimated_loss": {str(n): uniform_estimate(n) for n in lengths},
            "kv_density": {str(n): uniform.kv_density(n) for n in report_lengths},
        },
        "spans_per_layer": layer_groups(plan, val_n),
        "args": {k: (v if not isinstance(v, Path) else str(v)) for k, v in vars(args).items()},
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
    _print_summary(report, plan, lengths, val_n, measured)
    return report


def _print_summary(report, plan, lengths, val_n, measured) -> None:
    print(f"plan: {report['plan']}  (candidate {report['chosen']})")
    print("KV density (attention density; KV-cache size vs dense) at each length:")
    for n, v in report["kv_density"].items():
        print(
            f"  N={n}: {v:.3f} ({report['attention_density'][n]:.3f}; "
            f"{report['kv_cache_density'][n]:.3f})"
        )
    est = ESTIMATORS[report["args"]["estimator"]]
    print(f"estimated loss of the plan ({est}) vs one uniform rule:")
    for n in lengths:
        u = report["uniform_baseline"]["estimated_loss"][str(n)]
        print(
            f"  N={n}: plan {report['estimated_loss'][str(n)]:.4g}, uniform "
            + ("n/a (profile reused from another --density)" if u is None else f"{u:.4g}")
        )
    if measured:
        print(f"measured answer loss on held-out items at N={val_n}:")
        for nm, v in report["validation"].items():
            tag = " <- chosen" if nm == report["chosen"] else ""
            print(f"  {nm:8s} {v:.4f}{tag}")
    print(f"spans per layer at N={val_n} (alpha+beta*N (kept tokens) x heads):")
    for line in report["spans_per_layer"]:
        print("  " + line)
    print("timings (s): " + ", ".join(f"{k} {v}" for k, v in report["timings_s"].items()))


def main(argv: Sequence[str] | None = None) -> int:
    from moa_jax.cli import enable_compilation_cache, parse_args

    parser = _build_parser()
    base = {k: parser.get_default(k) for k in FAST}
    args = parse_args(parser, argv)
    enable_compilation_cache()
    if args.fast:  # fast values replace built-in defaults, never YAML or explicit flags
        for k, v in FAST.items():
            if getattr(args, k) == base[k]:
                setattr(args, k, v)
    run(args)
    return 0


if __name__ == "__main__":
    from moa_jax.cli import run as _run

    raise SystemExit(_run(main))
