"""The training loop on tiny-random: learning, accumulation, mixed precision, the CLI, exact
resume, checkpoint retention and corruption, HF export, bad input; sharded runs in a subprocess."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moa_jax.cli import run
from moa_jax.errors import ConfigError
from moa_jax.models.dense_attention import TrainDenseAttention
from moa_jax.models.registry import load_model
from moa_jax.train.checkpoint import Checkpointer, CheckpointError
from moa_jax.train.config import TrainConfig, parse_config
from moa_jax.train.loop import main, train
from moa_jax.train.optimizer import lr_schedule, make_optimizer
from moa_jax.train.step import loss_sums, train_step_fn

TEXT = Path(__file__).with_name("data") / "pride_and_prejudice_opening.txt"
CHECK = Path(__file__).with_name("multidevice_train_check.py")
MP_CHECK = Path(__file__).with_name("multiprocess_train_check.py")


def write_corpus(directory: Path) -> Path:
    """Three .txt documents (about 3 kB each) cut from the test text."""
    text = TEXT.read_text()
    directory.mkdir(parents=True, exist_ok=True)
    third = len(text) // 3
    for i in range(3):
        (directory / f"part{i}.txt").write_text(text[i * third : (i + 1) * third])
    return directory


def recycled_config(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(
        model="tiny-random",
        corpus=str(write_corpus(tmp_path / "corpus")),
        attention="recycled",
        prefix_len=24,
        tail_len=8,
        top_k=6,
        steps=4,
        batch_size=4,
        lr=3e-3,
        warmup_steps=1,
        checkpoint_every=1,
        keep_checkpoints=2,
        progress=False,
        log_every=100,
        out_dir=str(tmp_path / "run"),
    )
    base.update(kw)
    return TrainConfig(**base)


def _batch(model_cfg, rows=4, seq=16, seed=0, mask_some=False):
    rng = np.random.RandomState(seed)
    tok = rng.randint(3, 200, (rows, seq + 1)).astype(np.int32)
    mask = np.ones((rows, seq), np.float32)
    if mask_some:  # uneven token counts per micro-batch: normalisation must be global
        mask[0, 5:] = 0
        mask[3, :2] = 0
    return {
        "inputs": tok[:, :-1],
        "targets": tok[:, 1:],
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)).copy(),
        "loss_mask": mask,
    }


def _split(batch, accum):
    return {k: v.reshape(accum, v.shape[0] // accum, *v.shape[1:]) for k, v in batch.items()}


def _state(dtype="float32", **kw):
    model, _ = load_model("tiny-random", dtype=dtype, param_dtype="float32")
    cfg = TrainConfig(lr=3e-3, warmup_steps=0, schedule="constant", seq_len=16, **kw)
    graphdef, params = nnx.split(model)
    opt = make_optimizer(cfg)
    return graphdef, params, opt, opt.init(params), cfg


def test_loss_decreases_on_a_repeated_batch():
    graphdef, params, opt, opt_state, _ = _state()
    step = jax.jit(train_step_fn(graphdef, TrainDenseAttention(), opt))
    batch = _split(_batch(None), 1)
    rng = jax.random.PRNGKey(0)
    losses = []
    for _ in range(15):
        params, opt_state, rng, m = step(params, opt_state, rng, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.6 * losses[0], losses


def test_gradient_accumulation_equals_a_bigger_batch():
    """Same loss and gradients (SGD with lr 1: the update is the gradient) with 2 micro-batches
    of uneven token counts as with one batch of both."""
    import optax

    graphdef, params, _, _, _ = _state()
    opt = optax.sgd(1.0)
    opt_state = opt.init(params)
    step = jax.jit(train_step_fn(graphdef, TrainDenseAttention(), opt))
    batch = _batch(None, mask_some=True)
    rng = jax.random.PRNGKey(0)
    p1, _, _, m1 = step(params, opt_state, rng, _split(batch, 1))
    p2, _, _, m2 = step(params, opt_state, rng, _split(batch, 2))
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m2["grad_norm"]), rtol=1e-5)
    assert float(m1["tokens"]) == float(m2["tokens"]) == batch["loss_mask"].sum()
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7, rtol=1e-5)


def test_remat_gives_the_same_step_and_recomputes():
    """Per-layer rematerialisation changes memory, not results: same loss and gradients (SGD
    with lr 1), and the backward pass holds `remat` regions only when asked."""
    import optax

    from moa_jax.models.recycled_train_attention import RecycledTrainAttention

    graphdef, params, _, _, _ = _state()
    opt = optax.sgd(1.0)
    opt_state = opt.init(params)
    batch = _split(_batch(None, seq=24), 1)
    rng = jax.random.PRNGKey(0)
    for attention in (TrainDenseAttention(), RecycledTrainAttention.paper(16, 8, 6)):
        plain = train_step_fn(graphdef, attention, opt)
        remat = train_step_fn(graphdef, attention, opt, remat=True)
        p1, _, _, m1 = jax.jit(plain)(params, opt_state, rng, batch)
        p2, _, _, m2 = jax.jit(remat)(params, opt_state, rng, batch)
        np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
        for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)
        assert "remat" in str(jax.make_jaxpr(remat)(params, opt_state, rng, batch))
        assert "remat" not in str(jax.make_jaxpr(plain)(params, opt_state, rng, batch))
    from moa_jax.models.attention import DenseAttention

    model = nnx.merge(graphdef, params)
    with pytest.raises(ValueError, match="remat"):
        model(
            jnp.zeros((1, 1), jnp.int32),
            jnp.zeros((1, 1), jnp.int32),
            DenseAttention().init_cache(model.config, 1, 4),
            DenseAttention(),
            mode="prefill",
            remat=True,
        )


def test_bf16_compute_keeps_f32_master_weights():
    graphdef, params, opt, opt_state, _ = _state("bfloat16")
    g32, p32, _, _, _ = _state("float32")
    step = jax.jit(train_step_fn(graphdef, TrainDenseAttention(), opt))
    batch = _batch(None)
    new, new_opt, _, m = step(params, opt_state, jax.random.PRNGKey(0), _split(batch, 1))
    assert {x.dtype for x in jax.tree.leaves(new)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(new_opt[1][0].mu)} == {jnp.dtype(jnp.float32)}
    s32 = jax.jit(lambda p, b: loss_sums(g32, p, b, TrainDenseAttention()))(p32, batch)
    loss32 = float(s32["nll"] / s32["tokens"])
    assert abs(float(m["loss"]) - loss32) < 0.02  # bf16 activations
    assert float(m["loss"]) != loss32  # ... really bf16
    # The update is applied to the f32 weights (smaller than a bf16 ulp would allow).
    delta = [
        np.abs(np.asarray(a) - np.asarray(b)).max()
        for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params))
    ]
    assert 0 < max(delta) < 1e-2


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, steps=14, schedule="linear", seq_len=16)
    s = lr_schedule(cfg)
    got = [float(s(c)) for c in range(14)]
    np.testing.assert_allclose(got[:5], [0.25, 0.5, 0.75, 1.0, 1.0])
    np.testing.assert_allclose(got[-1], 0.1, atol=1e-6)
    cos = lr_schedule(dataclasses.replace(cfg, schedule="cosine", min_lr_ratio=0.1))
    assert float(cos(4)) == pytest.approx(1.0) and float(cos(14)) == pytest.approx(0.1)


def _lr_formula(cfg: TrainConfig, count: jax.Array) -> jax.Array:
    """The schedule written out by hand (the oracle for `lr_schedule`): count c < warmup
    gives lr * (c + 1) / warmup, then cosine / linear decay to lr * min_lr_ratio at count
    `steps`, or constant."""
    peak, warm, total, floor = cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio
    c = jnp.asarray(count, jnp.float32)
    warm_lr = peak * jnp.minimum(1.0, (c + 1.0) / max(warm, 1))
    frac = jnp.clip((c - warm) / max(total - warm, 1), 0.0, 1.0)
    if cfg.schedule == "cosine":
        decay = floor + (1 - floor) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
    elif cfg.schedule == "linear":
        decay = 1 - (1 - floor) * frac
    else:
        decay = jnp.ones_like(frac)
    return jnp.where(c < warm, warm_lr, peak * decay)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup_steps", [0, 1, 5, 2000])
@pytest.mark.parametrize("min_lr_ratio", [0.0, 0.1, 1.0])
def test_lr_schedule_equals_the_formula(schedule, warmup_steps, min_lr_ratio):
    """The optax schedules give the learning rate of the formula at every step (and past the
    end, and when the warm-up is longer than the run), within two float32 ulps of the peak."""
    for steps, lr in ((1, 1.0), (14, 3e-4), (120, 1e-2), (5000, 2e-5)):
        cfg = TrainConfig(
            lr=lr,
            schedule=schedule,
            warmup_steps=warmup_steps,
            min_lr_ratio=min_lr_ratio,
            steps=steps,
            seq_len=16,
        )
        tol = 2 * float(np.finfo(np.float32).eps) * lr
        counts = jnp.arange(steps + 3, dtype=jnp.int32)
        want = np.asarray(_lr_formula(cfg, counts))
        got = np.asarray(lr_schedule(cfg)(counts))
        np.testing.assert_allclose(got, want, rtol=0, atol=tol, err_msg=str(cfg))
        for c in {0, min(warmup_steps, steps), steps - 1}:  # as the loop logs it: a Python int
            assert float(lr_schedule(cfg)(c)) == pytest.approx(float(want[c]), abs=tol)


def test_cli_resume_retention_export_and_corruption(tmp_path, capsys):
    """The CLI trains 4 steps; a run stopped after step 2 and resumed gives the same losses for
    steps 3-4; 2 checkpoints are kept; the HF export loads in transformers with equal logits;
    a corrupt checkpoint is a clear error."""
    cfg = recycled_config(tmp_path, out_dir=str(tmp_path / "a"), export_hf=str(tmp_path / "hf"))
    cfg_yaml = tmp_path / "train.yaml"
    import yaml

    cfg_yaml.write_text(
        yaml.safe_dump({k: v for k, v in dataclasses.asdict(cfg).items() if v is not None})
    )
    assert main(["--config", str(cfg_yaml)]) == 0
    records = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    losses_a = {r["step"]: r["loss"] for r in records if r["event"] == "train"}
    assert sorted(losses_a) == [1, 2, 3, 4]
    train_rec = [r for r in records if r["event"] == "train"][-1]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "step_time_s"} <= set(train_rec)
    ck = Checkpointer(tmp_path / "a" / "checkpoints")
    assert ck.all_steps() == [3, 4]  # keep_checkpoints = 2

    # Interrupted after step 2, then resumed: identical losses for steps 3 and 4.
    b = dataclasses.replace(cfg, out_dir=str(tmp_path / "b"), export_hf=None, stop_after=2)
    res_b = train(b)
    assert res_b.interrupted and sorted(res_b.losses) == [1, 2]
    assert Checkpointer(tmp_path / "b" / "checkpoints").latest_step() == 2
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(dataclasses.replace(b, stop_after=0))
    # A save that was killed half-way (orbax's temporary directory) is not a checkpoint.
    partial = tmp_path / "b" / "checkpoints" / "3.orbax-checkpoint-tmp-1234567"
    partial.mkdir()
    (partial / "junk").write_text("half")
    assert Checkpointer(tmp_path / "b" / "checkpoints").latest_step() == 2
    # the interrupted run had also logged step 3 and half a line after its last checkpoint
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"event": "train", "step": 3, "loss": 9.0}) + '\n{"event": "tr')
    res_c = train(dataclasses.replace(b, stop_after=0, resume=True))
    assert res_c.losses == {3: losses_a[3], 4: losses_a[4]}
    recs = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in recs if r["event"] == "train"]
    assert train_steps == [1, 2, 3, 4]  # one record per step after the resume
    assert {r["step"]: r["loss"] for r in recs if r["event"] == "train"} == losses_a
    assert {1: res_b.losses[1], 2: res_b.losses[2]} == {1: losses_a[1], 2: losses_a[2]}

    # The HF export equals the trained weights of the final checkpoint.
    import torch
    from transformers import LlamaForCausalLM

    model, _ = load_model("tiny-random")
    graphdef, params = nnx.split(model)
    opt_state = make_optimizer(cfg).init(params)
    state, meta = ck.restore(
        {"params": params, "opt_state": opt_state, "rng": jax.random.PRNGKey(0)}
    )
    assert meta["step"] == 4 and meta["data"]["position"] == 16
    tokens = np.random.RandomState(0).randint(3, 250, (2, 20))
    ours, _ = nnx.merge(graphdef, state["params"])(
        jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(20), (2, 20))
    )
    hf = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).float().eval()
    with torch.no_grad():
        theirs = hf(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=2e-4, rtol=1e-4)
    assert (tmp_path / "hf" / "tokenizer.json").is_file()

    # Corrupt the latest checkpoint of run b: resuming names it.
    for f in (tmp_path / "b" / "checkpoints" / "4").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="checkpoint .*4 is corrupt"):
        train(dataclasses.replace(b, stop_after=0, resume=True))
    capsys.readouterr()
    argv = ["--config", str(cfg_yaml), "--out-dir", str(tmp_path / "b"), "--resume"]
    assert run(main, argv + ["--export-hf", str(tmp_path / "hf2")]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_bad_inputs(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 3\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['learning_rate'\]"):
        parse_config(["--config", str(bad)])

    with pytest.raises(ValueError, match="no such file or directory"):
        train(recycled_config(tmp_path, corpus=str(tmp_path / "nope.jsonl")))
    argv = ["--corpus", str(tmp_path / "nope"), "--seq-len", "8", "--out-dir", str(tmp_path / "x")]
    assert run(main, argv) == 2
    assert "no such file or directory" in capsys.readouterr().err

    for kw, msg in [
        (dict(batch_size=6, grad_accum=4), "multiple of --grad-accum"),
        (dict(attention="dense"), "--seq-len must be >= 1"),
        (dict(seq_len=33), "--prefix-len \\+ --tail-len"),
        (dict(attention="dense", seq_len=8, schedule="exp"), "--schedule .* must be one of"),
        (dict(attention="moa", seq_len=32), "needs --plan"),
        (dict(packing="segments"), "--packing segments"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            recycled_config(tmp_path, **kw)


def test_moa_plan_training_runs(tmp_path):
    """MoA-plan training through MoAAttention (jnp reference kernel here; the Pallas kernel in
    the slow test below)."""
    res = train(
        recycled_config(
            tmp_path,
            attention="moa",
            plan="streaming:12:4",
            seq_len=32,
            kernel_backend="reference",
            steps=3,
            checkpoint_every=0,
            eval_sequences=2,
            heldout_docs=1,
            lr=1e-2,
        )
    )
    assert not res.interrupted and len(res.losses) == 3
    assert res.losses[3] < res.losses[1]
    assert set(res.summary["eval_after"]) == {"moa", "dense"}


@pytest.mark.slow
def test_moa_plan_training_with_the_pallas_kernel(tmp_path):
    res = train(
        recycled_config(
            tmp_path,
            attention="moa",
            plan="streaming:16:4",
            seq_len=64,
            steps=2,
            checkpoint_every=0,
        )
    )
    assert np.isfinite(list(res.losses.values())).all()


# The default run trains on the mesh that splits all three axes; each axis alone runs under
# -m slow (every mesh compiles the step again: ~13 s apiece on a CPU core).
@pytest.mark.parametrize(
    "meshes", [["2,2,2"], pytest.param(["8,1,1", "1,1,8"], marks=pytest.mark.slow)]
)
def test_sharded_training_matches_one_device(tmp_path, meshes):
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    res = subprocess.run(
        [
            sys.executable,
            str(CHECK),
            str(write_corpus(tmp_path / "corpus")),
            str(tmp_path),
            *meshes,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("OK") == len(meshes) + 1, res.stdout


def test_two_process_distributed_training_matches_one_device(tmp_path):
    """`python -m moa_jax.train` in 2 processes joined by jax.distributed over localhost (the
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID launch of the README), a
    (2, 1, 2) mesh over both processes' devices: the same losses as one device."""
    import socket

    corpus = write_corpus(tmp_path / "corpus")
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COORDINATOR")}
    res = subprocess.run(
        [sys.executable, str(MP_CHECK), str(corpus), str(tmp_path / "mp"), str(port)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    recs = [json.loads(x) for x in (tmp_path / "mp" / "metrics.jsonl").read_text().splitlines()]
    starts = [r for r in recs if r["event"] == "start"]
    assert len(starts) == 1, "only the lead process writes metrics"
    assert starts[0]["devices"] == 4 and starts[0]["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2}
    losses = [r["loss"] for r in recs if r["event"] == "train"]
    ref = train(
        TrainConfig(
            model="tiny-random",
            corpus=str(corpus),
            attention="recycled",
            prefix_len=24,
            tail_len=8,
            top_k=6,
            steps=2,
            batch_size=8,
            lr=3e-3,
            warmup_steps=1,
            progress=False,
            log_every=100,
            async_checkpointing=False,
            out_dir=str(tmp_path / "one"),
            mesh_data=1,
        ),
        devices=jax.devices()[:1],
    )
    np.testing.assert_allclose(losses, [ref.losses[1], ref.losses[2]], rtol=2e-5)
