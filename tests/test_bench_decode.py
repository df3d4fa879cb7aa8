"""The decode benchmark CLI: a --tiny CPU smoke run of every method, the batch sweep's OOM
handling and bisection, and the summary ratios."""

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

        return bench._guard(go, dict(batch=b, variant="v", context=1, method="m"))

    return run_one


def test_sweep_stops_at_oom_and_bisects():
    seen = []
    run_one = _fake_runner(5, seen)

    rows = bench.sweep(run_one, [1, 2, 4, 8, 16], refine=True, log=lambda r: None)
    assert seen == [1, 2, 4, 8, 6, 5]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "oom", "oom", "ok"]
    assert bench.summarize(rows)["largest_batch"][0]["batch"] == 5
    err = bench._guard(lambda: 1 / 0, dict(batch=1))
    assert err["status"] == "error" and "ZeroDivisionError" in err["error"]


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


def test_sweep_max_retries_smaller_until_it_fits():
    seen = []
    rows = bench.sweep(
        _fake_runner(90, seen), [1, "max"], refine=False, log=lambda r: None, largest=lambda: 100
    )
    # 100 -> 95 -> 90: 5% smaller each time it runs out of memory.
    assert seen == [1, 100, 95, 90]
    assert bench.summarize(rows)["largest_batch"][0]["batch"] == 90
    seen.clear()
    bench.sweep(
        _fake_runner(90, seen), [1, 8, "max"], refine=False, log=lambda r: None, largest=lambda: 4
    )  # estimate below a batch that fit: skipped
    assert seen == [1, 8]
    with pytest.raises(ValueError, match="max"):
        bench.sweep(_fake_runner(9, []), ["max"], refine=False, log=lambda r: None)


def test_largest_batch_estimate_from_cache_shapes():
    args = bench._defaults(bench.build_parser().parse_args(["--tiny", "--steps", "2"]))
    cfg = bench.model_config(args)
    var = next(v for v in bench.variants(args, cfg) if v.method == "dense")
    cache_len = 40 + 2 * (args.warmup + args.iters) + 1
    # Dense: K and V, every layer, bf16.
    per_row = 2 * cfg.num_layers * cache_len * cfg.num_kv_heads * cfg.head_dim * 2
    per_row *= 1 + 1 / cfg.num_layers
    gib = int(bench.GIB)
    stats = dict(bytes_limit=gib + 10 * gib // 1000 + 17, bytes_in_use=10 * gib // 1000)
    b = bench.largest_batch(var, cfg, 40, args, stats)
    assert b == int(17 // per_row) or b == 1
    stats = dict(bytes_limit=3 * gib, bytes_in_use=gib)
    assert bench.largest_batch(var, cfg, 40, args, stats) == int(gib // per_row)
    with pytest.raises(RuntimeError, match="memory limit"):
        bench.largest_batch(var, cfg, 40, args, {})
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--method", "hf", "--batches", "1", "max"])


def test_grouped_synthetic_plans_shrink_the_span_cache():
    from moa_jax.bench.attention import kv_density, plan_windows

    s, h, hkv = 8192, 32, 8
    for kind, density in (("het50", 0.5), ("het25", 0.25)):
        for grouped in (False, True):
            w, sk = plan_windows(kind, s, h, hkv, dense_groups=grouped)
            assert abs(kv_density(w, sk, s) - density) < 0.01
            kept = [min(s, wi + si) for wi, si in zip(w, sk)]
            group_max = [max(kept[g * 4 : (g + 1) * 4]) for g in range(hkv)]
            cache = sum(group_max) / (hkv * s)
            if grouped:  # dense heads fill whole groups: cache = density
                assert abs(cache - density) < 0.01
            else:  # dense heads in half or all groups: cache stays large
                assert cache >= (1.0 if kind == "het50" else 0.55)


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
    s = bench.summarize(rows)
    assert {r["variant"]: r["batch"] for r in s["largest_batch"]} == {"hf": 48, "moa": 200}
    assert {r["variant"]: r["batch"] for r in s["best_throughput"]} == {"hf": 16, "moa": 200}
    at = {r["at"]: r for r in s["ratios"] if r.get("at") and r["variant"] == "moa"}
    assert at["largest batches"]["throughput_ratio"] == pytest.approx(6000 / 160)
    assert at["best throughput"]["throughput_ratio"] == pytest.approx(6000 / 650)
    assert at["best throughput"]["baseline_batch"] == 16
