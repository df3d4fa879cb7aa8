"""The outputs of `moa_jax.profile.run`: plan.json (with the run's metadata), report.json, the
figures (spans.png, loss_vs_density.png) and the summary printed as the command's answer."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from moa_jax.files import atomic_write_text
from moa_jax.plan import Plan, model_metadata
from moa_jax.profile.steps import Calibration, Search, model_config_dict
from moa_jax.search.estimators import ESTIMATORS
from moa_jax.search.influence_profile import InfluenceProfile
from moa_jax.search.rules import RuleGrid

if TYPE_CHECKING:  # a type only: the package imports this module
    from moa_jax.profile import ProfileConfig


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


def write_outputs(
    config: ProfileConfig,
    out: Path,
    cfg,
    grid: RuleGrid,
    uniform: Plan,
    calib: Calibration,
    profiles: dict[int, InfluenceProfile],
    found: Search,
    measured: dict[str, np.ndarray],
    best: str,
    lengths: Sequence[int],
    timings: dict[str, float],
    t_start: float,
) -> dict[str, Any]:
    """Writes plan.json (the chosen candidate with the run's metadata), the figures and
    report.json into `out`; returns the report."""
    problem, cands, plans, names = found.problem, found.candidates, found.plans, found.names
    items, val_items = calib.items, calib.val_items
    val_n = config.validation_length
    sol = cands[best]
    report_lengths = sorted(set(lengths) | set(problem.densities) | {val_n})
    density_kv = {n: plans[best].kv_density(n) for n in report_lengths}
    density_attn = {n: plans[best].attention_density(n) for n in report_lengths}
    density_cache = {n: plans[best].kv_cache_density(n, cfg.num_kv_heads) for n in report_lengths}
    meta = {
        "model": config.model,
        **model_metadata(cfg),
        "model_config": model_config_dict(cfg),
        "dtype": config.dtype,
        "created_by": "moa_jax.profile",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "budget": {
            "kv_density": config.density,
            "band": config.band,
            "on": config.budget_on,
            "density_lengths": sorted(problem.densities),
            "max_rules_per_layer": config.max_rules_per_layer,
        },
        "profile_lengths": lengths,
        "validation_length": val_n,
        "calibration": {
            "corpus": config.corpus,
            "key": calib.key,
            "validation_key": calib.val_key,
            "items": {str(n): len(items[n]) for n in lengths},
            "validation_items": len(val_items),
            "answer_tokens": config.answer_tokens,
            "recall_fraction": config.recall_fraction,
        },
        "estimator": config.estimator,
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
        return _window_estimate(profiles[n], int(uniform.resolve(n)[0, 0]), config.estimator)

    heat_n = config.heatmap_length or val_n
    figs = plots(
        out,
        plan,
        problem,
        grid,
        cands,
        set(found.to_measure),
        best,
        measured,
        config.density,
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
                "measured": nm in found.to_measure,
                "validated_loss": (float(np.mean(measured[nm])) if nm in measured else None),
            }
            for nm in names
        },
        "uniform_baseline": {
            "alpha": 0,
            "beta": config.density,
            "sink": config.sink,
            "estimated_loss": {str(n): uniform_estimate(n) for n in lengths},
            "kv_density": {str(n): uniform.kv_density(n) for n in report_lengths},
        },
        "spans_per_layer": layer_groups(plan, val_n),
        "args": config.as_dict(),
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
    return report


def plots(
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
    import matplotlib  # here: importing matplotlib takes a second, and only the figures need it

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


def print_summary(report: dict[str, Any], lengths: Sequence[int], val_n: int, measured) -> None:
    """The command's answer on stdout: the plan, its densities and losses, its spans."""
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
