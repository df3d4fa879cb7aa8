"""The decode benchmark CLI (`python -m moa_jax.bench.decode`): a --tiny CPU smoke run of
every method, its flags from a YAML config, the options it refuses (before any work, nothing
written), and HF's rows."""

import importlib.util
import json
import sys
import types

import pytest

from moa_jax.bench import decode as bench
from moa_jax.bench.decode_config import DecodeConfig
from moa_jax.cli import run

from test_bad_input import _one_line_error


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--method" in out and "--tiny" in out and "floor" in out


def test_tiny_smoke_run(tmp_path, capsys):
    methods = ["dense", "dense-kernel", "moa", "streaming", "recycled", "h2o"]
    out = tmp_path / "tiny.json"
    assert (
        bench.main(
            [
                "--tiny",
                "--method",
                *methods,
                "--batches",
                "1",
                "--steps",
                "2",
                "--moa-densities",
                "0.5",
                "--recycle-threshold",
                "0.5",
                "--recycle-check",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rep = json.loads(out.read_text())
    rows = rep["rows"]
    labels = {r["variant"] for r in rows}
    assert {
        "dense",
        "dense-kernel",
        "moa het:0.5",
        "streaming K=16",
        "recycled K=16 S=2",
        "recycled K=16 dyn=0.5 QC=2",
        "h2o K=16",
    } <= labels
    for r in rows:
        assert r["status"] == "ok", r
        assert r["context"] == 40 and r["batch"] == 1
        assert r["ms_per_step"] > 0 and r["tokens_per_s"] > 0 and r["kv_cache_gib"] > 0
        if r["method"] != "hf":
            assert r["floor_ms"] > 0 and r["floor_ratio"] > 0
    by = {r["variant"]: r for r in rows}
    # Recycled keeps the full cache plus K: more KV memory than dense; StreamingLLM only K.
    assert by["recycled K=16 S=2"]["kv_cache_gib"] > by["dense-kernel"]["kv_cache_gib"]
    assert by["streaming K=16"]["kv_cache_gib"] < by["dense-kernel"]["kv_cache_gib"]
    assert by["streaming K=16"]["kv_read_gib"] < by["dense"]["kv_read_gib"]
    assert rep["copy_bandwidth_gbs"] > 0 and rep["model"]["num_layers"] == 2
    png = out.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert any(x["baseline"] == "dense" for x in rep["summary"]["ratios"])
    table = capsys.readouterr().out
    assert "| recycled K=16 S=2 | 40 | 1 |" in table


@pytest.mark.slow
def test_tiny_hf_method(tmp_path):
    if not all(importlib.util.find_spec(m) for m in ("torch", "transformers")):
        pytest.skip("needs torch and transformers")
    out = tmp_path / "hf.json"
    assert (
        bench.main(
            ["--tiny", "--method", "hf", "--batches", "1", "2", "--steps", "2", "--out", str(out)]
        )
        == 0
    )
    rows = json.loads(out.read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert all(r["ms_per_step"] > 0 and r["kv_cache_gib"] > 0 for r in rows)


def test_flags_from_a_yaml_config(tmp_path):
    from moa_jax.bench.decode_config import DecodeConfig
    from moa_jax.cli import parse_config

    path = tmp_path / "decode.yaml"
    path.write_text("method: [dense, moa]\nbatches: [1, max]\ntiny: true\nsteps: 2\n")
    config = parse_config(
        DecodeConfig, ["--config", str(path), "--steps", "3"], prog="p", description=""
    ).resolved()
    assert config.method == ["dense", "moa"] and config.batches == [1, "max"]
    assert config.steps == 3 and config.contexts == [40] and config.interpret
    assert config.cache_len(40) == 40 + 3 * (config.warmup + config.iters) + 1


def test_tiny_defaults_and_values_given_are_kept():
    tiny = DecodeConfig(tiny=True).resolved()
    assert (tiny.contexts, tiny.batches, tiny.steps, tiny.recycle_k) == ([40], [1, 2], 4, 16)
    assert (tiny.warmup, tiny.iters, tiny.block, tiny.interpret) == (1, 1, 16, True)
    given = DecodeConfig(tiny=True, warmup=0, iters=3, block=32, recycle_stride=[0], steps=6)
    r = given.resolved()
    assert (r.warmup, r.iters, r.block, r.recycle_stride, r.steps) == (0, 3, 32, [0], 6)
    full = DecodeConfig().resolved()
    assert (full.steps, full.warmup, full.iters, full.block, full.interpret) == (
        100,
        1,
        3,
        None,
        False,
    )


def _refused(capsys, tmp_path, argv, *needles, out="report.json"):
    """`argv` with `--out tmp_path/out` through the command line's error path: exit 2, one
    `error:` line with `needles`, no report."""
    path = tmp_path / out
    code = run(bench.main, [*argv, "--out", str(path)])
    _one_line_error(capsys, code, 2, *needles)
    assert not path.exists() and not path.with_suffix(".png").exists()


def test_a_cpu_runs_only_the_smoke_run_or_a_trace(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "cpu_only", lambda: True)
    _refused(capsys, tmp_path, ["--contexts", "40"], "GPU/TPU", "--tiny", "--trace-only")
    for flag in ("--tiny", "--trace-only"):
        bench.check_device(DecodeConfig(**{flag[2:].replace("-", "_"): True}).resolved())
    # with hf, torch tells (JAX would take the GPU's memory before HF's rows)
    no_cuda = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: False))
    monkeypatch.setitem(sys.modules, "torch", no_cuda)
    monkeypatch.setattr(bench, "cpu_only", lambda: False)
    _refused(capsys, tmp_path, ["--method", "hf", "--batches", "1"], "GPU/TPU", "--tiny")


@pytest.mark.parametrize(
    "argv,needles",
    [
        (["--steps", "0"], ["--steps", ">= 1"]),
        (["--warmup", "-1"], ["--warmup"]),
        (["--iters", "0"], ["--iters"]),
        (["--recycle-k", "0"], ["--recycle-k"]),
        (["--block", "0"], ["--block"]),
        (["--layers", "0"], ["--layers"]),
        (["--num-splits", "0"], ["--num-splits"]),
        (["--bandwidth-gib", "0"], ["--bandwidth-gib", "> 0"]),
        (["--bandwidth-gib", "nan"], ["--bandwidth-gib"]),
        (["--contexts", "40", "40"], ["--contexts", "differ"]),
        (["--contexts", "0"], ["--contexts"]),
        (["--batches", "0"], ["--batches", "'max'"]),
        (["--batches", "2", "2"], ["--batches", "differ"]),
        (["--batches", "max", "1.5"], ["--batches", "'max'"]),
        (["--recycle-stride", "-1"], ["--recycle-stride"]),
        (["--recycle-threshold", "1.5"], ["--recycle-threshold", "[-1, 1]"]),
        (["--recycle-check", "0"], ["--recycle-check"]),
        (["--moa-densities", "0.3"], ["--moa-densities", "0.5, 0.25"]),
        (["--method", "moa", "--moa-densities"], ["--method moa", "--plan"]),
        (["--method", "sparse"], ["--method", "sparse"]),
        (["--shape", "llama9"], ["--shape"]),
        (["--mesh", "2x2"], ["--mesh", "DATA,FSDP,TENSOR"]),
        (["--mesh", "0,1,1"], ["--mesh"]),
        (["--method", "hf", "--batches", "max"], ["--batches max", "hf"]),
        (["--method", "hf", "--mesh", "1,1,1"], ["--mesh", "hf"]),
        (["--method-opt", "recycled.k=8"], ["--method-opt recycled.k", "--recycle-k"]),
        (["--method-opt", "streaming.sink=x"], ["streaming.sink"]),
        (["--method-opt", "nope"], ["--method-opt"]),
        # options that only fail where the backend is built: refused before any run, not a row
        (
            ["--method", "recycled", "--method-opt", "recycled.prefill=plan"],
            ["--method recycled", "needs a plan"],
        ),
        (["--method", "streaming", "--method-opt", "streaming.sink=16"], ["sink < k"]),
    ],
)
def test_bad_options_are_refused_before_any_work(argv, needles, tmp_path, capsys):
    _refused(capsys, tmp_path, ["--tiny", *argv], *needles)


def test_a_report_path_in_a_missing_folder_is_refused_before_any_work(tmp_path, capsys):
    _refused(capsys, tmp_path, ["--tiny"], "--out", "does not exist", out="no/such/r.json")


@pytest.mark.parametrize(
    "yaml,key", [("steps: 0", "steps"), ("batches: [true]", "batches"), ("iters: 2.5", "iters")]
)
def test_a_yaml_value_out_of_its_domain_names_the_key(yaml, key, tmp_path, capsys):
    path = tmp_path / "d.yaml"
    path.write_text(yaml + "\n")
    _refused(capsys, tmp_path, ["--tiny", "--config", str(path)], key)


def test_method_options_reach_the_variants(tmp_path):
    """`--method-opt` sets what the variant flags do not: StreamingLLM's sinks."""
    from moa_jax.bench.decode_variants import variants
    from moa_jax.bench.random_model import model_config

    config = DecodeConfig(tiny=True, method=["streaming"], method_opt=["streaming.sink=2"])
    (var,) = variants(config.resolved())
    backend = bench.make_backend(var, model_config("tiny"), config.resolved(), 64)
    assert backend.sink == 2 and backend.k == 16
