"""Every command on every family: a tiny random HF checkpoint of each family (llama, mistral,
qwen2, qwen3, with a byte-level tokenizer) through `profile`, `generate` (dense, the profiled
plan, Recycled Attention), `eval` and `train`, in-process through their `main(argv)` and the
CLIs' one error path (`moa_jax.cli.run`); and plans refused for another family or shape, in one
line naming both, before any weights load.

The checkpoints and the profile's plan are made once per family and shared by the tests (and
by the pytest-xdist workers of a run: they are built under a file lock in the run's common
temporary directory).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from moa_jax.cli import run
from moa_jax.config import FAMILIES, ModelConfig, RopeScaling
from moa_jax.downloads import locked
from moa_jax.errors import PlanError
from moa_jax.plan import Plan, describe_shape, model_metadata

from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "tests" / "data" / "pride_and_prejudice_opening.txt").read_text()

_BASE = tiny_config(
    vocab_size=320,  # the byte-level tokenizer's 259 ids, rounded up
    max_position_embeddings=1024,
    bos_token_id=1,
    eos_token_ids=(2,),
    pad_token_id=2,
)
CONFIGS: dict[str, ModelConfig] = {
    # GQA with Llama 3.1's rope scaling
    "llama": dataclasses.replace(
        _BASE,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(
            "llama3",
            factor=4.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=256,
        ),
    ),  # fmt: skip
    # no sliding window here (the model's own window is tested elsewhere)
    "mistral": dataclasses.replace(_BASE, family="mistral", rope_theta=1e6),
    "qwen2": dataclasses.replace(
        _BASE, family="qwen2", qkv_bias=True, tie_word_embeddings=True, rms_norm_eps=1e-6
    ),
    # head_dim 32 with 4 heads: q is 128 wide in a 64-wide model
    "qwen3": dataclasses.replace(_BASE, family="qwen3", qk_norm=True, head_dim=32),
}
assert set(CONFIGS) == set(FAMILIES)

# ~260 byte tokens with the chat template: past the plans' 128-token minimum span, so the
# profiled plan is sparse at generate's cache length (the other methods get a short prompt)
LONG_PROMPT = (
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife. However little known the feelings or views of such "
    "a man may be on his first entering a neighbourhood."
)
PROFILE_ARGS = [
    # the cheapest run that still calibrates, profiles, searches, validates and writes a plan:
    # one length (the 128-token minimum span needs 256 for a 0.5 budget), one item each
    "--lengths", "256",
    "--items", "1",
    "--validation-length", "256",
    "--validation-items", "1",
    "--answer-tokens", "8",
    "--eps-intervals", "1",
    "--max-candidates", "1",
    "--no-progress",
]  # fmt: skip


def _shared_root(tmp_path_factory) -> Path:
    """The run's temporary directory common to its xdist workers (each worker's basetemp is
    `pytest-N/popen-gwK`), or pytest's own basetemp without xdist."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _once(root: Path, name: str, make: Callable[[Path], None]) -> Path:
    """`root/name`, made by `make(path)` once per run across processes (a `.done` marker
    written after it succeeds; a failure leaves none and the next caller tries again)."""
    path = root / name
    done = root / f"{name}.done"
    with locked(root / f"{name}.lock"):
        if not done.exists():
            make(path)
            done.write_text("ok\n")
    return path


@pytest.fixture(scope="session")
def family_root(tmp_path_factory) -> Path:
    root = _shared_root(tmp_path_factory) / "families_commands"
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="session")
def corpus(family_root) -> Path:
    def make(d: Path) -> None:
        d.mkdir(parents=True, exist_ok=True)
        words = TEXT.split()
        for i in range(4):
            rng = np.random.default_rng(i)
            (d / f"part{i}.txt").write_text(" ".join(rng.permutation(words).tolist()))

    return _once(family_root, "corpus", make)


@pytest.fixture(scope="session")
def checkpoint(family_root) -> Callable[[str], Path]:
    """f(family) -> an HF checkpoint directory (config.json, safetensors, tokenizer) of the
    family's tiny random model."""

    def make(family: str) -> Path:
        from moa_jax.models.hf_weights import save_hf
        from moa_jax.models.registry import init_random
        from moa_jax.models.tokenizer import byte_level_tokenizer

        def write(d: Path) -> None:
            model = init_random(CONFIGS[family], seed=0)
            save_hf(model, d, tokenizer=byte_level_tokenizer())

        return _once(family_root, f"{family}-hf", write)

    return make


@pytest.fixture(scope="session")
def profiled(family_root, checkpoint, corpus) -> Callable[[str], Path]:
    """f(family) -> the output directory of `python -m moa_jax.profile` on the family's
    checkpoint (plan.json, report.json, candidates/)."""

    def make(family: str) -> Path:
        from moa_jax.profile.__main__ import main

        model = checkpoint(family)

        def profile(out: Path) -> None:
            argv = ["--model", str(model), "--corpus", str(corpus), "--out", str(out)]
            argv += ["--calibration-cache", str(out.with_name(out.name + "-cache"))]
            assert run(main, argv + PROFILE_ARGS) == 0

        return _once(family_root, f"{family}-profile", profile)

    return make


def _generate(argv: list[str], capsys) -> tuple[str, str]:
    from moa_jax.generate.__main__ import main

    code = run(main, argv)
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    return out, err


# --------------------------------------------------------------------------------- profile
@pytest.mark.parametrize("family", FAMILIES)
def test_profile_writes_a_plan_for_the_family(family, profiled, checkpoint):
    from moa_jax.models.registry import load_config

    out = profiled(family)
    cfg = load_config(checkpoint(family))
    assert cfg.shape_summary == CONFIGS[family].shape_summary
    plan = Plan.load(out / "plan.json")
    assert plan.metadata["model_family"] == family
    assert plan.metadata["model_shape"] == cfg.shape_summary
    assert plan.searched_for() == cfg.shape_summary
    assert plan.validate(cfg).shape == (cfg.num_layers, cfg.num_heads)
    assert 0.45 - 1e-9 <= plan.kv_cache_density(256, cfg.num_kv_heads) <= 0.5 + 1e-9
    report = json.loads((out / "report.json").read_text())
    assert report["chosen"] == plan.metadata["candidate"]
    assert report["validation"] and all(np.isfinite(v) for v in report["validation"].values())
    candidates = sorted((out / "candidates").glob("*.json"))
    assert candidates
    for f in candidates:  # the candidates record the model too
        assert Plan.load(f).searched_for() == cfg.shape_summary


# -------------------------------------------------------------------------------- generate
GENERATE = {
    "dense": [],
    "plan": ["--plan", "PLAN"],
    "recycled": ["--recycle-k", "16", "--recycle-stride", "2"],
}


@pytest.mark.parametrize("method", list(GENERATE))
@pytest.mark.parametrize("family", FAMILIES)
def test_generate(family, method, checkpoint, profiled, capsys):
    extra = list(GENERATE[method])
    if method == "plan":
        extra[1] = str(profiled(family) / "plan.json")
    prompt = LONG_PROMPT if method == "plan" else "Name a colour of the sea."
    argv = ["--model", str(checkpoint(family)), "--prompt", prompt, "--max-new-tokens", "4"]
    out, err = _generate(argv + extra, capsys)
    done = re.search(r"^(\d+) tokens in ", err, re.M)
    assert done and int(done.group(1)) >= 1, err[-3000:]
    assert out.endswith("\n")  # the streamed text, then a line break
    if method == "plan":  # the plan is sparse at this length: the MoA backend ran
        windows = re.search(r"Plan 2x4 at N=(\d+): windows (\d+)\.\.(\d+)", err)
        assert windows and int(windows.group(2)) < int(windows.group(1)), err[-3000:]
        assert "running dense attention" not in err


def test_generate_help_names_the_model_forms(capsys):
    from moa_jax.generate.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--model MODEL a preset (smollm2-135m, tiny-random), an HF checkpoint directory" in text
    assert "of a supported family (llama, mistral, qwen2, qwen3" in text and ".gguf file" in text
    assert all(family in text for family in FAMILIES)


# ------------------------------------------------------------------------------------ eval
@pytest.mark.parametrize("family", FAMILIES)
def test_eval(family, checkpoint, profiled, corpus, tmp_path, capsys):
    from moa_jax.eval.__main__ import main

    out = tmp_path / "eval"
    plan = profiled(family) / "plan.json"
    argv = ["--model", str(checkpoint(family)), "--tasks", "perplexity", "--methods", "dense,moa"]
    argv += ["--plan", str(plan), "--lengths", "256", "--num-items", "1", "--ppl-tail", "16"]
    argv += ["--corpus", str(corpus), "--out", str(out), "--no-progress", "--no-plots"]
    code = run(main, argv)
    assert code == 0, capsys.readouterr().err[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["partial"] is False
    assert {r["method"] for r in res["records"]} == {"dense", "moa"}
    rows = {r["method"]: r for r in res["summary"]}
    for r in rows.values():
        assert np.isfinite(r["ppl"]) and r["ppl"] > 1.0
    assert res["plan"]["metadata"]["model_family"] == family
    assert res["plan"]["kv_density"]["256"] < 1.0


# ----------------------------------------------------------------------------------- train
@pytest.mark.parametrize("family", FAMILIES)
def test_train(family, checkpoint, corpus, tmp_path, capsys):
    from moa_jax.train.checkpoint import Checkpointer
    from moa_jax.train.loop import main

    out = tmp_path / "run"
    argv = ["--model", str(checkpoint(family)), "--corpus", str(corpus), "--attention", "dense"]
    argv += ["--seq-len", "32", "--steps", "2", "--batch-size", "2", "--checkpoint-every", "2"]
    argv += ["--out-dir", str(out), "--no-progress"]
    code = run(main, argv)
    assert code == 0, capsys.readouterr().err[-3000:]
    assert Checkpointer(out / "checkpoints").all_steps() == [2]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["event"] == "train"]
    assert losses and all(np.isfinite(losses))
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


# ------------------------------------------------- plans for another family or shape: refused
def _foreign_plans(tmp_path: Path) -> dict[str, tuple[Path, str, str]]:
    """Plans of the llama checkpoint's layer and head counts, each recorded for another model:
    (file, the words naming what it was searched for, the words naming the model)."""
    model = CONFIGS["llama"]
    out = {}
    for name, cfg in (
        ("family", CONFIGS["qwen2"]),  # the same shape, another family
        ("shape", dataclasses.replace(model, num_kv_heads=1, head_dim=32)),
    ):
        plan = Plan.uniform(model.num_layers, model.num_heads, window=32, sink=4)
        plan = dataclasses.replace(plan, metadata={**plan.metadata, **model_metadata(cfg)})
        path = plan.save(tmp_path / f"{name}.json")
        out[name] = (path, describe_shape(cfg.shape_summary), describe_shape(model.shape_summary))
    return out


def _no_weights(*_a, **_k):
    raise AssertionError("the weights were loaded before the plan was checked")


def _command(name: str, monkeypatch, model: Path, plan: Path, tmp_path: Path, corpus: Path):
    """(main, argv) of a command given `plan`, with its weight loading made to fail."""
    import moa_jax.models.registry as registry

    monkeypatch.setattr(registry, "load_model", _no_weights)
    if name == "generate":
        from moa_jax.generate.__main__ import main

        return main, ["--model", str(model), "--plan", str(plan), "--max-new-tokens", "2"]
    if name == "generate-prefill":
        from moa_jax.generate.__main__ import main

        return main, ["--model", str(model), "--recycle-k", "16", "--prefill-plan", str(plan)]
    if name == "eval":
        from moa_jax.eval.__main__ import main

        argv = ["--model", str(model), "--fast", "--methods", "moa", "--plan", str(plan)]
        return main, argv + ["--out", str(tmp_path / "ev"), "--no-progress"]
    if name == "train":
        import moa_jax.train.loop as loop

        monkeypatch.setattr(loop, "load_model", _no_weights)
        argv = ["--model", str(model), "--attention", "moa", "--plan", str(plan), "--steps", "1"]
        argv += ["--corpus", str(corpus), "--seq-len", "32", "--batch-size", "2"]
        return loop.main, argv + ["--out-dir", str(tmp_path / "run"), "--no-progress"]
    if name == "heads":
        import moa_jax.eval.heads as heads

        monkeypatch.setattr(heads, "load_model", _no_weights)
        return heads.main, ["--model", str(model), "--plan", str(plan), "--out", str(tmp_path)]
    if name == "bench.decode":  # the tiny benchmark model has the llama checkpoint's shape
        import moa_jax.bench.decode as decode

        monkeypatch.setattr(decode, "run_jax", _no_weights)
        monkeypatch.setattr(decode, "run_hf", _no_weights)
        return decode.main, ["--tiny", "--method", "moa", "--moa-densities", "--plan", str(plan)]
    raise AssertionError(name)


COMMANDS = ["generate", "generate-prefill", "eval", "train", "heads", "bench.decode"]


@pytest.mark.parametrize("mismatch", ["family", "shape"])
@pytest.mark.parametrize("command", COMMANDS)
def test_a_plan_for_another_model_is_refused_before_the_weights_load(
    command, mismatch, checkpoint, corpus, tmp_path, monkeypatch, capsys
):
    plan, searched, model_words = _foreign_plans(tmp_path)[mismatch]
    main, argv = _command(command, monkeypatch, checkpoint("llama"), plan, tmp_path, corpus)
    code = run(main, argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: "), err
    assert sum("error" in ln.lower() for ln in lines) == 1, err
    want = f"plan {plan} was searched for {searched} but the model is {model_words}"
    assert want in lines[-1], lines[-1]
    assert not (tmp_path / "ev").exists() and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------ Plan.validate alone
def test_validate_compares_the_recorded_family_and_shape():
    llama, qwen2, qwen3 = CONFIGS["llama"], CONFIGS["qwen2"], CONFIGS["qwen3"]
    plan = Plan.uniform(2, 4, window=32, metadata=model_metadata(qwen2))
    assert plan.validate(qwen2) is plan
    with pytest.raises(PlanError) as e:
        plan.validate(llama)  # the counts fit: the family does not
    assert str(e.value) == (
        "plan uniform was searched for qwen2 2 layers x 4 heads (2 KV heads, head_dim 16) "
        "but the model is llama 2 layers x 4 heads (2 KV heads, head_dim 16)"
    )
    other_dim = model_metadata(dataclasses.replace(qwen3, head_dim=16))
    with pytest.raises(PlanError, match=r"head_dim 16\) but the model is qwen3 .*head_dim 32"):
        dataclasses.replace(plan, metadata=other_dim).validate(qwen3)
    # only the family recorded: the family is compared, the counts as always
    fam_only = dataclasses.replace(plan, metadata={"model_family": "mistral"})
    assert fam_only.searched_for() == {"family": "mistral"}
    fam_only.validate(CONFIGS["mistral"])
    with pytest.raises(PlanError, match="searched for mistral 2 layers x 4 heads .* is llama"):
        fam_only.validate(llama)
    # nothing recorded (older plans): the layer and head counts only
    legacy = Plan.uniform(2, 4, window=32)
    assert legacy.searched_for() is None
    for cfg in CONFIGS.values():
        legacy.validate(cfg)
    with pytest.raises(PlanError, match="plan has 2 layers but the model has 3"):
        legacy.validate(dataclasses.replace(llama, num_layers=3))


def test_validate_names_the_plan_file(tmp_path):
    qwen2 = Plan.uniform(2, 4, window=32, metadata=model_metadata(CONFIGS["qwen2"]))
    path = qwen2.save(tmp_path / "p.json")
    plan = Plan.load(path)
    assert plan.origin == str(path) and plan == qwen2
    assert "origin" not in json.loads(path.read_text())  # not saved
    with pytest.raises(PlanError, match=f"^plan {re.escape(str(path))} was searched for qwen2"):
        plan.validate(CONFIGS["llama"])
    other = Plan.uniform(3, 4, window=32).save(tmp_path / "three.json")
    with pytest.raises(PlanError, match="three.json does not fit the model: plan has 3 layers"):
        Plan.load(other).validate(CONFIGS["llama"])


@pytest.mark.parametrize(
    "metadata,words",
    [
        ({"model_shape": [2, 4]}, "model_shape must be an object"),
        ({"model_shape": {"num_layers": "two"}}, "model_shape.num_layers must be an integer"),
        (
            {"model_family": "qwen2", "model_shape": {"family": "llama"}},
            "model_family 'qwen2' contradicts",
        ),
    ],
)
def test_a_malformed_record_is_a_plan_error(metadata, words):
    with pytest.raises(PlanError, match=words):
        Plan.uniform(2, 4, window=32, metadata=metadata).validate(CONFIGS["llama"])


REF_DIR = Path("/work/shared/reference_plans")
if not REF_DIR.is_dir():
    REF_DIR = ROOT.parent / "shared" / "reference_plans"
REF_FILES = sorted(REF_DIR.glob("*.json")) if REF_DIR.is_dir() else []


@pytest.mark.skipif(not REF_FILES, reason="reference plans not available")
@pytest.mark.parametrize("path", REF_FILES, ids=lambda p: p.name)
def test_reference_plans_record_no_model_and_fit_any_family_by_counts(path):
    plan = Plan.load(path)
    assert plan.searched_for() is None
    for family in FAMILIES:
        cfg = dataclasses.replace(
            _BASE, family=family, num_layers=plan.num_layers, num_heads=plan.num_heads,
            num_kv_heads=1, qkv_bias=family == "qwen2", qk_norm=family == "qwen3",
        )  # fmt: skip
        assert plan.validate(cfg) is plan
    with pytest.raises(PlanError, match=f"plan {re.escape(str(path))} .*does not fit the model"):
        plan.validate(dataclasses.replace(_BASE, num_layers=plan.num_layers + 1))


SMOLLM2_SHAPE = dict(family="llama", num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64)


@pytest.mark.parametrize(
    "path",
    [
        "configs/profile/smollm2-135m.plan.json",
        "configs/eval/smollm2-135m.plan.json",
        "configs/eval/smollm2-135m.oracle.plan.json",
    ],
)
def test_shipped_plans_record_their_model(path):
    plan = Plan.load(ROOT / path)
    assert plan.searched_for() == SMOLLM2_SHAPE
    assert plan.shape == (SMOLLM2_SHAPE["num_layers"], SMOLLM2_SHAPE["num_heads"])


def test_bench_decode_narrow_checks_a_plan_against_the_full_shape(tmp_path):
    """`bench.decode --narrow` times the shape at head_dim 16: a plan searched for the full
    shape is checked against it and runs without its record; another family is refused."""
    from moa_jax.bench.decode_config import DecodeConfig
    from moa_jax.bench.decode_variants import check_plans, moa_plan
    from moa_jax.bench.random_model import model_config

    full, narrow = model_config("qwen2.5-7b"), model_config("qwen2.5-7b", narrow=True)
    L, H = full.num_layers, full.num_heads
    path = Plan.uniform(L, H, window=64, metadata=model_metadata(full)).save(tmp_path / "q.json")
    config = DecodeConfig(
        shape="qwen2.5-7b", narrow=True, tiny=True, method=["moa"], moa_densities=[],
        plan=[str(path)],
    ).resolved()  # fmt: skip
    check_plans(config, narrow)
    plan = moa_plan(str(path), narrow, 128, config)
    assert plan.searched_for() is None and plan.validate(narrow) is plan
    with pytest.raises(PlanError, match="head_dim 128\\) but the model is qwen2 .*head_dim 16"):
        moa_plan(str(path), narrow, 128)  # without --narrow's config: the shapes differ
    llama = dataclasses.replace(full, family="llama", qkv_bias=False)
    other = Plan.uniform(L, H, window=64, metadata=model_metadata(llama)).save(tmp_path / "l.json")
    with pytest.raises(PlanError, match="searched for llama 28 layers .* model is qwen2"):
        check_plans(dataclasses.replace(config, plan=[str(other)]), narrow)
