"""Finding the batches that fit (`moa_jax.bench.batch_search`): the sweep's OOM handling and
bisection, 'max' retried smaller, and the largest batch estimated from the caches' shapes."""

import pytest

from moa_jax.bench.batch_search import guard, largest_batch, sweep
from moa_jax.bench.decode import main
from moa_jax.bench.decode_config import DecodeConfig
from moa_jax.bench.decode_report import summarize
from moa_jax.bench.decode_variants import variants
from moa_jax.bench.device_memory import GIB
from moa_jax.bench.random_model import model_config
from moa_jax.cli import parse_config
from moa_jax.errors import ConfigError, PlanError


def _fake_runner(fits, seen):
    def run_one(b):
        seen.append(b)

        def go():
            if b > fits:
                raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
            return dict(
                status="ok",
                batch=b,
                variant="v",
                context=1,
                method="m",
                ms_per_step=1.0,
                tokens_per_s=float(b),
            )

        return guard(go, dict(batch=b, variant="v", context=1, method="m"))

    return run_one


def test_sweep_stops_at_oom_and_bisects():
    seen = []
    run_one = _fake_runner(5, seen)

    rows = sweep(run_one, [1, 2, 4, 8, 16], refine=True, log=lambda r: None)
    assert seen == [1, 2, 4, 8, 6, 5]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "oom", "oom", "ok"]
    assert summarize(rows)["largest_batch"][0]["batch"] == 5
    err = guard(lambda: 1 / 0, dict(batch=1))
    assert err["status"] == "error" and "ZeroDivisionError" in err["error"]


def test_sweep_max_retries_smaller_until_it_fits():
    seen = []
    rows = sweep(
        _fake_runner(90, seen), [1, "max"], refine=False, log=lambda r: None, largest=lambda: 100
    )
    # 100 -> 95 -> 90: 5% smaller each time it runs out of memory.
    assert seen == [1, 100, 95, 90]
    assert summarize(rows)["largest_batch"][0]["batch"] == 90
    seen.clear()
    sweep(
        _fake_runner(90, seen), [1, 8, "max"], refine=False, log=lambda r: None, largest=lambda: 4
    )  # estimate below a batch that fit: skipped
    assert seen == [1, 8]
    with pytest.raises(ValueError, match="max"):
        sweep(_fake_runner(9, []), ["max"], refine=False, log=lambda r: None)


def test_largest_batch_estimate_from_cache_shapes():
    args = parse_config(
        DecodeConfig, ["--tiny", "--steps", "2"], prog="p", description=""
    ).resolved()
    cfg = model_config("tiny")
    var = next(v for v in variants(args) if v.method == "dense")
    cache_len = 40 + 2 * (args.warmup + args.iters) + 1
    # Dense: K and V, every layer, bf16.
    per_row = 2 * cfg.num_layers * cache_len * cfg.num_kv_heads * cfg.head_dim * 2
    per_row *= 1 + 1 / cfg.num_layers
    gib = int(GIB)
    stats = dict(bytes_limit=gib + 10 * gib // 1000 + 17, bytes_in_use=10 * gib // 1000)
    b = largest_batch(var, cfg, 40, args, stats)
    assert b == int(17 // per_row) or b == 1
    stats = dict(bytes_limit=3 * gib, bytes_in_use=gib)
    assert largest_batch(var, cfg, 40, args, stats) == int(gib // per_row)
    with pytest.raises(RuntimeError, match="memory limit"):
        largest_batch(var, cfg, 40, args, {})
    with pytest.raises(ConfigError, match="--batches max"):
        main(["--tiny", "--method", "hf", "--batches", "1", "max"])


def test_a_users_mistake_is_not_a_row():
    """`guard` records what fails at run time (out of memory, a crash) as a row; a bad option
    or a plan that does not fit stops the command instead."""
    base = dict(batch=1)

    def fails(e):
        def fn():
            raise e

        return fn

    assert guard(fails(RuntimeError("RESOURCE_EXHAUSTED")), base)["status"] == "oom"
    assert guard(fails(ValueError("a shape")), base)["status"] == "error"
    for e in (ConfigError("--steps"), PlanError("plan")):
        with pytest.raises(type(e)):
            guard(fails(e), base)
