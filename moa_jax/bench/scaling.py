"""Scaling over the GPUs of one host (or a TPU slice): continued pretraining with recycled
attention, influence profiling and MoA / dense decoding of a Llama-3-8B-shaped model with random
bf16 weights, each on 1, 2, 4 and 8 devices, from one command.

    python -m moa_jax.bench.scaling --devices 1 2 4 8 --out scaling.json
    python -m moa_jax.bench.scaling --tiny --devices 1 2 4     # CPU smoke run (forced devices)

Every (part, device count, layout) runs in its own process, which sees only its devices
(`CUDA_VISIBLE_DEVICES` on GPU, `--xla_force_host_platform_device_count` on CPU; on a TPU give
the slice's device count), so one run's memory never limits the next, and an out-of-memory row
is recorded as such. Parts (`--parts`):

  train    the paper's continued-pretraining shape: rows of `--prefix` + `--tail` tokens
           (8192 + 50), recycled tail attending to the top-`--top-k` (2048) prefix tokens,
           AdamW on f32 master weights with bf16 compute, params and optimizer state sharded
           over `fsdp` (mesh (1, n, 1)), `--rows-per-device` rows per device per step, each
           layer rematerialised in the backward pass (`--no-remat` keeps activations).
           Reported: tokens/s, tokens/s per device, step time, peak memory per device, MFU, and
           scaling efficiency (tokens/s per device over that of the smallest count that ran).
  profile  MoA's influence profiling (`moa_jax.search.profile.profile_items`, the work of
           `python -m moa_jax.profile`) at `--profile-length` (8192) on synthetic calibration
           items, `n` items per step sharded over the data axis (mesh (n, 1, 1)): seconds per
           item, peak memory per device, efficiency.
  decode   `python -m moa_jax.bench.decode --mesh` at `--decode-context` (32768): dense
           (`dense-kernel`) and MoA (`--moa-density`, 0.5) on a data-parallel (n, 1, 1) and a
           tensor-parallel (1, 1, n) mesh, batch 1 and the largest that fits; tokens/s.

The JSON (`--out`) holds every row with device kind, shapes and date; the table is printed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from moa_jax.bench.decode import GIB, LLAMA3_8B, TINY, _guard, _memory_stats

PARTS = ("train", "profile", "decode")


# ------------------------------------------------------------------------------ workers
def _model_config(args):
    from moa_jax.config import ModelConfig

    d = dict(TINY if args.tiny else LLAMA3_8B)
    if args.layers:
        d["num_layers"] = args.layers
    return ModelConfig(**d)


def _mesh(data: int, fsdp: int, tensor: int):
    import jax

    from moa_jax.parallel import MeshConfig, make_mesh

    n = data * fsdp * tensor
    devices = jax.devices()
    if len(devices) < n:
        raise RuntimeError(
            f"mesh ({data}, {fsdp}, {tensor}) needs {n} devices, this process sees {len(devices)}"
        )
    return make_mesh(MeshConfig(data, fsdp, tensor), devices[:n])


def _where() -> dict:
    import jax

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


def train_worker(n: int, args) -> dict:
    """One continued-pretraining measurement on n devices (see the module docstring)."""
    import jax
    import numpy as np

    from moa_jax.bench.decode import make_weights
    from moa_jax.parallel import mesh_context, param_shardings
    from moa_jax.train.attention import make_attention
    from moa_jax.train.config import TrainConfig
    from moa_jax.train.metrics import attention_entries, peak_flops, train_flops_per_sequence
    from moa_jax.train.optimizer import make_optimizer
    from moa_jax.train.step import batch_shardings, get_train_step, opt_state_shardings, replicated

    mc = _model_config(args)
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
    st = _memory_stats(list(mesh.devices.flat))
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


def profile_worker(n: int, args) -> dict:
    """Influence profiling of n synthetic items per step on n devices."""
    from flax import nnx

    from moa_jax.bench.decode import make_weights
    from moa_jax.bench.profile import synthetic_items, time_profile

    mc = _model_config(args)
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


# ------------------------------------------------------------------------------ driver
def _env(n: int, gpu: bool) -> dict[str, str]:
    env = dict(os.environ)
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    if gpu:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(n))
    return env


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return 124, f"timed out after {timeout:.0f} s\n{(e.stderr or '')[-2000:]}"
    return p.returncode, (p.stdout[-2000:] + p.stderr[-4000:])


def _worker_cmd(part: str, n: int, args, out: Path) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "moa_jax.bench.scaling",
        "--worker",
        part,
        "--devices",
        str(n),
        "--worker-out",
        str(out),
        "--prefix",
        str(args.prefix),
        "--tail",
        str(args.tail),
        "--top-k",
        str(args.top_k),
        "--rows-per-device",
        str(args.rows_per_device),
        "--train-steps",
        str(args.train_steps),
        "--profile-length",
        str(args.profile_length),
        "--profile-steps",
        str(args.profile_steps),
        "--answer-tokens",
        str(args.answer_tokens),
        "--remat" if args.remat else "--no-remat",
    ]
    if args.layers:
        cmd += ["--layers", str(args.layers)]
    if args.tiny:
        cmd.append("--tiny")
    return cmd


def _decode_cmd(n: int, layout: str, args, out: Path) -> list[str]:
    mesh = f"{n},1,1" if layout == "data" else f"1,1,{n}"
    cmd = [
        sys.executable,
        "-m",
        "moa_jax.bench.decode",
        "--method",
        "dense-kernel",
        "moa",
        "--moa-densities",
        str(args.moa_density),
        "--contexts",
        str(args.decode_context),
        "--batches",
        *args.decode_batches,
        "--steps",
        str(args.decode_steps),
        "--iters",
        "2",
        "--mesh",
        mesh,
        "--out",
        str(out),
    ]
    if args.layers:
        cmd += ["--layers", str(args.layers)]
    if args.tiny:
        cmd.append("--tiny")
    return cmd


def efficiency(rows: list[dict], part: str, key: str, per_device: bool) -> None:
    """Adds `scaling_efficiency` to the ok rows of a part: the per-device rate over that of the
    smallest device count that ran (rates per device when `per_device`, else totals / n)."""
    ok = sorted(
        (r for r in rows if r.get("part") == part and r.get("status") == "ok"),
        key=lambda r: r["devices"],
    )
    if not ok:
        return
    base = ok[0]

    def rate(r):
        return r[key] if per_device else r[key] / r["devices"]

    for r in ok:
        r["scaling_efficiency"] = rate(r) / rate(base)
        r["efficiency_baseline_devices"] = base["devices"]


def format_table(rows: list[dict]) -> str:
    lines = [
        "| part | devices | mesh | figure | per device | peak GiB/device | MFU | "
        "efficiency | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def f(x, fmt):
        return "" if x is None else format(x, fmt)

    for r in rows:
        if r.get("part") == "train":
            fig, per = (
                f"{f(r.get('tokens_per_s'), '.0f')} tok/s",
                f(r.get("tokens_per_s_per_device"), ".0f"),
            )
        elif r.get("part") == "profile":
            fig, per = f"{f(r.get('seconds_per_item'), '.2f')} s/item", ""
        else:
            fig = (
                f"{r.get('variant', '')} b={r.get('batch', '')}: "
                f"{f(r.get('tokens_per_s'), '.0f')} tok/s"
            )
            per = f(r["tokens_per_s"] / r["devices"], ".0f") if r.get("tokens_per_s") else ""
        mesh = r.get("mesh") or {}
        lines.append(
            f"| {r.get('part')} | {r.get('devices')} | "
            f"{','.join(str(v) for v in mesh.values())} | {fig} | {per} | "
            f"{f(r.get('peak_gib_per_device') or r.get('peak_gib_process'), '.1f')} | "
            f"{f(r.get('mfu'), '.3f')} | {f(r.get('scaling_efficiency'), '.2f')} | "
            f"{r.get('status')} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m moa_jax.bench.scaling",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "--devices",
        type=int,
        nargs="+",
        default=[1, 2, 4, 8],
        help="device counts to measure (worker: the count of this process)",
    )
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument(
        "--layouts",
        nargs="+",
        choices=("data", "tensor"),
        default=["data", "tensor"],
        help="decode meshes: (n,1,1) and/or (1,1,n)",
    )
    p.add_argument("--layers", type=int, default=None, help="override the layer count")
    p.add_argument("--prefix", type=int, default=None, help="train: L (default 8192)")
    p.add_argument("--tail", type=int, default=None, help="train: S (default 50)")
    p.add_argument("--top-k", type=int, default=None, help="train: K (default 2048)")
    p.add_argument("--rows-per-device", type=int, default=1, help="train: rows per device")
    p.add_argument(
        "--remat",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train: recompute each layer in the backward pass (default on)",
    )
    p.add_argument("--train-steps", type=int, default=3, help="train: timed steps")
    p.add_argument(
        "--profile-length",
        type=int,
        default=None,
        help="profile: calibration length N (default 8192)",
    )
    p.add_argument("--profile-steps", type=int, default=2, help="profile: timed steps")
    p.add_argument(
        "--answer-tokens",
        type=int,
        default=None,
        help="profile: answer tokens per item (default 64)",
    )
    p.add_argument("--decode-context", type=int, default=None, help="decode: C (default 32768)")
    p.add_argument(
        "--decode-batches",
        nargs="+",
        default=None,
        help="decode: batches (bench.decode --batches; default 1 max, --tiny: 2 4)",
    )
    p.add_argument("--decode-steps", type=int, default=None, help="decode: steps per call")
    p.add_argument("--moa-density", type=float, default=0.5, help="decode: MoA KV density")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per process")
    p.add_argument(
        "--tiny", action="store_true", help="CPU smoke run: the tiny model and short sequences"
    )
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--worker", choices=("train", "profile"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    return p


def _defaults(args):
    t = args.tiny
    args.prefix = args.prefix or (64 if t else 8192)
    args.tail = args.tail or (8 if t else 50)
    args.top_k = args.top_k or (16 if t else 2048)
    args.profile_length = args.profile_length or (128 if t else 8192)
    args.answer_tokens = args.answer_tokens or (8 if t else 64)
    args.decode_context = args.decode_context or (40 if t else 32768)
    args.decode_steps = args.decode_steps or (2 if t else 50)
    args.decode_batches = args.decode_batches or (["2", "4"] if t else ["1", "max"])
    return args


def main(argv=None) -> int:
    args = _defaults(build_parser().parse_args(argv))
    if args.worker:
        n = args.devices[0]
        fn = train_worker if args.worker == "train" else profile_worker
        row = _guard(lambda: fn(n, args), dict(part=args.worker, devices=n))
        Path(args.worker_out).write_text(json.dumps(row, default=str))
        return 0
    gpu = shutil.which("nvidia-smi") is not None and "CUDA_VISIBLE_DEVICES" not in os.environ
    report: dict[str, Any] = dict(
        date=datetime.date.today().isoformat(),
        python=platform.python_version(),
        argv=sys.argv[1:] if argv is None else list(argv),
        args=vars(args),
        rows=[],
    )
    rows = report["rows"]

    def save():
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1, default=str))

    with tempfile.TemporaryDirectory() as tmp:
        for part in args.parts:
            for n in args.devices:
                layouts = args.layouts[:1] if n == 1 else args.layouts  # same mesh at n=1
                runs = [(part, None)] if part != "decode" else [(part, lay) for lay in layouts]
                for _, layout in runs:
                    out = Path(tmp) / f"{part}_{n}_{layout}.json"
                    cmd = (
                        _decode_cmd(n, layout, args, out)
                        if part == "decode"
                        else _worker_cmd(part, n, args, out)
                    )
                    t0 = time.perf_counter()
                    rc, log = _run(cmd, _env(n, gpu), args.timeout)
                    base = dict(
                        part=part, devices=n, layout=layout, wall_s=time.perf_counter() - t0
                    )
                    if rc != 0 or not out.is_file():
                        rows.append(dict(base, status="error", error=f"exit {rc}: {log[-1500:]}"))
                    elif part == "decode":
                        rep = json.loads(out.read_text())
                        for r in rep["rows"]:
                            rows.append(
                                dict(
                                    base,
                                    mesh=rep.get("mesh"),
                                    device=rep.get("device"),
                                    jax=rep.get("jax"),
                                    **r,
                                )
                            )
                    else:
                        rows.append(dict(base, **json.loads(out.read_text())))
                    print(
                        json.dumps(
                            {k: v for k, v in rows[-1].items() if k != "error"}, default=str
                        ),
                        flush=True,
                    )
                    if rows[-1].get("status") not in ("ok", None):
                        print(
                            f"  {rows[-1]['status']}: {rows[-1].get('error', '')[-600:]}",
                            file=sys.stderr,
                            flush=True,
                        )
                    save()
    efficiency(rows, "train", "tokens_per_s_per_device", True)
    efficiency(rows, "profile", "items_per_s", False)
    for r in rows:
        if r.get("device"):
            report.setdefault("device", r["device"])
    save()
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
