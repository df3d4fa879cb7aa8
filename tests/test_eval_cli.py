"""`python -m moa_jax.eval` end to end on the tiny random model (byte-level tokenizer), --fast."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moa_jax.eval.__main__ import main
from moa_jax.models.registry import TINY_RANDOM_CONFIG
from moa_jax.plan import Plan

DATA_DIR = Path(__file__).parent / "data"


def _run(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "out"
    assert (
        main(
            [
                "--model",
                "tiny-random",
                "--fast",
                "--corpus",
                str(DATA_DIR),
                "--out",
                str(out),
                "--no-progress",
                *extra,
            ]
        )
        == 0
    )
    return json.loads((out / "results.json").read_text())


def test_cli_fast_dense_all_tasks(tmp_path, capsys):
    res = _run(tmp_path, "--methods", "dense,moa", "--lengths", "512")
    out = tmp_path / "out"
    from moa_jax.eval import TASKS

    # Every task ran on 2 items (--fast) with dense; moa (no plan) is listed as skipped.
    assert {r["task"] for r in res["records"]} == set(TASKS)
    assert len(res["records"]) == 2 * len(TASKS)
    assert {r["method"] for r in res["records"]} == {"dense"}
    assert res["methods"]["moa"] == {
        "description": res["methods"]["moa"]["description"],
        "available": False,
        "reason": "needs --plan FILE",
        "kv_density": {},
    }
    assert res["partial"] is False
    assert res["settings"]["num_items"] == 2 and res["settings"]["lengths"] == [512]
    rows = {r["task"]: r for r in res["summary"]}
    assert rows["retrieval"]["n"] == 2 and 0.0 <= rows["retrieval"]["value"] <= 1.0
    assert rows["retrieval"]["nll"] > 0 and "digit_acc" in rows["retrieval"]
    assert rows["perplexity"]["ppl"] > 1.0
    for r in res["records"]:
        if r["task"] != "perplexity":
            assert isinstance(r["pred"], str)
    for f in ("results.md", "accuracy_vs_length.png", "needle_heatmap.png"):
        assert (out / f).stat().st_size > 0
    printed = capsys.readouterr().out
    assert "| method |" in printed and "| dense |" in printed
    assert "moa: needs --plan FILE" in printed


def test_cli_plan_yaml_and_same_items(tmp_path):
    """MoA from a plan file and uniform at the plan's density, configured by YAML; every method
    sees the same items, and a repeat run reproduces the numbers."""
    cfg = TINY_RANDOM_CONFIG
    plan = Plan(
        alphas=[[64.0] * cfg.num_heads] * cfg.num_layers,
        betas=[[0.0, 0.25, 0.5, 1.0]] * cfg.num_layers,
        sinks=16,
        granularity=16,
        min_span=32,
    )
    plan_path = plan.save(tmp_path / "plan.json")
    yaml_path = tmp_path / "eval.yaml"
    yaml_path.write_text(
        f"tasks: retrieval,perplexity\nmethods: [dense, uniform, moa]\n"
        f"plan: {plan_path}\nlengths: 512\nsink: 16\n"
    )
    res = _run(tmp_path, "--config", str(yaml_path))
    assert {r["method"] for r in res["records"]} == {"dense", "uniform", "moa"}
    dens = {m: res["methods"][m]["kv_density"]["512"] for m in ("dense", "uniform", "moa")}
    assert dens["dense"] == 1.0
    assert dens["moa"] == pytest.approx(plan.kv_density(512))
    cache = plan.kv_cache_density(512, cfg.num_kv_heads)
    assert dens["uniform"] == pytest.approx(cache, abs=1 / 512)  # equal decode memory
    assert res["plan"]["kv_density"]["512"] == pytest.approx(plan.kv_density(512))
    by = {}
    for r in res["records"]:
        by.setdefault((r["task"], r["index"]), set()).add(r["method"])
    assert all(v == {"dense", "uniform", "moa"} for v in by.values())
    # paired differences to the uniform window: moa's NLL minus uniform's, item by item
    vs_u = {(d["task"], d["method"]): d for d in res["paired_vs_uniform"]}
    rec = {(r["task"], r["method"], r["index"]): r["nll"] for r in res["records"]}
    diffs = [
        rec[("perplexity", "moa", i)] - rec[("perplexity", "uniform", i)]
        for (t, m, i) in rec
        if t == "perplexity" and m == "moa"
    ]
    assert vs_u[("perplexity", "moa")]["delta_nll"] == pytest.approx(np.mean(diffs))
    again = _run(tmp_path, "--config", str(yaml_path))

    def nlls(d):
        return {(r["task"], r["method"], r["index"]): r.get("nll") for r in d["records"]}

    first, second = nlls(res), nlls(again)
    assert first.keys() == second.keys()
    for k, v in first.items():
        assert v == pytest.approx(second[k], rel=1e-5)


def test_cli_rejects_bad_input(tmp_path):
    with pytest.raises(SystemExit, match="unknown task"):
        main(["--model", "tiny-random", "--tasks", "nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown method"):
        main(["--model", "tiny-random", "--methods", "magic", "--out", str(tmp_path)])
    bad = Plan.uniform(3, 4, window=8).save(tmp_path / "bad.json")
    with pytest.raises(SystemExit, match="layers"):
        main(
            [
                "--model",
                "tiny-random",
                "--fast",
                "--plan",
                str(bad),
                "--methods",
                "moa",
                "--out",
                str(tmp_path),
            ]
        )


def test_cli_decode_methods_and_merge(tmp_path):
    """Decode-time methods run in a second invocation on the same items; --merge combines the
    two runs into one report."""
    a, b = tmp_path / "a", tmp_path / "b"
    common = [
        "--model",
        "tiny-random",
        "--fast",
        "--corpus",
        str(DATA_DIR),
        "--lengths",
        "512",
        "--tasks",
        "retrieval,perplexity",
        "--no-progress",
        "--no-plots",
    ]
    assert main(common + ["--methods", "dense", "--out", str(a)]) == 0
    assert (
        main(
            common + ["--methods", "recycled,h2o", "--method-opt", "recycled.k=32", "--out", str(b)]
        )
        == 0
    )
    rb = json.loads((b / "results.json").read_text())
    assert rb["methods"]["recycled"]["kv_density"]["512"] == pytest.approx(32 / 512)
    assert rb["settings"]["method_opt"] == {"recycled.k": "32"}
    merged = tmp_path / "m"
    assert main(["--merge", str(a), str(b), "--out", str(merged), "--no-plots"]) == 0
    res = json.loads((merged / "results.json").read_text())
    assert {r["method"] for r in res["records"]} == {"dense", "recycled", "h2o"}
    assert res["settings"]["methods"] == ["dense", "recycled", "h2o"]
    deltas = {(d["task"], d["method"]) for d in res["paired_vs_dense"]}
    assert ("retrieval", "recycled") in deltas and ("perplexity", "h2o") in deltas
    assert "| recycled |" in (merged / "results.md").read_text()
    renamed = tmp_path / "r"  # two runs of one method (two plans) kept apart by renaming
    assert (
        main(
            [
                "--merge",
                str(a),
                f"{b}:recycled=recycled-32,h2o=h2o-b",
                "--out",
                str(renamed),
                "--no-plots",
            ]
        )
        == 0
    )
    res = json.loads((renamed / "results.json").read_text())
    assert {r["method"] for r in res["records"]} == {"dense", "recycled-32", "h2o-b"}
    assert res["methods"]["recycled-32"]["kv_density"]["512"] == pytest.approx(32 / 512)
    from moa_jax.eval.merge import _merge_spec

    assert _merge_spec("runs/a=b") == (Path("runs/a=b"), {})  # '=' in a path, no colon
    assert _merge_spec("r:moa=x,uniform=u") == (Path("r"), {"moa": "x", "uniform": "u"})
    with pytest.raises(SystemExit, match="bad rename"):
        main(["--merge", f"{b}:recycled=", "--out", str(tmp_path / "y")])
    other = tmp_path / "o"  # a different seed makes different items: refused
    assert main(common + ["--methods", "dense", "--seed", "1", "--out", str(other)]) == 0
    with pytest.raises(SystemExit, match="disagree"):
        main(["--merge", str(a), str(other), "--out", str(tmp_path / "x")])
