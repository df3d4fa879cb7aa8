"""`python -m moa_jax.profile` end to end on the tiny random model (seconds, no network)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from moa_jax.cli import parse_config, run
from moa_jax.config import ModelConfig
from moa_jax.models.registry import TINY_RANDOM_CONFIG
from moa_jax.plan import Plan
from moa_jax.profile import DEFAULTS, FAST, ProfileConfig
from moa_jax.profile.__main__ import main

from test_bad_input import _one_line_error

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "tests" / "data" / "pride_and_prejudice_opening.txt").read_text()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    words = TEXT.split()
    for i in range(5):
        rng = np.random.default_rng(i)
        (d / f"part{i}.txt").write_text(" ".join(rng.permutation(words).tolist()))
    return d


@pytest.fixture(scope="module")
def run_dir(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    argv = [
        "--model",
        "tiny-random",
        "--corpus",
        str(corpus),
        "--lengths",
        "256",
        "384",
        "--items",
        "1",
        "--validation-length",
        "512",
        "--validation-items",
        "1",
        "--answer-tokens",
        "12",
        "--eps-intervals",
        "1",
        "--max-candidates",
        "2",
        "--out",
        str(out / "plan"),
        "--calibration-cache",
        str(out / "cache"),
        "--no-progress",
    ]
    assert main(argv) == 0
    return out, argv


def test_cli_writes_a_valid_plan_and_report(run_dir):
    out, _ = run_dir
    plan_dir = out / "plan"
    plan = Plan.load(plan_dir / "plan.json")
    plan.validate(TINY_RANDOM_CONFIG)
    assert plan.shape == (TINY_RANDOM_CONFIG.num_layers, TINY_RANDOM_CONFIG.num_heads)
    meta = plan.metadata
    assert meta["model"] == "tiny-random" and meta["profile_lengths"] == [256, 384]
    assert set(meta["kv_density"]) == {"256", "384", "512"}
    for n, d in meta["kv_density"].items():
        assert 0.45 - 1e-9 <= d <= 0.5 + 1e-9, (n, d)
        assert d == pytest.approx(plan.kv_density(int(n)))
    assert {"dense", "uniform", meta["candidate"]} <= set(meta["validation"])
    assert meta["validated_loss"] == meta["validation"][meta["candidate"]]
    for layer in range(plan.num_layers):  # at most two distinct rules per layer
        assert len(set(zip(plan.alphas[layer], plan.betas[layer]))) <= 2
    for name in ("spans.png", "loss_vs_density.png"):
        data = (plan_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    report = json.loads((plan_dir / "report.json").read_text())
    assert report["chosen"] == meta["candidate"]
    assert len(report["spans_per_layer"]) == TINY_RANDOM_CONFIG.num_layers
    assert any((plan_dir / "candidates").glob("c*.json"))
    assert len(list((plan_dir / "profiles").glob("*.npz"))) == 2


def test_plan_round_trips_and_rejects_another_model(run_dir, tmp_path):
    out, _ = run_dir
    plan = Plan.load(out / "plan" / "plan.json")
    again = Plan.load(plan.save(tmp_path / "copy.json"))
    assert again == plan and again.metadata["candidate"] == plan.metadata["candidate"]
    for n in (256, 512, 4096):
        np.testing.assert_array_equal(again.resolve(n), plan.resolve(n))
    other = ModelConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
    )
    with pytest.raises(ValueError, match="3"):
        plan.validate(other)


def test_cli_rerun_uses_caches(run_dir, monkeypatch):
    """A second run reuses the calibration set and the profiles (no generation, no profiling)."""
    out, argv = run_dir

    def boom(*a, **k):
        raise AssertionError("should have been cached")

    monkeypatch.setattr("moa_jax.search.calibration.generate", boom)
    monkeypatch.setattr("moa_jax.search.sensitivity.profile_items", boom)
    assert main(argv + ["--no-validate"]) == 0
    plan = Plan.load(out / "plan" / "plan.json")
    assert "validation" not in plan.metadata


def test_window_estimator_profiles_its_windows_once(run_dir, tmp_path, monkeypatch):
    """Default (answer-estimator) profiles hold no window scores (the backward pass skips them);
    a run with --estimator window profiles again with every rule's window (and the uniform
    baseline's), keeping the answer rows' sums, and later runs with any estimator reuse those
    profiles; its estimates are the profiles' rule sums."""
    import shutil

    from moa_jax.search.influence_profile import InfluenceProfile
    from moa_jax.search.rules import scaled_grid

    out, argv = run_dir
    shutil.copytree(out / "plan" / "profiles", tmp_path / "plan" / "profiles")
    files = sorted((tmp_path / "plan" / "profiles").glob("*.npz"))
    assert files and all(len(InfluenceProfile.load(f).windows) == 0 for f in files)
    argv = list(argv)
    argv[argv.index("--out") + 1] = str(tmp_path / "plan")
    assert main(argv + ["--no-validate", "--estimator", "window"]) == 0
    report = json.loads((tmp_path / "plan" / "report.json").read_text())
    plan = Plan.load(tmp_path / "plan" / "plan.json")
    assert plan.metadata["estimator"] == "window"
    grid = scaled_grid([256, 384])
    for f in files:
        prof = InfluenceProfile.load(f)
        assert set(grid.windows(prof.length)[grid.windows(prof.length) < prof.length]) <= set(
            prof.windows.tolist()
        )
        assert prof.rules.shape == prof.diag.shape[:2] + (len(prof.windows),)
        assert np.abs(prof.rules).sum() > 0
        assert prof.answer is not None and 0 < prof.answer.sum() < prof.diag.sum()
    assert set(report["estimated_loss"]) == {"256", "384"}
    monkeypatch.setattr(
        "moa_jax.search.sensitivity.profile_items",
        lambda *a, **k: pytest.fail("should have been cached"),
    )
    for est in ("window", "token", "answer"):
        assert main(argv + ["--no-validate", "--estimator", est]) == 0


def test_estimators_profile_again_for_the_sums_they_lack(run_dir, tmp_path):
    """The default ('answer-copy') profiles the answer rows alone (no every-row sums);
    --estimator token profiles again and keeps the answer sums; a cached profile without the
    answer sums (an older version's, or one stripped here) is profiled again by 'answer',
    keeping the token sums; 'answer-max' and 'answer-copy' need the answer-rows pass's own
    sums and profile again without the token sums: nothing is misread."""
    import dataclasses
    import shutil

    from moa_jax.search.influence_profile import InfluenceProfile

    out, argv = run_dir
    pdir = tmp_path / "plan" / "profiles"
    shutil.copytree(out / "plan" / "profiles", pdir)
    files = sorted(pdir.glob("*.npz"))
    assert files and all(not InfluenceProfile.load(f).token for f in files)
    argv = list(argv)
    argv[argv.index("--out") + 1] = str(tmp_path / "plan")
    assert main(argv + ["--no-validate", "--estimator", "token"]) == 0
    for f in files:
        prof = InfluenceProfile.load(f)
        assert prof.token and prof.answer is not None
        assert 0 < prof.answer.sum() < prof.diag.sum()
        dataclasses.replace(prof, answer=None).save(f)
    assert main(argv + ["--no-validate", "--estimator", "answer"]) == 0
    for f in files:
        prof = InfluenceProfile.load(f)
        assert prof.token and prof.answer is not None and prof.answer.sum() > 0
        assert prof.answer_max is None  # the every-row pass has no answer-row maxima
    assert Plan.load(tmp_path / "plan" / "plan.json").metadata["estimator"] == "answer"
    assert main(argv + ["--no-validate", "--estimator", "answer-max"]) == 0
    for f in files:
        prof = InfluenceProfile.load(f)
        assert not prof.token and prof.answer_max is not None and prof.answer_max.max() > 0
        assert prof.copy is not None and prof.copy.max() > 0
    assert Plan.load(tmp_path / "plan" / "plan.json").metadata["estimator"] == "answer-max"
    for f in files:  # an older answer-rows profile without copy sums
        dataclasses.replace(InfluenceProfile.load(f), copy=None).save(f)
    assert main(argv + ["--no-validate", "--estimator", "answer-copy"]) == 0
    assert all(InfluenceProfile.load(f).copy is not None for f in files)
    assert Plan.load(tmp_path / "plan" / "plan.json").metadata["estimator"] == "answer-copy"


def test_uniform_estimate_of_an_unprofiled_window_is_unknown():
    """Profiles reused at another --density lack that density's uniform window: its 'window'
    estimate is None (reported as unknown) instead of an error after search and validation."""
    from moa_jax.profile.outputs import _window_estimate
    from moa_jax.search.influence_profile import InfluenceProfile

    prof = InfluenceProfile.zeros(2, 3, 256, sink=64, windows=[64, 128])
    prof.rules[:] = 1.0
    prof.count = 2
    assert _window_estimate(prof, 128, "window") == pytest.approx(2 * 3 * 0.5)
    assert _window_estimate(prof, 96, "window") is None
    assert _window_estimate(prof, 256, "window") == 0.0  # the whole length: nothing dropped
    assert _window_estimate(prof, 96, "token") == 0.0  # token estimates need no window


def test_kv_cache_budget_bounds_the_cache(run_dir, tmp_path, monkeypatch):
    """--budget-on kv-cache (from the cached profiles): the plan's KV-cache size, each KV head
    at its query heads' largest span, is within the budget at every density length."""
    import shutil

    out, argv = run_dir
    shutil.copytree(out / "plan" / "profiles", tmp_path / "plan" / "profiles")
    argv = list(argv)
    argv[argv.index("--out") + 1] = str(tmp_path / "plan")

    def boom(*a, **k):
        raise AssertionError("should have been cached")

    monkeypatch.setattr("moa_jax.search.sensitivity.profile_items", boom)
    assert main(argv + ["--no-validate", "--budget-on", "kv-cache"]) == 0
    plan = Plan.load(tmp_path / "plan" / "plan.json")
    meta = plan.metadata
    assert meta["budget"]["on"] == "kv-cache"
    for n, d in meta["kv_cache_density"].items():
        assert d == pytest.approx(plan.kv_cache_density(int(n), TINY_RANDOM_CONFIG.num_kv_heads))
        assert plan.kv_density(int(n)) <= d <= 0.5 + 1e-9, (n, d)


def test_validation_backends_agree(run_dir):
    """The masked oracle used on CPU and the MoA backend (Pallas kernel, interpret mode here)
    measure the same answer loss for the searched plan."""
    from moa_jax.models.registry import load_model
    from moa_jax.search.answer_loss import make_batches
    from moa_jax.search.validate import measure_plans, pick_best

    out, _ = run_dir
    plan = Plan.load(out / "plan" / "plan.json")
    model, _ = load_model("tiny-random")
    rng = np.random.default_rng(0)

    class It:
        tokens = rng.integers(3, 500, 200).tolist()
        answer_start = 180

    batches = make_batches([It()], 256, 1, pad_id=2)
    plans = {"plan": plan, "dense": Plan.dense(*plan.shape)}
    masked = measure_plans(model, batches, plans, 256, backend="masked", progress=False)
    moa = measure_plans(model, batches, plans, 256, backend="moa", progress=False)
    for name in plans:
        np.testing.assert_allclose(moa[name], masked[name], rtol=1e-5)
    assert pick_best(masked) in plans


def test_yaml_presets_are_valid_flags():
    import dataclasses

    valid = {f.name for f in dataclasses.fields(ProfileConfig)}
    presets = sorted((ROOT / "configs" / "profile").glob("*.yaml"))
    assert {p.stem for p in presets} >= {"default", "fast"}
    for path in presets:
        values = yaml.safe_load(path.read_text())
        assert set(values) <= valid, (path, set(values) - valid)
        config = parse_config(ProfileConfig, ["--config", str(path)], prog="p", description="")
        for k, v in values.items():
            assert getattr(config, k) == v, (path, k)
    fast = yaml.safe_load((ROOT / "configs" / "profile" / "fast.yaml").read_text())
    for k, v in FAST.items():
        assert fast[k] == v, k
    defaults = yaml.safe_load((ROOT / "configs" / "profile" / "default.yaml").read_text())
    for k, v in defaults.items():
        assert getattr(ProfileConfig(), k) == v, k


def test_fast_fills_only_the_unset_options():
    config = ProfileConfig(fast=True, lengths=[256, 384])
    assert config.lengths == [256, 384]  # explicit values win
    assert config.items == FAST["items"] and config.validation_length == FAST["validation_length"]
    assert ProfileConfig().lengths == DEFAULTS["lengths"]


def test_help_runs():
    res = subprocess.run(
        [sys.executable, "-m", "moa_jax.profile", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert res.returncode == 0
    assert "--density" in res.stdout and "--fast" in res.stdout


@pytest.mark.slow
def test_fast_mode_on_smollm2(tmp_path):
    """`--fast` on the real SmolLM2-135M (several minutes on 2 CPU cores)."""
    from moa_jax.models.registry import smollm2_gguf_path
    from moa_jax.models.weights import WeightsNotFoundError

    try:
        smollm2_gguf_path()
    except WeightsNotFoundError as e:
        pytest.skip(f"SmolLM2 GGUF unavailable: {e}")
    assert main(["--fast", "--out", str(tmp_path), "--no-progress"]) == 0
    plan = Plan.load(tmp_path / "plan.json")
    cfg = ModelConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
    )
    plan.validate(cfg)
    for n in FAST["lengths"]:
        assert 0.45 - 1e-9 <= plan.kv_density(n) <= 0.5 + 1e-9
    val = plan.metadata["validation"]
    assert val[plan.metadata["candidate"]] < val["uniform"]


# The default run checks the mesh that splits all three axes; each axis alone runs under -m slow
# (every mesh profiles again: ~15 s apiece on a CPU core).
@pytest.mark.parametrize(
    "meshes", [["2,2,2"], pytest.param(["8,1,1", "1,1,8"], marks=pytest.mark.slow)]
)
def test_profile_on_meshes_matches_one_device(corpus, tmp_path, meshes):
    """--mesh 8,1,1 / 2,2,2 / 1,1,8 on 8 forced CPU devices: the same influence profiles and
    plan as one device (jax fixes its device count at start-up, hence the subprocess)."""
    import os

    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    check = ROOT / "tests" / "multidevice_profile_check.py"
    res = subprocess.run(
        [sys.executable, str(check), str(corpus), str(tmp_path), *meshes],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("OK") == len(meshes), res.stdout[-3000:]


def test_bad_mesh_is_an_error(corpus, tmp_path):
    with pytest.raises(ValueError, match="a mesh is DATA,FSDP,TENSOR"):
        main(
            [
                "--model",
                "tiny-random",
                "--corpus",
                str(corpus),
                "--mesh",
                "2x2",
                "--out",
                str(tmp_path),
            ]
        )


# ------------------------------------------------------------------------------- refusals
def _refuse(tmp_path, capsys, argv, *words) -> str:
    """Runs the command as `python -m` does; asserts exit 2, one error line with `words` and
    nothing written (neither --out nor the calibration cache)."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    code = run(
        main,
        ["--model", "tiny-random", "--out", str(out), "--calibration-cache", str(cache)]
        + ["--no-progress", *argv],
    )
    line = _one_line_error(capsys, code, 2, *words)
    assert not out.exists() and not cache.exists(), "a refused run wrote something"
    return line


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--lengths", "512", "512"], ["--lengths", "512 twice"]),
        (["--lengths", "0"], ["--lengths", "multiple of 64"]),
        (["--lengths", "96"], ["--lengths", "multiple of 64"]),
        (["--items", "1", "2"], ["--items", "one per --lengths value"]),
        (["--lengths", "512", "1024"], ["--items", "its default"]),
        (["--items", "0"], ["--items", ">= 1"]),
        (["--band", "2"], ["--band", "[0, 1]"]),
        (["--density", "0"], ["--density", "(0, 1]"]),
        (["--density", "nan"], ["--density", "finite"]),
        (["--sink", "512", "--lengths", "512", "--items", "1"], ["--sink", "smaller"]),
        (["--batch-size", "0"], ["--batch-size", ">= 1"]),
        (["--milp-gap", "-1"], ["--milp-gap", ">= 0"]),
        (["--milp-time-limit", "0"], ["--milp-time-limit", "> 0"]),
        (["--max-candidates", "0"], ["--max-candidates"]),
        (["--q-chunk", "0"], ["--q-chunk"]),
        (["--attn-chunk", "0"], ["--attn-chunk"]),
        (["--heatmap-length", "0"], ["--heatmap-length"]),
        (["--extend-length", "1024"], ["--extend-length", "longest"]),
        (["--validation-length", "100"], ["--validation-length", "multiple of 64"]),
        (["--validation-items", "0"], ["--validation-items"]),
        (["--answer-tokens", "0"], ["--answer-tokens"]),
        (["--recall-fraction", "1.5"], ["--recall-fraction"]),
        (["--eps-intervals", "-1"], ["--eps-intervals"]),
        (["--max-rules-per-layer", "0"], ["--max-rules-per-layer"]),
        (["--density-lengths", "0"], ["--density-lengths"]),
        (["--seed", "-1"], ["--seed"]),
        (["--dtype", "f64"], ["--dtype", "float32"]),
        (["--estimator", "nope"], ["--estimator", "answer-copy"]),
        (["--budget-on", "nope"], ["--budget-on", "kv-cache"]),
        (["--validate-backend", "nope"], ["--validate-backend", "masked"]),
        (["--corpus", " "], ["--corpus", "non-empty"]),
        (["--fast", "--density", "0.01"], ["density band", "--density"]),
    ],
)
def test_bad_options_are_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, argv, words):
    monkeypatch.setattr("moa_jax.profile.load_model", lambda *a, **k: pytest.fail("loaded"))
    _refuse(tmp_path, capsys, argv, *words)


def test_bad_yaml_value_names_the_key(tmp_path, capsys):
    (tmp_path / "p.yaml").write_text("batch_size: 0\n")
    _refuse(tmp_path, capsys, ["--config", str(tmp_path / "p.yaml")], "batch_size", ">= 1")


@pytest.mark.parametrize(
    "name,text,words",
    [
        ("one.jsonl", '{"text": "a single document"}\n', ["holds 1 document", "at least 2"]),
        ("bad.jsonl", '{"text": "a"}\n{"text"\n', ["bad.jsonl: line 2 is not JSON"]),
        ("field.jsonl", '{"body": "a"}\n', ["field.jsonl: line 1 has no 'text' field"]),
    ],
)
def test_bad_corpus_is_refused_before_the_model_loads(
    tmp_path, capsys, monkeypatch, name, text, words
):
    monkeypatch.setattr("moa_jax.profile.load_model", lambda *a, **k: pytest.fail("loaded"))
    (tmp_path / name).write_text(text)
    _refuse(tmp_path, capsys, ["--fast", "--corpus", str(tmp_path / name)], *words)


def test_lengths_without_room_for_a_document_are_refused(corpus, tmp_path, capsys):
    """The prompt around the document and the answer must leave it room at every length
    (the tokenizer counts the prompt: checked once the model has loaded, before calibration)."""
    argv = ["--corpus", str(corpus), "--lengths", "256", "--items", "1"]
    argv += ["--validation-length", "256", "--answer-tokens", "250"]
    _refuse(tmp_path, capsys, argv, "length 256 leaves only", "answer")


def test_given_values_are_never_replaced_by_fast():
    config = parse_config(
        ProfileConfig, ["--fast", "--validation-length", "4096"], prog="p", description=""
    )
    assert config.validation_length == 4096  # the built-in default, given: kept
    assert config.lengths == FAST["lengths"] and config.items == FAST["items"]
    assert ProfileConfig(fast=True, answer_tokens=64).answer_tokens == 64
    assert ProfileConfig() == ProfileConfig(**DEFAULTS)
