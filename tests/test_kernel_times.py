"""The per-kernel device-time profile of the benchmarks (`moa_jax.bench.kernel_times`)."""

import json

import jax
import jax.numpy as jnp

from moa_jax.bench import decode as bench
from moa_jax.bench.kernel_times import format_kernel_times, kernel_times


def test_kernel_times_names_the_ops_of_a_call():
    f = jax.jit(lambda x: jnp.sin(x) @ x)
    x = jnp.ones((256, 256))
    f(x).block_until_ready()
    prof = kernel_times(lambda: f(x), per=2)
    names = [k["name"] for k in prof["kernels"]]
    assert any("sin" in n for n in names), names
    assert prof["busy_us"] > 0
    assert abs(sum(k["us"] for k in prof["kernels"]) + prof["other_us"] - prof["busy_us"]) < 1e-6
    # per=2 halves the counts of ops that ran once.
    assert any(k["calls"] == 0.5 for k in prof["kernels"])
    assert "device busy" in format_kernel_times(prof)


def test_decode_bench_kernel_profile(tmp_path):
    out = tmp_path / "p.json"
    assert (
        bench.main(
            [
                "--tiny",
                "--method",
                "moa",
                "--batches",
                "1",
                "--steps",
                "2",
                "--moa-densities",
                "0.5",
                "--kernel-profile",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    (row,) = json.loads(out.read_text())["rows"]
    prof = row["kernel_profile"]
    assert prof["busy_us"] > 0 and prof["kernels"]


def test_mosaic_gpu_trace_summary(tmp_path):
    """The attention bench's reading of a Mosaic GPU profiler trace: per warpgroup role (the
    last of each CTA's three is the memory warpgroup), each scope's share of busy time."""
    import json

    from moa_jax.bench.attention import trace_summary

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
