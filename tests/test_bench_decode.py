"""The decode benchmark CLI (`python -m moa_jax.bench.decode`): a --tiny CPU smoke run of
every method, its flags from a YAML config, and HF's rows."""

import importlib.util
import json

import pytest

from moa_jax.bench import decode as bench


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
