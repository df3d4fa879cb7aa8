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
