"""Summaries, tables, results.json and plots of an evaluation run."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moa_jax.eval.tasks import TASKS
from moa_jax.files import atomic_write_text

_METRICS = ("acc", "digit_acc", "recall", "nll", "tf_acc")


def summarize(
    records: Sequence[dict[str, Any]], methods: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """One row per (task, length, method): item count, mean of each metric, the task's primary
    value (`value`; perplexity for 'lm' tasks) and the method's KV density at that length."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["task"], r["length"], r["method"])].append(r)
    rows = []
    for (task, length, method), recs in groups.items():
        t = TASKS.get(task)
        row: dict[str, Any] = {
            "task": task,
            "family": recs[0].get("family"),
            "length": length,
            "method": method,
            "n": len(recs),
            "primary": t.primary if t else None,
        }
        for k in _METRICS:
            vals = [r[k] for r in recs if k in r]
            if vals:
                row[k] = float(np.mean(vals))
        if row["primary"] == "ppl":
            row["ppl"] = math.exp(row["nll"])
        row["value"] = row.get(row["primary"]) if row["primary"] else None
        row["seconds"] = float(sum(r.get("seconds", 0.0) for r in recs))
        if methods and method in methods:
            row["kv_density"] = methods[method].get("kv_density", {}).get(str(length))
        rows.append(row)
    order = {name: i for i, name in enumerate(TASKS)}
    mo = {name: i for i, name in enumerate(methods or {})}
    rows.sort(key=lambda r: (order.get(r["task"], 99), r["length"], mo.get(r["method"], 99)))
    return rows


def _fmt(x: Any, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _length_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _markdown(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table: the header cells `head`, then one line per row of cells."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def pivot_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: methods as rows, (task metric @ length) as columns, primary values."""
    cols = list(dict.fromkeys((r["task"], r["primary"], r["length"]) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    val = {(r["task"], r["length"], r["method"]): r for r in rows}
    head = ["method"] + [f"{t} {p} @{_length_label(n)}" for t, p, n in cols]
    body = []
    for m in methods:
        cells = [m]
        for t, _, n in cols:
            r = val.get((t, n, m))
            cells.append(_fmt(r["value"] if r else None, 2))
        body.append(cells)
    return _markdown(head, body)


def detail_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: one line per (task, length, method) with every metric."""
    head = [
        "task",
        "length",
        "method",
        "KV density",
        "n",
        "metric",
        "value",
        "digit acc",
        "answer NLL",
        "answer tf-acc",
        "seconds",
    ]
    body = [
        [
            r["task"],
            str(r["length"]),
            r["method"],
            _fmt(r.get("kv_density"), 2),
            str(r["n"]),
            str(r["primary"]),
            _fmt(r.get("value")),
            _fmt(r.get("digit_acc")),
            _fmt(r.get("nll")) if r["primary"] != "ppl" else "-",
            _fmt(r.get("tf_acc")),
            f"{r['seconds']:.0f}",
        ]
        for r in rows
    ]
    return _markdown(head, body)


def paired_deltas(
    records: Sequence[dict[str, Any]], baseline: str = "dense"
) -> list[dict[str, Any]]:
    """Per (task, length, method != baseline): the mean paired difference to the baseline on the
    same items, with its standard error (std of the differences / sqrt(n)), for the task's
    primary metric (for perplexity: the tail NLL, i.e. log perplexity) and the answer NLL.

    Items are shared by all methods of a run, so paired differences cancel item difficulty and
    are far more sensitive than comparing the two means."""
    base = {(r["task"], r["length"], r["index"]): r for r in records if r["method"] == baseline}
    groups: dict[tuple, list[tuple[dict, dict]]] = defaultdict(list)
    for r in records:
        b = base.get((r["task"], r["length"], r["index"]))
        if r["method"] != baseline and b is not None:
            groups[(r["task"], r["length"], r["method"])].append((r, b))
    out = []
    for (task, length, method), pairs in groups.items():
        t = TASKS.get(task)
        row: dict[str, Any] = {
            "task": task,
            "length": length,
            "method": method,
            "baseline": baseline,
            "n": len(pairs),
        }
        keys = (
            [("nll", "nll")]
            if t is not None and t.primary == "ppl"
            else [(t.primary if t else "acc", "primary"), ("nll", "nll")]
        )
        for key, name in keys:
            d = np.array([r[key] - b[key] for r, b in pairs if key in r and key in b])
            if d.size:
                row[f"delta_{name}"] = float(d.mean())
                row[f"se_{name}"] = (
                    float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("nan")
                )
        out.append(row)
    order = {name: i for i, name in enumerate(TASKS)}
    out.sort(key=lambda r: (r["length"], order.get(r["task"], 99), r["method"]))
    return out


def paired_table(deltas: Sequence[dict[str, Any]]) -> str:
    """Markdown of `paired_deltas`: differences to the baseline, +- one standard error."""
    head = [
        "task",
        "length",
        "method",
        "n",
        "delta primary (vs baseline)",
        "delta NLL (answer, or log ppl)",
    ]

    def pm(r, name):
        if f"delta_{name}" not in r:
            return "-"
        return f"{r[f'delta_{name}']:+.3f} +- {_fmt(r[f'se_{name}'])}"

    body = [
        [r["task"], str(r["length"]), r["method"], str(r["n"]), pm(r, "primary"), pm(r, "nll")]
        for r in deltas
    ]
    return _markdown(head, body)


def depth_table(records: Sequence[dict[str, Any]], task: str) -> dict[str, Any]:
    """{method: {length: {depth: mean primary}}} for items with a grid depth."""
    t = TASKS.get(task)
    key = t.primary if t else "acc"
    acc: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in records:
        if r["task"] == task and r.get("depth") is not None and key in r:
            acc[r["method"]][r["length"]][round(float(r["depth"]), 4)].append(r[key])
    return {
        m: {
            n: {d: float(np.mean(v)) for d, v in sorted(ds.items())} for n, ds in sorted(ls.items())
        }
        for m, ls in acc.items()
    }


def write_report(payload: dict[str, Any], out: Path, plots: bool = True) -> str:
    """Writes results.json, results.md and the plots into `out`; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    # MoA's claim is against one uniform window at the same memory: those differences too
    payload = {**payload, "paired_vs_uniform": paired_deltas(payload["records"], "uniform")}
    write_json(out / "results.json", payload)
    s, env, rows = payload["settings"], payload["environment"], payload["summary"]
    deltas = [d for d in payload["paired_vs_dense"]]
    vs_uniform = [d for d in payload["paired_vs_uniform"] if d["method"] != "dense"]
    skipped = [
        f"- {m}: {info['reason']}"
        for m, info in payload["methods"].items()
        if not info["available"]
    ]
    info = (
        f"{env['date']}, {env['device']}, jax {env['jax']} ({env['attention_impl']} "
        f"attention), {s['num_items']} items per cell, seed {s['seed']}, corpus "
        f"{s['corpus']}, {env['wall_seconds'] / 60:.1f} min."
    )
    md = [
        f"# moa_jax.eval: {s['model']}",
        "",
        info,
        "",
        pivot_table(rows),
        "",
        detail_table(rows),
        "",
    ]
    if deltas:
        md += [
            "Paired differences to dense on the same items (mean +- standard error):",
            "",
            paired_table(deltas),
            "",
        ]
    if vs_uniform:
        md += [
            "Paired differences to the uniform window on the same items:",
            "",
            paired_table(vs_uniform),
            "",
        ]
    if skipped:
        md += ["Methods not run:", *skipped, ""]
    text = "\n".join(md)
    atomic_write_text(out / "results.md", text)
    if plots:
        plot_vs_length(rows, out / "accuracy_vs_length.png")
        plot_depth_heatmaps(payload["records"], out / "needle_heatmap.png")
    return text


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    atomic_write_text(path, json.dumps(payload, indent=1, default=_jsonable) + "\n")
    return path


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    return str(x)


# ----------------------------------------------------------------------------- plots
def plot_vs_length(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """One panel per task: its primary metric against context length, a line per method."""
    # imported here: matplotlib takes a second or more, and only the plots need it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    if not tasks:
        return None
    ncol = min(3, len(tasks))
    nrow = -(-len(tasks) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.3 * nrow), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        sub = [r for r in rows if r["task"] == task]
        primary = sub[0]["primary"]
        for m in dict.fromkeys(r["method"] for r in sub):
            pts = sorted(
                (r["length"], r["value"])
                for r in sub
                if r["method"] == m and r["value"] is not None
            )
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        lengths = sorted({r["length"] for r in sub})
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [_length_label(n) for n in lengths])
        ax.minorticks_off()
        ax.set_title(f"{task} (n={sub[0]['n']}/cell)")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("perplexity (lower is better)" if primary == "ppl" else primary)
        if primary != "ppl":
            ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_depth_heatmaps(
    records: Sequence[dict[str, Any]], path: Path, tasks: Sequence[str] = ("needle", "retrieval")
) -> Path | None:
    """Depth x length heatmaps of the primary metric: a row per task, a column per method."""
    # imported here: matplotlib takes a second or more, and only the plots need it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = {t: depth_table(records, t) for t in tasks}
    tables = {t: d for t, d in tables.items() if d}
    if not tables:
        return None
    methods = list(dict.fromkeys(r["method"] for r in records))
    fig, axes = plt.subplots(
        len(tables),
        len(methods),
        figsize=(3.2 * len(methods) + 1.2, 3.0 * len(tables)),
        squeeze=False,
        constrained_layout=True,
    )
    im = None
    for i, (task, tab) in enumerate(tables.items()):
        for j, m in enumerate(methods):
            ax = axes[i, j]
            ls = tab.get(m, {})
            lengths = sorted(ls)
            depths = sorted({d for n in lengths for d in ls[n]})
            grid = np.full((len(depths), len(lengths)), np.nan)
            for c, n in enumerate(lengths):
                for r, d in enumerate(depths):
                    grid[r, c] = ls[n].get(d, np.nan)
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths])
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
            for r in range(len(depths)):
                for c in range(len(lengths)):
                    if not np.isnan(grid[r, c]):
                        ax.text(c, r, f"{grid[r, c]:.2f}", ha="center", va="center", fontsize=8)
            ax.set_title(f"{task}: {m}", fontsize=10)
            ax.set_xlabel("length")
            if j == 0:
                ax.set_ylabel("depth")
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label="accuracy (mean over items)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
