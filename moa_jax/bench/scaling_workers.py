"""The measurements of `python -m moa_jax.bench.scaling` that run in its worker processes
(`--worker train|profile`), each on the n devices its process sees."""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from flax import nnx

from moa_jax.bench.device_memory import GIB, memory_stats
from moa_jax.bench.influence_profiling import synthetic_items, time_profile
from moa_jax.bench.random_model import make_weights, model_config
from moa_jax.parallel import MeshConfig, make_mesh, mesh_context, param_shardings
from moa_jax.train.attention import make_attention
from moa_jax.train.config import TrainConfig
from moa_jax.train.metrics import attention_entries, peak_flops, train_flops_per_sequence
from moa_jax.train.optimizer import make_optimizer
from moa_jax.train.step import batch_shardings, get_train_step, opt_state_shardings, replicated

if TYPE_CHECKING:
    from moa_jax.bench.scaling import ScalingConfig


def _mesh(data: int, fsdp: int, tensor: int):
    n = data * fsdp * tensor
    devices = jax.devices()
    if len(devices) < n:
        raise RuntimeError(
            f"mesh ({data}, {fsdp}, {tensor}) needs {n} devices, this process sees {len(devices)}"
        )
    return make_mesh(MeshConfig(data, fsdp, tensor), devices[:n])


def _where() -> dict:
    return dict(device=jax.devices()[0].device_kind, jax=jax.__version__)


def _timed(fn, warmup: int, iters: int) -> float:
    """Median seconds of fn() (which blocks until its results are ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_worker(n: int, args: ScalingConfig) -> dict:
    """One continued-pretraining measurement on n devices (see the module docstring)."""
    mc = model_config("tiny" if args.tiny else "llama3-8b", args.layers)
    rows = args.rows_per_device * n
    seq = args.prefix + args.tail
    cfg = TrainConfig(
        model="random",
        dtype="bfloat16",
        param_dtype="float32",
        attention="recycled",
        prefix_len=args.prefix,
        tail_len=args.tail,
        top_k=args.top_k,
        batch_size=rows,
        steps=args.train_steps + 1,
        lr=1e-5,
        warmup_steps=0,
        mesh_data=1,
        mesh_fsdp=n,
        mesh_tensor=1,
        remat=args.remat,
    )
    mesh = _mesh(1, n, 1)
    row: dict[str, Any] = dict(
        part="train",
        devices=n,
        mesh=dict(mesh.shape),
        rows=rows,
        seq_len=seq,
        top_k=args.top_k,
        remat=args.remat,
        **_where(),
    )
    attention = make_attention(cfg, mc)
    graphdef, params = make_weights(mc, param_dtype="float32", dtype="bfloat16", mesh=mesh)
    p_sh = param_shardings(params, mesh)
    optimizer = make_optimizer(cfg)
    o_sh = opt_state_shardings(jax.eval_shape(optimizer.init, params), params, p_sh, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=o_sh)(params)
    rng = jax.device_put(jax.random.PRNGKey(0), replicated(mesh))
    shape = (1, rows, seq)
    b_sh = batch_shardings(mesh, shape, lead=1)
    toks = np.random.default_rng(0).integers(0, mc.vocab_size, (1, rows, seq + 1), np.int32)
    batch = {
        "inputs": toks[..., :-1],
        "targets": toks[..., 1:],
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), shape),
        "loss_mask": np.ones(shape, np.float32),
    }
    batch = {k: jax.device_put(np.ascontiguousarray(v), b_sh) for k, v in batch.items()}
    step = get_train_step(graphdef, attention, cfg, mesh, p_sh, o_sh, shape)
    state = {"params": params, "opt": opt_state, "rng": rng}
    del params, opt_state

    def one():
        with mesh_context(mesh):
            p, o, r, m = step(state["params"], state["opt"], state["rng"], batch)
        state.update(params=p, opt=o, rng=r)
        return float(jax.device_get(m["loss"]))

    t0 = time.perf_counter()
    loss0 = one()  # compiles
    row["first_step_s"] = time.perf_counter() - t0
    dt = _timed(one, 0, args.train_steps)
    flops = rows * train_flops_per_sequence(
        mc, seq, attention_entries(attention, seq, mc.num_heads)
    )
    peak = peak_flops(cfg)
    st = memory_stats(list(mesh.devices.flat))
    row.update(
        status="ok",
        step_s=dt,
        tokens_per_s=rows * seq / dt,
        tokens_per_s_per_device=rows * seq / dt / n,
        loss_first=loss0,
        peak_gib_per_device=st.get("peak_bytes_in_use", 0) / GIB or None,
        mfu=flops / dt / (peak * n) if peak else None,
    )
    if not np.isfinite(loss0):
        raise FloatingPointError(f"loss is {loss0}")
    return row


def profile_worker(n: int, args: ScalingConfig) -> dict:
    """Influence profiling of n synthetic items per step on n devices."""
    mc = model_config("tiny" if args.tiny else "llama3-8b", args.layers)
    mesh = _mesh(n, 1, 1)
    length = args.profile_length
    items = synthetic_items(mc.vocab_size, length, n * (args.profile_steps + 1), args.answer_tokens)
    graphdef, state = make_weights(mc, mesh=mesh)
    model = nnx.merge(graphdef, state)
    row: dict[str, Any] = dict(
        part="profile",
        devices=n,
        mesh=dict(mesh.shape),
        length=length,
        items_per_step=n,
        **_where(),
    )
    t = time_profile(model, items, length, n, mesh=mesh)
    row.update(
        status="ok",
        items=t["steady_items"],
        first_step_s=t["first_batch_s"],
        seconds_per_item=t["seconds_per_item"],
        items_per_s=t["steady_items"] / max(t["steady_s"], 1e-9),
        peak_gib_per_device=t["peak_gib"],
    )
    return row
