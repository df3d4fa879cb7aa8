"""`python -m moa_jax.bench.influence_profiling` on tiny shapes: timings and a finite
profile."""

import json

import pytest

from moa_jax.bench.influence_profiling import main
from moa_jax.cli import run

from test_bad_input import _one_line_error


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


def test_remat_on_oom_profiles_again_with_remat(tmp_path, monkeypatch):
    from moa_jax.bench import influence_profiling as bench

    calls = []
    real = bench.time_profile

    def oom_without_remat(*args, remat=False, **kw):
        calls.append(remat)
        if not remat:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
        return real(*args, remat=remat, **kw)

    monkeypatch.setattr(bench, "time_profile", oom_without_remat)
    out = tmp_path / "p.json"
    argv = ["--shape", "tiny", "--length", "128", "--items", "2", "--answer-tokens", "16"]
    argv += ["--dtype", "float32", "--estimator", "answer", "--out", str(out)]
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        bench.main(argv)
    assert main([*argv, "--remat-on-oom"]) == 0
    assert calls == [False, False, True]
    row = json.loads(out.read_text())
    assert row["remat"] is True and row["remat_after_oom"] >= 0 and row["steady_items"] == 1


@pytest.mark.parametrize(
    "argv,needles",
    [
        (["--length", "100"], ["--length", "multiple of 64"]),
        (["--length", "128", "128"], ["--length", "differ"]),
        (["--items", "1"], ["--items", "--batch-size"]),
        (["--items", "4", "--batch-size", "4"], ["--items", "--batch-size"]),
        (["--answer-tokens", "128"], ["--answer-tokens", "--length"]),
        (["--answer-tokens", "0"], ["--answer-tokens"]),
        (["--q-chunk", "10"], ["--q-chunk"]),
        (["--sink", "-1"], ["--sink"]),
        (["--dtype", "float64"], ["--dtype"]),
        (["--estimator", "exact"], ["--estimator"]),
        (["--layers", "0"], ["--layers"]),
    ],
)
def test_bad_options_are_refused_before_any_work(argv, needles, tmp_path, capsys):
    out = tmp_path / "p.json"
    argv = ["--shape", "tiny", "--length", "128", "--items", "3", *argv, "--out", str(out)]
    _one_line_error(capsys, run(main, argv), 2, *needles)
    assert not out.exists()
