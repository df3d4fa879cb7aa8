"""`python -m moa_jax.eval` end to end on the tiny random model (byte-level tokenizer), --fast."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moa_jax.cli import run
from moa_jax.eval.__main__ import main
from moa_jax.models.registry import TINY_RANDOM_CONFIG
from moa_jax.plan import Plan

from test_bad_input import _one_line_error

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
    with pytest.raises(ValueError, match="unknown task"):
        main(["--model", "tiny-random", "--tasks", "nope", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="unknown method"):
        main(["--model", "tiny-random", "--methods", "magic", "--out", str(tmp_path)])
    bad = Plan.uniform(3, 4, window=8).save(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="layers"):
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


# ------------------------------------------------------------------------------- refusals
def _refuse(tmp_path, capsys, argv, *words) -> str:
    """Runs the command as `python -m` does; asserts exit 2, one error line with `words` and
    no --out folder."""
    out = tmp_path / "ev"
    code = run(main, ["--model", "tiny-random", "--out", str(out), "--no-progress", *argv])
    line = _one_line_error(capsys, code, 2, *words)
    assert not out.exists(), "a refused run left its output folder"
    return line


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--density", "0"], ["--density", "(0, 1]"]),
        (["--num-items", "0"], ["--num-items", ">= 1"]),
        (["--depths", "1.5"], ["--depths", "[0, 1]"]),
        (["--depths", "0.5,0.5"], ["--depths", "0.5 twice"]),
        (["--lengths", "512,512"], ["--lengths", "512 twice"]),
        (["--lengths", "512", "512"], ["--lengths", "512 twice"]),
        (["--lengths", "32"], ["--lengths", ">= 64"]),
        (["--lengths", "64", "--tasks", "common_words"], ["--lengths", "common_words"]),
        (["--ppl-tail", "0"], ["--ppl-tail", ">= 1"]),
        (["--ppl-tail", "512", "--lengths", "512"], ["--ppl-tail", "shortest --lengths"]),
        (["--q-chunk", "0"], ["--q-chunk"]),
        (["--seed", "-1"], ["--seed"]),
        (["--nll", "some"], ["--nll", "auto, all, none"]),
        (["--attention-impl", "x"], ["--attention-impl", "masked"]),
        (["--dtype", "f64"], ["--dtype"]),
        (["--tasks", "nope"], ["--tasks", "unknown task 'nope'"]),
        (["--tasks", "retrieval,"], ["--tasks", "non-empty"]),
        (["--method", " "], ["--method", "non-empty"]),
        (["--methods", "magic"], ["--methods", "unknown method"]),
        (["--method", "dense,magic"], ["--methods", "magic"]),
        (["--method-opt", "foo"], ["--method-opt", "METHOD.KEY=VALUE"]),
        (["--method-opt", "recycled.k=0"], ["recycled", "k must be >= 1"]),
        (["--methods", "recycled", "--method-opt", "recycled.prefill=plan"], ["needs a plan"]),
        (["--out", " "], ["--out", "non-empty"]),
    ],
)
def test_bad_options_are_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, argv, words):
    import moa_jax.models.registry as registry

    monkeypatch.setattr(registry, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    _refuse(tmp_path, capsys, ["--fast", *argv], *words)


@pytest.mark.parametrize(
    "yaml_text,words",
    [
        ("lengths: 0\n", ["lengths", ">= 64"]),
        ("depths: [0.5, 2]\n", ["depths", "[0, 1]"]),
        ("methods: [dense, magic]\n", ["--methods", "magic"]),
    ],
)
def test_bad_yaml_values_name_the_key(tmp_path, capsys, yaml_text, words):
    (tmp_path / "e.yaml").write_text(yaml_text)
    _refuse(tmp_path, capsys, ["--config", str(tmp_path / "e.yaml")], *words)


def test_list_options_take_values_comma_lists_and_yaml_forms(tmp_path):
    from moa_jax.cli import parse_config
    from moa_jax.eval.__main__ import DEFAULTS, FAST, EvalConfig

    def parse(*argv):
        return parse_config(EvalConfig, list(argv), prog="e", description="")

    assert parse("--lengths", "512,1024").lengths == [512, 1024]
    assert parse("--lengths", "512", "1024,2048").lengths == [512, 1024, 2048]
    c = parse("--methods", "dense", "--method", "h2o,streaming", "--method", "recycled")
    assert c.methods == ["dense", "h2o", "streaming", "recycled"]
    (tmp_path / "e.yaml").write_text("lengths: 512\ntasks: retrieval,needle\ndepths: [0, 1]\n")
    c = parse("--config", str(tmp_path / "e.yaml"), "--fast")
    assert (c.lengths, c.tasks, c.depths) == ([512], ["retrieval", "needle"], [0.0, 1.0])
    assert (c.num_items, c.ppl_tail) == (FAST["num_items"], FAST["ppl_tail"])
    c = parse("--fast", "--num-items", str(DEFAULTS["num_items"]))
    assert c.num_items == DEFAULTS["num_items"]  # given, so --fast keeps it
    assert parse().methods == DEFAULTS["methods"] and parse("--method", "h2o").methods == ["h2o"]


def test_bad_corpus_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import moa_jax.models.registry as registry

    monkeypatch.setattr(registry, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"text": "a"}\n[1]\n')
    argv = ["--fast", "--tasks", "needle", "--corpus", str(bad)]
    _refuse(tmp_path, capsys, argv, "c.jsonl: line 2 is an array")


def test_items_are_made_before_the_output_folder(tmp_path, capsys, monkeypatch):
    """Every cell's items are made before the first cell runs and before --out exists: a task
    that cannot make its items at some length stops the run with nothing written."""
    from moa_jax.eval import TASKS

    perplexity = TASKS["perplexity"]
    made = perplexity.make_items

    def make_items(ctx, length, num_items, seed):
        if length == 1024:  # the second length: the first length's cells have not run
            raise ValueError(f"corpus too short for {length} tokens")
        return made(ctx, length, num_items, seed)

    monkeypatch.setattr(perplexity, "make_items", make_items)
    argv = ["--fast", "--tasks", "perplexity", "--methods", "dense", "--corpus", str(DATA_DIR)]
    _refuse(tmp_path, capsys, argv, "too short for 1024 tokens")


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("x")
    code = run(main, ["--model", "tiny-random", "--fast", "--out", str(out)])
    _one_line_error(capsys, code, 2, "--out", "is a file")
    assert out.read_text() == "x"


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
