"""The prefill attention benchmark (`python -m moa_jax.bench.attention`): its flags and YAML
config, the options it refuses (before any work, nothing written), its `--tiny` CPU smoke run,
and its reading of Mosaic GPU profiler traces (`moa_jax.bench.attention_impls`)."""

import json

import pytest

from moa_jax.bench import attention
from moa_jax.bench.attention_impls import trace_summary
from moa_jax.cli import parse_config, run
from moa_jax.plan import Plan

from test_bad_input import _one_line_error


def test_help_and_yaml_config(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        attention.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--seq-lens" in out and "--no-bwd" in out and "tokamax" in out and "--tiny" in out
    path = tmp_path / "a.yaml"
    path.write_text("seq_lens: [128]\nimpls: [cudnn]\nno_bwd: true\n")
    config = parse_config(
        attention.AttentionBenchConfig,
        ["--config", str(path), "--heads", "4", "--kv-heads", "2"],
        prog="p",
        description="",
    )
    assert config.seq_lens == [128] and config.impls == ["cudnn"] and config.no_bwd
    assert config.heads == 4 and config.block_q == 128


def test_tiny_defaults_and_values_given_are_kept():
    tiny = attention.AttentionBenchConfig(tiny=True).resolved()
    assert tiny.seq_lens == [256] and tiny.impls == ["moa-triton"] and tiny.interpret
    assert (tiny.iters, tiny.warmup) == (1, 0)
    given = attention.AttentionBenchConfig(tiny=True, seq_lens=[64], iters=4, warmup=2)
    assert given.resolved().seq_lens == [64]
    assert (given.resolved().iters, given.resolved().warmup) == (4, 2)
    full = attention.AttentionBenchConfig().resolved()
    assert full.seq_lens == [4096, 16384, 32768] and full.impls == list(attention.IMPLS)
    assert (full.iters, full.warmup, full.interpret) == (10, 3, False)


def _refused(capsys, tmp_path, argv, *needles, out="report.json"):
    """`argv` with `--out tmp_path/out` through the command line's error path: exit 2, one
    `error:` line with `needles`, no report."""
    path = tmp_path / out
    code = run(attention.main, [*argv, "--out", str(path)])
    _one_line_error(capsys, code, 2, *needles)
    assert not path.exists()


def test_a_cpu_runs_only_the_tiny_smoke_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(attention, "cpu_only", lambda: True)
    _refused(capsys, tmp_path, ["--seq-lens", "128"], "GPU/TPU", "--tiny")


@pytest.mark.parametrize(
    "argv,needles",
    [
        (["--seq-lens", "0"], ["--seq-lens", ">= 1"]),
        (["--seq-lens", "128", "128"], ["--seq-lens", "differ"]),
        (["--iters", "0"], ["--iters"]),
        (["--warmup", "-1"], ["--warmup"]),
        (["--batch", "0"], ["--batch"]),
        (["--heads", "6", "--kv-heads", "4"], ["--heads", "--kv-heads"]),
        (["--block-q", "96"], ["--block-q", "power of two"]),
        (["--block-k-dkv", "0"], ["--block-k-dkv"]),
        (["--num-warps", "3"], ["--num-warps"]),
        (["--mgpu-block-k", "32"], ["--mgpu-block-k", "64, 128"]),
        (["--dtype", "f16"], ["--dtype"]),
        (["--impls", "flash"], ["--impls", "flash"]),
        (["--configs", "window0"], ["--configs", "window0"]),
        (["--configs", "mix1024"], ["--configs", "mix1024"]),
        (["--configs", "dense", "dense"], ["--configs", "differ"]),
        (["--configs", "plan-L0"], ["--configs", "--plan"]),
        (["--profile-dir", "traces"], ["--profile-dir", "--breakdown"]),
        (["--breakdown"], ["--breakdown", "moa-mgpu"]),
    ],
)
def test_bad_options_are_refused_before_any_work(argv, needles, tmp_path, capsys):
    _refused(capsys, tmp_path, ["--tiny", *argv], *needles)


def test_a_report_path_in_a_missing_folder_is_refused_before_any_work(tmp_path, capsys):
    _refused(capsys, tmp_path, ["--tiny"], "--out", "does not exist", out="no/such/r.json")
    assert not (tmp_path / "no").exists()


def test_a_plan_that_does_not_fit_is_refused_not_a_row(tmp_path, capsys):
    plan = str(Plan.uniform(2, 4, window=64, sink=4).save(tmp_path / "p.json"))
    small = ["--tiny", "--plan", plan, "--heads", "4", "--kv-heads", "2"]
    _refused(capsys, tmp_path, [*small, "--plan-layers", "0", "2"], "--plan-layers 2", "2 layers")
    _refused(capsys, tmp_path, [*small, "--configs", "plan-L5"], "--configs plan-L5", "2 layers")
    _refused(capsys, tmp_path, ["--tiny", "--plan", plan, "--plan-layers", "0"], "heads")
    _refused(capsys, tmp_path, ["--tiny", "--plan", str(tmp_path / "none.json")], "plan")


def test_a_yaml_value_out_of_its_domain_names_the_key(tmp_path, capsys):
    path = tmp_path / "a.yaml"
    path.write_text("seq_lens: [0]\n")
    _refused(capsys, tmp_path, ["--tiny", "--config", str(path)], "seq_lens")


@pytest.mark.slow
def test_tiny_smoke_run(tmp_path):
    """The CPU smoke run: our Triton kernel in interpret mode, forward and forward+backward,
    on a named configuration and a plan's layer."""
    plan = str(Plan.uniform(2, 4, window=64, sink=4).save(tmp_path / "p.json"))
    out = tmp_path / "r.json"
    argv = ["--tiny", "--heads", "4", "--kv-heads", "2", "--head-dim", "64", "--seq-lens", "128"]
    argv += ["--configs", "window64", "--plan", plan, "--plan-layers", "1", "--out", str(out)]
    assert attention.main(argv) == 0
    rep = json.loads(out.read_text())
    assert rep["args"]["interpret"] and rep["args"]["iters"] == 1
    rows = {(r["config"], r["pass_"]): r for r in rep["rows"]}
    assert set(rows) == {(c, p) for c in ("window64", "plan-L1") for p in ("fwd", "fwdbwd")}
    assert all(r["impl"] == "moa-triton" and r["ms"] > 0 for r in rows.values())
    assert rows["window64", "fwd"]["kv_density"] == pytest.approx(0.5, abs=0.01)


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
