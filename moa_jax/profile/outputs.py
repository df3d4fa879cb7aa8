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
    """Writes spans.png (`plot_spans`) and loss_vs_density.png (`plot_loss_vs_density`) into
    `out`; returns their names."""
    plot_spans(out / "spans.png", plan, heatmap_n, chosen, budget)
    plot_loss_vs_density(
        out / "loss_vs_density.png",
        plan,
        problem,
        grid,
        candidates,
        front_names,
        chosen,
        measured,
        budget,
        val_n,
        dens_val,
    )
    return ["spans.png", "loss_vs_density.png"]


def _pyplot():
    import matplotlib  # here: importing matplotlib takes a second, and only the figures need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_BUDGET_ON = {"kv-cache": "KV-cache size", "heads": "mean over query heads"}


def budget_text(plan, budget: float) -> str:
    """The plan's density budget in words, from its metadata (`write_outputs`): 'budget: KV
    density <= 0.5 of the KV-cache size at N = 1024, 2048, 3072, 4096'."""
    b = plan.metadata.get("budget") or {}
    text = f"budget: KV density <= {budget:g}"
    if b.get("on") in _BUDGET_ON:
        text += f" of the {_BUDGET_ON[b['on']]}"
    lengths = b.get("density_lengths")
    if lengths:
        text += " at N = " + ", ".join(str(n) for n in lengths)
    return text


def spans_title(plan, n: int, chosen: str, budget: float) -> str:
    """spans.png's title: the model, the plan (its candidate name), its KV density at `n` and
    the budget it was searched under (`budget_text`)."""
    model = plan.metadata.get("model", "model ?")
    return (
        f"{model}, plan {chosen}: kept KV per head at N={n} "
        f"(KV density {plan.kv_density(n):.3f})\n{budget_text(plan, budget)}"
    )


def _cell_fontsize(fig, ax, rows: int, cols: int, chars: int) -> float | None:
    """Font size (points) at which a `chars`-character label fits a cell of the `rows` x `cols`
    image in `ax`, at most 9; None when it would be under 4 (too small to read)."""
    box = ax.get_window_extent(fig.canvas.get_renderer())
    cell_h = box.height / rows * 72 / fig.dpi
    cell_w = box.width / cols * 72 / fig.dpi
    size = min(9.0, 0.6 * cell_h, 0.9 * cell_w / max(chars, 1) / 0.6)
    return size if size >= 4 else None


def plot_spans(path: Path, plan, n: int, chosen: str, budget: float):
    """Heatmap of the tokens each head (columns) of each layer (rows) keeps at length `n`,
    coloured by kept / n; the counts are written in the cells where they fit. Returns the
    (closed) figure."""
    plt = _pyplot()
    kept = plan.kept_kv(n)
    layers, heads = kept.shape
    fig, ax = plt.subplots(
        figsize=(min(16, max(5.5, heads * 0.55 + 2.5)), min(14, max(4, layers * 0.28 + 2)))
    )
    im = ax.imshow(kept / n, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    if heads <= 48:
        ax.set_xticks(range(heads))
    if layers <= 48:
        ax.set_yticks(range(layers))
    ax.tick_params(labelsize=7)
    ax.set_title(spans_title(plan, n, chosen, budget), fontsize=9)
    fig.colorbar(im, ax=ax, label="kept KV / N")
    fig.tight_layout()
    labels = np.where(kept >= n, "all", kept.astype(str))
    size = _cell_fontsize(fig, ax, layers, heads, max(len(t) for t in labels.flat))
    if size is not None:
        for (layer, head), text in np.ndenumerate(labels):
            dark = kept[layer, head] < 0.6 * n
            ax.text(
                head,
                layer,
                text,
                ha="center",
                va="center",
                fontsize=size,
                color="w" if dark else "k",
            )
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return fig


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
_COLOURS = ("C0", "C1", "C2", "C4", "C5", "C6", "C8", "C9")  # C3 (red): the chosen plan


def _candidate_styles(candidates, front_names, chosen) -> dict[str, dict[str, Any]]:
    """Per candidate a marker, a colour and a legend label ('c1 (Pareto)'), the chosen one a
    large red star: the same in every panel."""
    styles = {}
    others = [nm for nm in candidates if nm != chosen]
    for i, name in enumerate(others):
        kind = "Pareto, validated" if name in front_names else "dominated"
        styles[name] = dict(
            marker=_MARKERS[i % len(_MARKERS)],
            color=_COLOURS[i % len(_COLOURS)],
            ms=7,
            mec="k",
            mew=0.5,
            ls="none",
            label=f"{name} ({kind})",
        )
    styles[chosen] = dict(
        marker="*",
        color="C3",
        ms=16,
        mec="k",
        mew=0.8,
        ls="none",
        zorder=3,
        label=f"{chosen} (chosen plan)",
    )
    return styles


def loss_title(plan, chosen: str, budget: float) -> str:
    """loss_vs_density.png's title: the model, the chosen plan and the budget."""
    model = plan.metadata.get("model", "model ?")
    return (
        f"{model}: estimated loss of each MILP candidate vs its KV density; chosen plan "
        f"{chosen}\n{budget_text(plan, budget)}"
    )


def plot_loss_vs_density(
    path: Path,
    plan,
    problem,
    grid,
    candidates,
    front_names,
    chosen,
    measured,
    budget,
    val_n,
    dens_val,
):
    """One panel per profile length: each candidate's estimated loss increase against its KV
    density, beside one rule for all heads; with `measured`, a last panel of the held-out
    answer loss at `val_n` (candidates, dense and the uniform window). One legend for the
    figure. Returns the (closed) figure."""
    plt = _pyplot()
    styles = _candidate_styles(candidates, front_names, chosen)
    lengths = problem.lengths
    ncol = len(lengths) + (1 if measured else 0)
    fig, axes = plt.subplots(
        1, ncol, figsize=(4.2 * ncol, 4.4), squeeze=False, layout="constrained"
    )
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
        for name, sol in candidates.items():
            ax.plot(sol.densities[n], max(sol.objectives[n], floor), **styles[name])
        ax.axvline(budget, color="k", lw=0.6, ls="--", label=f"density budget {budget:g}")
        ax.set_yscale("log")
        ax.set_xlabel(f"KV density at N={n}")
        ax.set_ylabel("estimated loss increase")
        ax.set_title(f"profile length N={n}", fontsize=9)
    if measured:
        ax = axes[0][-1]
        baselines = {
            "dense": dict(marker="s", color="k", label="dense"),
            "uniform": dict(marker="D", color="0.5", label="uniform window + sinks"),
        }
        for name, losses in measured.items():
            style = styles.get(name) or {"ls": "none", "ms": 7, **baselines.get(name, {})}
            ax.plot(dens_val.get(name, 1.0), float(np.mean(losses)), **style)
        ax.set_xlabel(f"KV density at N={val_n}")
        ax.set_ylabel("measured answer loss (held out)")
        ax.set_title(f"validation N={val_n}", fontsize=9)
    fig.suptitle(loss_title(plan, chosen, budget), fontsize=10)
    seen: dict[str, Any] = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    fig.legend(
        seen.values(), seen.keys(), loc="outside lower center", ncol=min(len(seen), 4), fontsize=8
    )
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return fig


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
