"""The decode benchmark's summary (`moa_jax.bench.decode_report`): largest and best batch and
the throughput ratios against both."""

import pytest

from moa_jax.bench.decode_report import summarize


def test_summary_separates_largest_and_best_batch():
    """HF's throughput falls past batch 16: its best batch is not its largest, and the ratios
    are given against both."""

    def row(method, variant, batch, tps):
        return dict(
            status="ok",
            method=method,
            variant=variant,
            context=8,
            batch=batch,
            tokens_per_s=tps,
            ms_per_step=batch * 1e3 / tps,
        )

    rows = [
        row("hf", "hf", 1, 40.0),
        row("hf", "hf", 16, 650.0),
        row("hf", "hf", 48, 160.0),
        row("moa", "moa", 1, 160.0),
        row("moa", "moa", 200, 6000.0),
    ]
    s = summarize(rows)
    assert {r["variant"]: r["batch"] for r in s["largest_batch"]} == {"hf": 48, "moa": 200}
    assert {r["variant"]: r["batch"] for r in s["best_throughput"]} == {"hf": 16, "moa": 200}
    at = {r["at"]: r for r in s["ratios"] if r.get("at") and r["variant"] == "moa"}
    assert at["largest batches"]["throughput_ratio"] == pytest.approx(6000 / 160)
    assert at["best throughput"]["throughput_ratio"] == pytest.approx(6000 / 650)
    assert at["best throughput"]["baseline_batch"] == 16
