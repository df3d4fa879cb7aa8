"""The prefill attention benchmark (`python -m moa_jax.bench.attention`): its flags and YAML
config, and its reading of Mosaic GPU profiler traces (`moa_jax.bench.attention_impls`)."""

import json

import pytest

from moa_jax.bench import attention
from moa_jax.bench.attention_impls import trace_summary
from moa_jax.cli import parse_config


def test_help_and_yaml_config(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        attention.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--seq-lens" in out and "--no-bwd" in out and "tokamax" in out
    path = tmp_path / "a.yaml"
    path.write_text("seq_lens: [128]\nimpls: [cudnn]\nno_bwd: true\n")
    config = parse_config(
        attention.AttentionBenchConfig,
        ["--config", str(path), "--heads", "4"],
        prog="p",
        description="",
    )
    assert config.seq_lens == [128] and config.impls == ["cudnn"] and config.no_bwd
    assert config.heads == 4 and config.block_q == 128


def test_mosaic_gpu_trace_summary(tmp_path):
    """The attention bench's reading of a Mosaic GPU profiler trace: per warpgroup role (the
    last of each CTA's three is the memory warpgroup), each scope's share of busy time."""
    events = []
    for cta in range(2):
        for wg in range(3):
            tid, t = 1 + wg + 3 * cta, 100.0 * cta
            scopes = (("load", 0.3), ("idle", 0.0)) if wg == 2 else (("qk", 0.2), ("softmax", 0.6))
            for name, dur in scopes * 4:
                events.append(dict(name=name, ph="B", ts=t, tid=tid, pid=1))
                t += dur
                events.append(dict(name=name, ph="E", ts=t, tid=tid, pid=1))
                t += 0.2  # a gap no scope covers
    path = tmp_path / "1-trace.json"
    path.write_text(json.dumps({"displayTimeUnit": "ns", "traceEvents": events}))
    s = trace_summary(str(path))
    busy = 4 * (0.2 + 0.6 + 0.4) - 0.2  # first B to last E of one warpgroup
    assert s["compute"]["qk"]["count"] == 16 and s["compute"]["softmax"]["count"] == 16
    assert abs(s["compute"]["qk"]["mean_ns"] - 200.0) < 1e-6
    assert abs(s["compute"]["softmax"]["share"] - 2.4 / busy) < 1e-9
    assert abs(s["memory"]["load"]["share"] - 1.2 / (4 * 0.7 - 0.2)) < 1e-9
