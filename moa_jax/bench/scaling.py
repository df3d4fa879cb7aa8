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
  profile  MoA's influence profiling (`moa_jax.search.sensitivity.profile_items`, the work of
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
import dataclasses
import datetime
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from moa_jax.bench.batch_search import guard
from moa_jax.bench.decode_config import BATCHES, DISTINCT_POSITIVE, MOA_DENSITIES
from moa_jax.bench.preflight import check_out
from moa_jax.cli import help_from_doc, option, parse_config, run, setup_logging
from moa_jax.domains import POSITIVE, TEXT, Choice, Domain, Float, Options, Relation

logger = logging.getLogger("moa_jax.bench.scaling")  # not __name__: '__main__' under python -m
PROG = "python -m moa_jax.bench.scaling"
PARTS = ("train", "profile", "decode")


@dataclasses.dataclass
class ScalingConfig(Options):
    """The device counts and parts to run and each part's shapes; None entries take their
    `--tiny`-dependent default in `resolved()` (a value given is kept as given). `worker` and
    `worker_out` are set by the driver for its worker processes."""

    devices: list[int] = option(
        [1, 2, 4, 8],
        "device counts to measure (worker: the count of this process)",
        DISTINCT_POSITIVE,
        nargs="+",
    )
    parts: list[str] = option(
        list(PARTS),
        "parts to run",
        Domain(str, choices=PARTS, distinct=True, min_items=1),
        nargs="+",
    )
    layouts: list[str] = option(
        ["data", "tensor"],
        "decode meshes: (n,1,1) and/or (1,1,n)",
        Domain(str, choices=("data", "tensor"), distinct=True, min_items=1),
        nargs="+",
    )
    layers: int | None = option(None, "override the layer count", POSITIVE)
    prefix: int | None = option(None, "train: L (default 8192; --tiny: 64)", POSITIVE)
    tail: int | None = option(None, "train: S (default 50; --tiny: 8)", POSITIVE)
    top_k: int | None = option(None, "train: K <= L (default 2048; --tiny: 16)", POSITIVE)
    rows_per_device: int = option(1, "train: rows per device", POSITIVE)
    remat: bool = option(True, "train: recompute each layer in the backward pass (default on)")
    train_steps: int = option(3, "train: timed steps", POSITIVE)
    profile_length: int | None = option(
        None, "profile: calibration length N (default 8192; --tiny: 128)", POSITIVE
    )
    profile_steps: int = option(2, "profile: timed steps", POSITIVE)
    answer_tokens: int | None = option(
        None, "profile: answer tokens per item, < N (default 64; --tiny: 8)", POSITIVE
    )
    decode_context: int | None = option(None, "decode: C (default 32768; --tiny: 40)", POSITIVE)
    decode_batches: list[int | str] | None = option(
        None,
        "decode: batches (bench.decode --batches; default 1 max, --tiny: 2 4)",
        BATCHES,
        nargs="+",
    )
    decode_steps: int | None = option(
        None, "decode: steps per call (default 50; --tiny: 2)", POSITIVE
    )
    moa_density: float = option(
        0.5, "decode: MoA KV density (bench.decode --moa-densities)", Choice(*MOA_DENSITIES)
    )
    timeout: float = option(900.0, "seconds per process", Float(0.0, lo_open=True))
    tiny: bool = option(False, "CPU smoke run: the tiny model and short sequences")
    out: str | None = option(None, "write the JSON report here", TEXT)
    worker: str | None = option(None, argparse.SUPPRESS, Choice("train", "profile"))
    worker_out: str | None = option(None, argparse.SUPPRESS, TEXT)

    relations = (
        Relation(
            ("top_k", "prefix"),
            lambda c: c.top_k is None or c.prefix is None or c.top_k <= c.prefix,
            "--top-k must be at most --prefix (K of the L prefix tokens)",
        ),
        Relation(
            ("answer_tokens", "profile_length"),
            lambda c: (
                c.answer_tokens is None
                or c.profile_length is None
                or c.answer_tokens < c.profile_length
            ),
            "--answer-tokens must be smaller than --profile-length",
        ),
        Relation(
            ("worker", "worker_out"),
            lambda c: (c.worker is None) == (c.worker_out is None),
            "--worker and --worker-out go together (the driver sets them)",
        ),
    )

    def resolved(self) -> ScalingConfig:
        """This config with every None default filled in (smaller ones with `tiny`)."""
        t = self.tiny

        def pick(value, default, tiny_default):
            return value if value is not None else tiny_default if t else default

        return dataclasses.replace(
            self,
            prefix=pick(self.prefix, 8192, 64),
            tail=pick(self.tail, 50, 8),
            top_k=pick(self.top_k, 2048, 16),
            profile_length=pick(self.profile_length, 8192, 128),
            answer_tokens=pick(self.answer_tokens, 64, 8),
            decode_context=pick(self.decode_context, 32768, 40),
            decode_steps=pick(self.decode_steps, 50, 2),
            decode_batches=pick(self.decode_batches, [1, "max"], [2, 4]),
        )


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


def _worker_cmd(part: str, n: int, args: ScalingConfig, out: Path) -> list[str]:
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


def _decode_cmd(n: int, layout: str, args: ScalingConfig, out: Path) -> list[str]:
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
        *map(str, args.decode_batches),
        "--steps",
        str(args.decode_steps),
        "--mesh",
        mesh,
        "--out",
        str(out),
    ]
    if args.layers:
        cmd += ["--layers", str(args.layers)]
    cmd += ["--tiny"] if args.tiny else ["--iters", "2"]
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
    """The rows as a Markdown table (the command's printed answer)."""
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


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_config(ScalingConfig, argv, prog=PROG, **help_from_doc(__doc__)).resolved()
    if args.worker:
        # the workers load jax and the model: the driver process (and `--help`) does not
        from moa_jax.bench.scaling_workers import profile_worker, train_worker

        n = args.devices[0]
        fn = train_worker if args.worker == "train" else profile_worker
        row = guard(lambda: fn(n, args), dict(part=args.worker, devices=n))
        Path(args.worker_out).write_text(json.dumps(row, default=str))
        return 0
    check_out("--out", args.out)
    gpu = shutil.which("nvidia-smi") is not None and "CUDA_VISIBLE_DEVICES" not in os.environ
    report: dict[str, Any] = dict(
        date=datetime.date.today().isoformat(),
        python=platform.python_version(),
        argv=sys.argv[1:] if argv is None else list(argv),
        args=dataclasses.asdict(args),
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
                    logger.info(
                        json.dumps({k: v for k, v in rows[-1].items() if k != "error"}, default=str)
                    )
                    if rows[-1].get("status") not in ("ok", None):
                        logger.warning(
                            "  %s: %s", rows[-1]["status"], rows[-1].get("error", "")[-600:]
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
    sys.exit(run(main))
