"""`python -m moa_jax.train` at its boundary: every option in its declared domain (a refusal is
one line naming the flag, exit 2, nothing written), the checks that need the model or the corpus
before the run folder is made, a diverged run (exit 1, the last good checkpoint kept and
resumable), and SIGINT / SIGTERM (a checkpoint of the last step, even when the signal comes
during an asynchronous checkpoint write; a resume ends with the weights of an uninterrupted
run)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from train_signal_check import install

from moa_jax.cli import Terminated, run
from moa_jax.errors import ConfigError
from moa_jax.models.registry import load_model
from moa_jax.train import loop
from moa_jax.train.checkpoint import Checkpointer
from moa_jax.train.config import TrainConfig, parse_config
from moa_jax.train.loop import main
from moa_jax.train.optimizer import make_optimizer
from moa_jax.train.signals import StopSignals

from test_bad_input import _one_line_error

TEXT = Path(__file__).with_name("data") / "pride_and_prejudice_opening.txt"
SIGNAL_CHECK = Path(__file__).with_name("train_signal_check.py")
# one document of 9,680 tokens (the tokenizer is byte-level): 569 rows of 17 tokens
BASE = ["--model", "tiny-random", "--corpus", str(TEXT), "--seq-len", "16", "--no-progress"]
RUN = BASE + ["--steps", "6", "--batch-size", "2", "--checkpoint-every", "2", "--log-every", "100"]
RECYCLED = ["--attention", "recycled", "--prefix-len", "8", "--tail-len", "8", "--top-k", "4"]


def _train(argv: list[str]) -> int:
    return run(main, argv)


def _refused(tmp_path, monkeypatch, capsys, argv, *needles) -> str:
    """Runs the CLI in tmp_path with --out-dir tmp_path/run: exit 2, one line naming the
    needles, and nothing written."""
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    line = _one_line_error(capsys, _train(argv + ["--out-dir", str(tmp_path / "run")]), 2, *needles)
    assert sorted(tmp_path.rglob("*")) == before, "a refused run wrote something"
    return line


# ------------------------------------------------------------------------------ the domains
@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--b1", "2"], "--b1"),
        (["--b1", "1"], "--b1"),
        (["--b2", "-1"], "--b2"),
        (["--lr", "inf"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--lr", "0"], "--lr"),
        (["--eps", "0"], "--eps"),
        (["--weight-decay", "-0.1"], "--weight-decay"),
        (["--clip-norm", "-1"], "--clip-norm"),
        (["--min-lr-ratio", "1.5"], "--min-lr-ratio"),
        (["--warmup-steps", "-1"], "--warmup-steps"),
        (["--steps", "0"], "--steps"),
        (["--batch-size", "0"], "--batch-size"),
        (["--grad-accum", "0"], "--grad-accum"),
        (["--batch-size", "6", "--grad-accum", "4"], "--grad-accum"),
        (["--seq-len", "-1"], "--seq-len"),
        (["--seq-len", "0"], "--seq-len"),
        (["--seq-len", "2.5"], "--seq-len"),
        (["--top-k", "-1"], "--top-k"),
        (RECYCLED + ["--tail-len", "0"], "--tail-len"),
        (RECYCLED + ["--seq-len", "20"], "--seq-len"),
        (RECYCLED + ["--top-k", "9"], "--top-k"),
        (RECYCLED + ["--eval-top-k", "9"], "--eval-top-k"),
        (RECYCLED + ["--refresh-stride", "-1"], "--refresh-stride"),
        (RECYCLED + ["--pool-kernel", "4"], "--pool-kernel"),
        (RECYCLED + ["--pool-kernel", "0"], "--pool-kernel"),
        (RECYCLED + ["--decode-eviction", "--seq-len", "0"], "--decode-eviction"),
        (["--attention", "h2o"], "--attention"),
        (["--method", "recycled", "--attention", "moa"], "--method"),
        (["--attention", "moa"], "--plan"),
        (["--plan", "dense"], "--plan"),
        (["--attention-impl", "flash"], "--attention-impl"),
        (["--kernel-backend", "cuda"], "--kernel-backend"),
        (["--schedule", "exp"], "--schedule"),
        (["--packing", "zip"], "--packing"),
        (RECYCLED + ["--seq-len", "0", "--packing", "segments"], "--packing"),
        (["--dtype", "float64"], "--dtype"),
        (["--param-dtype", "int8"], "--param-dtype"),
        (["--export-dtype", "f8"], "--export-dtype"),
        (["--model", " "], "--model"),
        (["--corpus", ""], "--corpus"),
        (["--max-documents", "-1"], "--max-documents"),
        (["--heldout-docs", "-1"], "--heldout-docs"),
        (["--eval-sequences", "-1"], "--eval-sequences"),
        (["--eval-sequences", "2"], "--eval-sequences"),
        (["--eval-every", "-1"], "--eval-every"),
        (["--eval-batch-size", "-2"], "--eval-batch-size"),
        (["--eval-top-k", "-1"], "--eval-top-k"),
        (["--eval-strides", "-1"], "--eval-strides"),
        (["--eval-strides", "4", "4"], "--eval-strides"),
        (["--seed", "-1"], "--seed"),
        (["--data-seed", "-1"], "--data-seed"),
        (["--mesh-data", "0"], "--mesh-data"),
        (["--mesh-tensor", "-2"], "--mesh-tensor"),
        (["--mesh-fsdp", "-1"], "--mesh-fsdp"),
        (["--checkpoint-every", "-1"], "--checkpoint-every"),
        (["--keep-checkpoints", "0"], "--keep-checkpoints"),
        (["--log-every", "0"], "--log-every"),
        (["--peak-tflops", "-1"], "--peak-tflops"),
        (["--stop-after", "-1"], "--stop-after"),
        (["--stop-after", "6", "--steps", "6"], "--stop-after"),
    ],
)
def test_out_of_domain_options_are_refused(tmp_path, monkeypatch, capsys, argv, flag):
    _refused(tmp_path, monkeypatch, capsys, BASE + argv, flag)


def test_yaml_keys_and_the_python_api_have_the_same_domains(tmp_path, monkeypatch, capsys):
    f = tmp_path / "t.yaml"
    f.write_text("b2: 1.0\n")
    _refused(tmp_path, monkeypatch, capsys, BASE + ["--config", str(f)], "b2")
    with pytest.raises(ConfigError, match="--lr"):
        TrainConfig(seq_len=16, lr=float("inf"))
    cfg = TrainConfig(seq_len=16)
    with pytest.raises(ConfigError, match="--grad-accum"):
        dataclasses.replace(cfg, batch_size=6, grad_accum=4)
    lr = TrainConfig(seq_len=16, lr=1).lr
    assert lr == 1.0 and isinstance(lr, float)


def test_method_is_the_attention():
    cfg = parse_config(BASE + RECYCLED + ["--method", "recycled", "--attention", "dense"])
    assert cfg.attention == "recycled" and cfg.method is None
    assert cfg.effective_seq_len() == 16


# ------------------------------------------------------------- checks before the run folder
def test_checks_that_need_the_model_or_the_corpus(tmp_path, monkeypatch, capsys):
    """Rows beyond the model's context, fewer rows than a batch, an empty corpus, a plan that
    cannot load: refused before anything is written."""
    _refused(tmp_path, monkeypatch, capsys, BASE + ["--seq-len", "4096"], "--beyond-context")
    _refused(tmp_path, monkeypatch, capsys, BASE + ["--batch-size", "600"], "--batch-size")
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(tmp_path, monkeypatch, capsys, BASE + ["--corpus", str(empty)], str(empty))
    (empty / "a.txt").write_text("")
    _refused(tmp_path, monkeypatch, capsys, BASE + ["--corpus", str(empty)], str(empty))
    (empty / "a.txt").write_text("short")
    _refused(tmp_path, monkeypatch, capsys, BASE + ["--corpus", str(empty)], "no training rows")
    argv = BASE + ["--attention", "moa", "--plan", "streaming:x"]
    _refused(tmp_path, monkeypatch, capsys, argv, "plan")


def test_resume_needs_a_checkpoint(tmp_path, monkeypatch, capsys):
    _refused(tmp_path, monkeypatch, capsys, RUN + ["--resume"], "--resume")
    (tmp_path / "run").mkdir()
    _refused(tmp_path, monkeypatch, capsys, RUN + ["--resume"], "--resume")


# ---------------------------------------------------------------------------- an uninterrupted run
@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict[int, float], dict]:
    """Losses by step and final state of `RUN` without interruption."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert _train(RUN + ["--out-dir", str(out)]) == 0
    return _losses(out), _final_state(out, 6)


def _losses(out: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r["event"] == "train"}


def _final_state(out: Path, step: int) -> dict:
    graphdef, params = nnx.split(load_model("tiny-random")[0])
    cfg = parse_config(RUN)
    target = {
        "params": params,
        "opt_state": make_optimizer(cfg).init(params),
        "rng": jax.random.PRNGKey(0),
    }
    state, meta = Checkpointer(out / "checkpoints").restore(target, step)
    assert meta["step"] == step
    return state


def _assert_same_state(a: dict, b: dict) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# -------------------------------------------------------------------------------- divergence
def test_divergence_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys, reference):
    """NaN weights in step 3: exit 1, one line naming the step and the kept checkpoint (step
    2), no checkpoint of step 3; --resume continues to the weights of an uninterrupted run."""
    out = tmp_path / "run"
    real_step = loop._Loop.train_step

    def train_step(self, step):
        if step == 3:  # the weights go bad during step 3
            self.state.params = jax.tree.map(lambda x: x * np.nan, self.state.params)
        return real_step(self, step)

    monkeypatch.setattr(loop._Loop, "train_step", train_step)
    line = _one_line_error(capsys, _train(RUN + ["--out-dir", str(out)]), 1, "diverged at step 3")
    assert "loss is nan" in line and "checkpoint (step 2) is kept" in line, line
    assert Checkpointer(out / "checkpoints").all_steps() == [2]
    monkeypatch.setattr(loop._Loop, "train_step", real_step)
    assert _train(RUN + ["--out-dir", str(out), "--resume"]) == 0
    losses, state = reference
    assert _losses(out) == losses
    _assert_same_state(_final_state(out, 6), state)


def test_a_huge_learning_rate_diverges(tmp_path, capsys):
    """--lr 1e39 (finite, but inf in float32) turns the weights into inf / NaN in step 1, with
    a finite loss and gradient: nothing is saved."""
    out = tmp_path / "run"
    argv = RUN + ["--lr", "1e39", "--checkpoint-every", "1", "--out-dir", str(out)]
    words = "diverged at step 1: the updated weights are not finite", "no checkpoint was saved"
    _one_line_error(capsys, _train(argv), 1, *words)
    assert Checkpointer(out / "checkpoints").all_steps() == []


# ----------------------------------------------------------------------------------- signals
def _stopped_then_resumed(out: Path, err: str, code: int, sig: str, step: int, saved, reference):
    """The stopped run's exit, last line and checkpoints; then --resume ends as `reference`."""
    want = 128 + getattr(signal, sig)
    assert code == want, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1] == ("terminated" if sig == "SIGTERM" else "interrupted"), err
    assert "Traceback" not in err and not any("error" in ln.lower() for ln in lines), err
    assert f"stopped after step {step}" in err
    assert Checkpointer(out / "checkpoints").all_steps() == saved
    assert not [p for p in (out / "checkpoints").iterdir() if "tmp" in p.name]
    assert _train(RUN + ["--out-dir", str(out), "--resume"]) == 0
    losses, state = reference
    assert _losses(out) == losses
    _assert_same_state(_final_state(out, 6), state)


def test_sigterm_during_a_checkpoint_write(tmp_path, reference):
    """The real process, SIGTERM while step 2's checkpoint is written in the background: exit
    143, `terminated` last and no traceback; step 2's checkpoint is complete, and --resume
    ends with the weights of the uninterrupted run."""
    out = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, str(SIGNAL_CHECK), "SIGTERM", "save", "2"]
    cmd += RUN + ["--out-dir", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert "signal sent (write in progress: True)" in res.stdout, res.stdout + res.stderr
    _stopped_then_resumed(out, res.stderr, res.returncode, "SIGTERM", 2, [2], reference)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_inside_a_step_saves_that_step(tmp_path, capsys, monkeypatch, reference, sig):
    """SIGINT / SIGTERM inside step 3 (not a checkpoint step): the step completes and is saved
    before the run stops (130 / 143); --resume continues from step 3 to the same weights."""
    out = tmp_path / "run"
    install(getattr(signal, sig), "step", 3, monkeypatch.setattr)
    code = _train(RUN + ["--out-dir", str(out)])
    monkeypatch.undo()
    err = capsys.readouterr().err
    _stopped_then_resumed(out, err, code, sig, 3, [2, 3], reference)


def test_a_partial_checkpoint_is_not_resumed(tmp_path, reference):
    """What a process killed during a write leaves (orbax's temporary directory, with or
    without its timestamp) is not a checkpoint: --resume continues from the last complete one."""
    out = tmp_path / "run"
    assert _train(RUN + ["--out-dir", str(out), "--stop-after", "2"]) == 0
    for name in ("4.orbax-checkpoint-tmp", "3.orbax-checkpoint-tmp-1234567"):
        (out / "checkpoints" / name).mkdir()
        (out / "checkpoints" / name / "junk").write_text("half")
    assert Checkpointer(out / "checkpoints").latest_step() == 2
    assert _train(RUN + ["--out-dir", str(out), "--resume"]) == 0
    losses, state = reference
    assert _losses(out) == losses
    _assert_same_state(_final_state(out, 6), state)


def test_a_second_signal_stops_at_once_except_inside_a_write():
    """The first signal is a request; a second one raises at once, or, inside `shielded` (a
    checkpoint save or wait), right after it. The handlers before are restored."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopSignals() as signals:
        signal.raise_signal(signal.SIGTERM)
        assert signals.requested() is Terminated
        finished = False
        with pytest.raises(KeyboardInterrupt):
            with signals.shielded():
                signal.raise_signal(signal.SIGINT)
                finished = True
        assert finished
        with pytest.raises(Terminated):
            signal.raise_signal(signal.SIGTERM)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
