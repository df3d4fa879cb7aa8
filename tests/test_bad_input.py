"""Malformed inputs across the CLIs and the Python API: each is one line naming the problem, a
non-zero exit (2 for a user's mistake), and no output left behind.

The CLI cases run `moa_jax.cli.run(main, argv)`, the path `python -m ...` takes (one case per
command also runs the real subprocess). The model is the `tiny-random` preset, or a tiny HF
checkpoint written here, so nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from moa_jax.cli import run
from moa_jax.downloads import DownloadError
from moa_jax.errors import ConfigError, PlanError, UserError
from moa_jax.models.hf_weights import save_hf
from moa_jax.models.registry import TINY_RANDOM_CONFIG, init_random
from moa_jax.plan import Plan
from moa_jax.search.optimize import InfeasibleBudgetError
from moa_jax.train.checkpoint import CheckpointError

from conftest import tiny_config


def _plan_file(tmp_path: Path, plan: Plan, name: str = "plan.json") -> str:
    return str(plan.save(tmp_path / name))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A valid tiny HF checkpoint (config.json + model.safetensors)."""
    d = tmp_path_factory.mktemp("hf")
    save_hf(init_random(tiny_config(), seed=0), d)
    return d


def _copy_hf(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _one_line_error(capsys, code: int, want_code: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == want_code, err
    assert lines and lines[-1].startswith("error:"), err
    # the error is one line (progress lines such as "loaded ..." may come before it)
    assert sum("error" in ln.lower() for ln in lines) == 1, f"more than one error line: {err}"
    for n in needles:
        assert n.lower() in lines[-1].lower(), lines[-1]
    assert "Traceback" not in err
    if os.environ.get("MOA_JAX_BAD_INPUT_LOG"):  # the list of messages for a report
        test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
        with open(os.environ["MOA_JAX_BAD_INPUT_LOG"], "a") as f:
            f.write(f"{test}\texit {code}\t{lines[-1]}\n")
    return lines[-1]


# ------------------------------------------------------------------------------------ generate
def _generate(argv):
    from moa_jax.generate.__main__ import main

    return run(main, argv)


TINY = ["--model", "tiny-random", "--max-new-tokens", "2"]


def _bad_plans(tmp_path: Path) -> list[tuple[str, str]]:
    """(plan argument, expected words) for plans `generate` must refuse."""
    L, H = TINY_RANDOM_CONFIG.num_layers, TINY_RANDOM_CONFIG.num_heads
    other = _plan_file(tmp_path, Plan.uniform(28, 8, window=64), "other.json")
    trunc = tmp_path / "trunc.json"
    trunc.write_text(Path(_plan_file(tmp_path, Plan.uniform(L, H, 64), "ok.json")).read_text()[:40])
    listy = tmp_path / "list.json"
    listy.write_text("[1, 2, 3]")
    nan = tmp_path / "nan.json"
    d = Plan.uniform(L, H, 64).to_dict()
    d["alphas"][0][0] = float("nan")
    nan.write_text(json.dumps(d))
    neg = tmp_path / "neg.json"
    d = Plan.uniform(L, H, 64).to_dict()
    d["alphas"] = [[-5000.0] * H for _ in range(L)]
    d["betas"] = [[-0.5] * H for _ in range(L)]
    neg.write_text(json.dumps(d))
    return [
        (other, "28 layers"),
        (str(tmp_path / "missing.json"), "no plan file"),
        (str(trunc), "not valid JSON"),
        (str(listy), "JSON object"),
        (str(nan), "finite"),
        (str(neg), "negative at every length"),
        ("streaming:abc", "bad plan spec"),
    ]


@pytest.mark.parametrize("i", range(7))
def test_generate_rejects_bad_plans(tmp_path, capsys, monkeypatch, i):
    """Each bad plan fails before the weights are read."""
    import moa_jax.models.registry as reg

    spec, words = _bad_plans(tmp_path)[i]
    monkeypatch.setattr(reg, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    _one_line_error(capsys, _generate(TINY + ["--plan", spec]), 2, words)


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--model", "no-such-preset"], "unknown model"),
        (["--model", "./nope/model.gguf"], "no such file"),
        (["--max-new-tokens", "1000000"], "exceeds the model's context"),
        (["--max-new-tokens", "0"], "max-new-tokens"),
        (["--prompt", "   "], "--prompt (prompt) item"),
        (["--mesh", "2x2"], "DATA,FSDP,TENSOR"),
        (["--recycle-k", "8", "--plan", "dense"], "--prefill-plan"),
    ],
)
def test_generate_rejects_bad_flags(capsys, argv, words):
    base = ["--model", "tiny-random", "--max-new-tokens", "2"]
    _one_line_error(capsys, _generate(base + argv), 2, words)


def test_generate_beyond_context_only_when_asked(capsys):
    n = TINY_RANDOM_CONFIG.max_position_embeddings
    assert _generate(["--model", "tiny-random", "--max-new-tokens", str(n)]) == 2
    assert "--beyond-context" in capsys.readouterr().err


@pytest.mark.parametrize(
    "damage,words",
    [
        ("truncated_safetensors", "safetensors"),
        ("config_missing_keys", "missing required keys"),
        ("config_nan", "rope_theta"),
        ("config_not_json", "not valid JSON"),
        ("nan_weights", "non-finite"),
        ("no_config", "no config.json"),
    ],
)
def test_generate_rejects_broken_hf_checkpoints(hf_dir, tmp_path, capsys, damage, words):
    d = _copy_hf(hf_dir, tmp_path / damage)
    cfg_path = d / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if damage == "truncated_safetensors":
        st = d / "model.safetensors"
        st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    elif damage == "config_missing_keys":
        del cfg["hidden_size"], cfg["num_hidden_layers"]
        cfg_path.write_text(json.dumps(cfg))
    elif damage == "config_nan":
        cfg["rope_theta"] = float("nan")
        cfg.pop("rope_parameters", None)
        cfg_path.write_text(json.dumps(cfg))
    elif damage == "config_not_json":
        cfg_path.write_text("{ not json")
    elif damage == "nan_weights":
        model = init_random(tiny_config(), seed=0)
        w = model.layers[0].mlp.up_proj.kernel
        w[...] = w[...].at[0, 0].set(jnp.nan)
        save_hf(model, d)
    elif damage == "no_config":
        cfg_path.unlink()
    _one_line_error(capsys, _generate(["--model", str(d), "--max-new-tokens", "1"]), 2, words)


# fixed bytes: parameters must be the same in every xdist worker
_NOISE = np.random.RandomState(0).bytes(256)


@pytest.mark.parametrize(
    "content,words",
    [
        (b"GGUF" + _NOISE[:64], "GGUF"),
        (_NOISE, "GGUF"),
        (b"", "GGUF"),
    ],
    ids=["gguf-magic-then-noise", "random-bytes", "empty"],
)
def test_generate_rejects_bad_gguf(tmp_path, capsys, content, words):
    f = tmp_path / "m.gguf"
    f.write_bytes(content)
    _one_line_error(capsys, _generate(["--model", str(f)]), 2, words)


def test_not_a_gguf_file(tmp_path, capsys):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    _one_line_error(capsys, _generate(["--model", str(f)]), 2, "not a .gguf")


# ------------------------------------------------------------------------------ YAML configs
@pytest.mark.parametrize(
    "yaml_text,words",
    [
        ("max_new_tokens: [8, 16]\n", "takes one value"),
        ("max_new_tokens: lots\n", "must be an integer >= 1, got 'lots'"),
        ("no_chat_template: 3\n", "true or false"),
        ("learning_rate: 0.1\n", "unknown key"),
        ("- just\n- a list\n", "mapping"),
    ],
)
def test_bad_yaml_config_is_a_usage_error(tmp_path, capsys, yaml_text, words):
    f = tmp_path / "c.yaml"
    f.write_text(yaml_text)
    code = _generate(["--config", str(f)])
    _one_line_error(capsys, code, 2, words, str(f))


def test_yaml_single_value_for_a_repeatable_flag(tmp_path, monkeypatch):
    """`prompt: text` is one prompt, not one per character."""
    import moa_jax.generate.__main__ as gen

    class Stop(Exception):
        pass

    def stop(model, prompts, **k):
        raise Stop(prompts)

    monkeypatch.setattr(gen, "generate", stop)
    f = tmp_path / "c.yaml"
    f.write_text("prompt: Name a colour.\nmodel: tiny-random\n")
    with pytest.raises(Stop) as e:
        gen.main(["--config", str(f)])
    assert len(e.value.args[0]) == 1


def test_train_yaml_list_for_a_number(tmp_path, capsys):
    from moa_jax.train.loop import main

    f = tmp_path / "t.yaml"
    f.write_text("batch_size: [8, 16]\n")
    code = run(main, ["--config", str(f)])
    _one_line_error(capsys, code, 2, "batch_size takes one value")


# ------------------------------------------------------------------------------------ profile
def _profile(argv):
    from moa_jax.profile.__main__ import main

    return run(main, argv)


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--model", "no-such-preset"], "unknown model"),
        (["--lengths", "1000"], "multiple of 64"),
        (["--density", "1.5"], "--density"),
        (["--items", "0"], "--items"),
        (["--corpus", "/nonexistent/corpus.jsonl"], "corpus"),
        (["--mesh", "2x2"], "DATA,FSDP,TENSOR"),
    ],
)
def test_profile_bad_input_leaves_no_output(tmp_path, capsys, extra, words):
    out = tmp_path / "run"
    argv = ["--model", "tiny-random", "--fast", "--out", str(out), "--no-progress"] + extra
    _one_line_error(capsys, _profile(argv), 2, words)
    assert not out.exists(), "a failed run left its output folder"


def test_profile_out_is_a_file(tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("x")
    _one_line_error(
        capsys, _profile(["--model", "tiny-random", "--fast", "--out", str(out)]), 2, "is a file"
    )
    assert out.read_text() == "x"


# --------------------------------------------------------------------------------------- eval
def _eval(argv):
    from moa_jax.eval.__main__ import main

    return run(main, argv)


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--tasks", "nope"], "unknown task"),
        (["--methods", "magic"], "unknown method"),
        (["--lengths", "0"], "--lengths"),
        (["--num-items", "0"], "--num-items"),
    ],
)
def test_eval_bad_flags(tmp_path, capsys, extra, words):
    out = tmp_path / "ev"
    _one_line_error(capsys, _eval(["--model", "tiny-random", "--out", str(out)] + extra), 2, words)
    assert not out.exists()


def test_eval_plan_for_another_model(tmp_path, capsys, monkeypatch):
    import moa_jax.models.registry as reg

    monkeypatch.setattr(reg, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    plan = _plan_file(tmp_path, Plan.uniform(28, 8, window=64))
    out = tmp_path / "ev"
    _one_line_error(
        capsys,
        _eval(
            [
                "--model",
                "tiny-random",
                "--fast",
                "--methods",
                "moa",
                "--plan",
                plan,
                "--out",
                str(out),
            ]
        ),
        2,
        "layers",
    )
    assert not out.exists()


# -------------------------------------------------------------------------------------- train
def test_train_missing_corpus_leaves_no_folder(tmp_path, capsys):
    from moa_jax.train.loop import main

    out = tmp_path / "t"
    code = run(
        main, ["--corpus", str(tmp_path / "nope.jsonl"), "--seq-len", "8", "--out-dir", str(out)]
    )
    _one_line_error(capsys, code, 2, "no such file")
    assert not out.exists()


# ------------------------------------------------------------------------------- Python API
@pytest.mark.parametrize(
    "error, want_code",
    [
        (ConfigError("bad option\nsecond line"), 2),
        (PlanError("plan does not fit"), 2),
        (CheckpointError("checkpoint truncated"), 2),
        (InfeasibleBudgetError("no rule meets the band"), 2),
        (DownloadError("no network"), 1),
    ],
)
def test_user_errors_are_one_line_with_their_exit_code(capsys, error, want_code):
    """Every `UserError` is one `error:` line; a failed download exits 1 (a retry may work)."""
    assert isinstance(error, UserError)

    def main(argv):
        raise error

    _one_line_error(capsys, run(main, []), want_code, str(error).split()[0])


def test_api_errors_name_the_problem():
    from moa_jax.generate import generate
    from moa_jax.pallas_kernels import sparse_attention

    q = jnp.zeros((1, 8, 3, 16))
    kv = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(ValueError, match="multiple of KV heads"):
        sparse_attention(q, kv, kv, windows=(4, 4, 4))
    q = jnp.zeros((1, 8, 4, 16))
    with pytest.raises(ValueError, match="4 query heads"):
        sparse_attention(q, kv, kv, windows=(4, 4))
    with pytest.raises(ValueError, match="backend"):
        sparse_attention(q, kv, kv, windows=(4,) * 4, backend="cuda")
    model = init_random(tiny_config(), seed=0)
    with pytest.raises(ValueError, match="exceeds the KV cache length"):
        generate(model, [[5] * 20], max_new_tokens=8, max_cache_len=16)
    with pytest.raises(ValueError, match="token ids must be in"):
        generate(model, [[5, 10**6]], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[5]], max_new_tokens=0)
    with pytest.raises(PlanError, match="sink must be an integer >= 0, got -1"):
        Plan.uniform(2, 4, window=8, sink=-1)
    with pytest.raises(PlanError, match="window must be an integer >= 1, got 0"):
        Plan.uniform(2, 4, window=0)


def test_subprocess_one_line_and_debug_traceback(tmp_path):
    """The real `python -m moa_jax.generate`: one line and exit 2; --debug: the traceback."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    argv = [
        sys.executable,
        "-m",
        "moa_jax.generate",
        "--model",
        "tiny-random",
        "--plan",
        str(tmp_path / "missing.json"),
    ]
    res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines == [f"error: no plan file at {tmp_path / 'missing.json'}"], res.stderr
    res = subprocess.run(argv + ["--debug"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_numpy_nan_weights_rejected_at_load(hf_dir, tmp_path):
    """The Python API too: a checkpoint with an inf weight raises, never loads silently."""
    from moa_jax.models.hf_weights import load_hf
    from moa_jax.models.weights import WeightsError

    model = init_random(tiny_config(), seed=0)
    w = model.embed_tokens.embedding
    w[...] = w[...].at[3, 1].set(np.inf)
    d = tmp_path / "inf"
    save_hf(model, d)
    with pytest.raises(WeightsError, match="non-finite"):
        load_hf(d)


def test_cache_that_cannot_fit_is_an_error_before_allocation(monkeypatch):
    """With a device of 1 MiB free, a 4 x 2048-token dense cache (4 MiB) is refused before any
    allocation, naming the batch and length that would fit; MoA's smaller span cache is sized
    by the same rule (its own init_cache shapes)."""
    import moa_jax.generate as gen
    from moa_jax.generate import generate
    from moa_jax.models.moa_attention import MoAAttention

    model = init_random(tiny_config(), seed=0)
    monkeypatch.setattr(gen, "_device_memory", lambda devices=None: (2**20, 0))
    monkeypatch.setattr(gen, "_generate_jit", lambda *a, **k: pytest.fail("allocated"))
    with pytest.raises(
        ValueError,
        match=r"largest batch that fits is 0, or at batch 4 about "
        r"\d+ tokens",
    ):
        generate(model, [[5] * 8] * 4, max_new_tokens=2000, max_cache_len=2048)
    plan = Plan.uniform(2, 4, window=64, sink=0)
    with pytest.raises(ValueError, match="KV cache for batch 64"):
        generate(
            model,
            [[5] * 8] * 64,
            max_new_tokens=2000,
            max_cache_len=2048,
            attention=MoAAttention(plan),
        )

    class Ran(Exception):
        pass

    def ran(*a, **k):
        raise Ran

    monkeypatch.setattr(gen, "_device_memory", lambda devices=None: (2**40, 0))
    monkeypatch.setattr(gen, "_generate_jit", ran)
    with pytest.raises(Ran):  # enough memory: it goes on to run
        generate(model, [[5] * 8] * 4, max_new_tokens=2000, max_cache_len=2048)
