"""`python -m moa_jax.bench.influence_profiling` on tiny shapes: timings and a finite
profile."""

import json

from moa_jax.bench.influence_profiling import main


def test_cli_runs_tiny(tmp_path):
    out = tmp_path / "p.json"
    assert (
        main(
            [
                "--shape",
                "tiny",
                "--length",
                "128",
                "--items",
                "3",
                "--answer-tokens",
                "16",
                "--dtype",
                "float32",
                "--estimator",
                "answer",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    row = json.loads(out.read_text())
    assert row["estimator"] == "answer"
    assert row["steady_items"] == 2 and row["items"] == 3
    assert row["seconds_per_item"] > 0 and row["profile_stage_s"] >= row["first_batch_s"]
