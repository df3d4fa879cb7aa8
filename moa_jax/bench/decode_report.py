"""What the decode benchmark reports from its rows: the summary (largest and best batch,
throughput ratios), the figure beside the JSON, and the printed table."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def summarize(rows: list[dict]) -> dict:
    """Per (variant, context) the largest batch that ran and the batch of highest tokens/s (they
    differ where throughput falls at large batches, as HF transformers' does), and throughput
    ratios against dense, dense-kernel, StreamingLLM and HF: at equal batch, at each one's
    largest batch and at each one's best."""
    ok = [r for r in rows if r.get("status") == "ok"]
    largest: dict[tuple[str, int], dict] = {}
    fastest: dict[tuple[str, int], dict] = {}
    for r in ok:
        key = (r["variant"], r["context"])
        if key not in largest or r["batch"] > largest[key]["batch"]:
            largest[key] = r
        if key not in fastest or r["tokens_per_s"] > fastest[key]["tokens_per_s"]:
            fastest[key] = r

    def listing(by):
        return [
            dict(
                variant=v,
                context=c,
                batch=r["batch"],
                tokens_per_s=r["tokens_per_s"],
                ms_per_step=r["ms_per_step"],
            )
            for (v, c), r in sorted(by.items(), key=lambda x: (x[0][1], x[0][0]))
        ]

    out = dict(largest_batch=listing(largest), best_throughput=listing(fastest))
    ratios = []
    for r in ok:
        for base in ("dense", "dense-kernel", "streaming", "hf"):
            if r["method"] == base:
                continue
            same = [
                b
                for b in ok
                if b["method"] == base and b["context"] == r["context"] and b["batch"] == r["batch"]
            ]
            if same:
                ratios.append(
                    dict(
                        variant=r["variant"],
                        context=r["context"],
                        batch=r["batch"],
                        baseline=same[0]["variant"],
                        step_time_ratio=r["ms_per_step"] / same[0]["ms_per_step"],
                        throughput_ratio=r["tokens_per_s"] / same[0]["tokens_per_s"],
                    )
                )
    for at, by in (("largest batches", largest), ("best throughput", fastest)):
        for (v, c), r in by.items():
            for (bv, bc), b in by.items():
                if (
                    bc == c
                    and bv != v
                    and b["method"] in ("dense", "dense-kernel", "hf", "streaming")
                ):
                    ratios.append(
                        dict(
                            variant=v,
                            context=c,
                            batch=r["batch"],
                            baseline=bv,
                            baseline_batch=b["batch"],
                            at=at,
                            throughput_ratio=r["tokens_per_s"] / b["tokens_per_s"],
                        )
                    )
    out["ratios"] = ratios
    return out


def plot_throughput(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Bar chart of tokens/s per method at batch 1 and at its best batch (highest tokens/s),
    one panel per context (the figure beside the JSON report)."""
    import matplotlib  # here: importing matplotlib takes a second, and only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok" and r.get("context") is not None]
    contexts = sorted({r["context"] for r in ok})
    if not contexts:
        raise ValueError("no successful rows to plot")
    fastest = {(r["variant"], r["context"]): r for r in summarize(ok)["best_throughput"]}
    fig, axes = plt.subplots(1, len(contexts), figsize=(5.5 * len(contexts), 4.2), squeeze=False)
    for ax, c in zip(axes[0], contexts):
        here = [r for r in ok if r["context"] == c]
        names = list(dict.fromkeys(r["variant"] for r in here))
        one = [
            max(
                (r["tokens_per_s"] for r in here if r["variant"] == n and r["batch"] == 1),
                default=0.0,
            )
            for n in names
        ]
        best = [fastest[(n, c)] for n in names]
        x = np.arange(len(names))
        ax.bar(x - 0.2, one, 0.4, label="batch 1")
        bars = ax.bar(x + 0.2, [r["tokens_per_s"] for r in best], 0.4, label="best batch")
        for bar, r in zip(bars, best):
            ax.annotate(
                f"b={r['batch']}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("tokens / s")
        ax.set_title(f"context {c}")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_table(rows: list[dict]) -> str:
    """The rows as a Markdown table (the command's printed answer)."""
    head = (
        "| method | context | batch | ms/step | tok/s | KV GiB | peak GiB | floor ms | "
        "step/floor | status |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]

    def f(x, fmt):
        return "" if x is None else format(x, fmt)

    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['context']} | {r['batch']} | {f(r.get('ms_per_step'), '.2f')}"
            f" | {f(r.get('tokens_per_s'), '.1f')} | {f(r.get('kv_cache_gib'), '.2f')} | "
            f"{f(r.get('peak_gib_process'), '.1f')} | {f(r.get('floor_ms'), '.2f')} | "
            f"{f(r.get('floor_ratio'), '.2f')} | {r['status']} |"
        )
    return "\n".join(lines)
