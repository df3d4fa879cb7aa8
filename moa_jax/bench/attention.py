"""Prefill attention benchmark: our MoA kernels beside cuDNN and tokamax, forward and fwd+bwd.

    python -m moa_jax.bench.attention --seq-lens 16384 --configs dense mix1024-7168 --out r.json
    python -m moa_jax.bench.attention --plan llama3-8b-262k.moa.json --plan-layers 0 8 16 31

Configurations (per sequence length S, B x H query heads over Hkv KV heads, head_dim D):
  dense          every head causal (windows = S), no sinks
  window<W>      every head a W-token window, no sinks
  mix<A>-<B>     the first half of the heads an A-token window, the rest B (no sinks);
                 mix<A>-<B>+sinks the same with 64 sinks on every head
  het50, het25   KV density 50% / 25%: a quarter / an eighth of the heads dense, the rest one
                 short window, 64 sinks
  plan-L<l>      layer l of --plan resolved at S (its windows and sinks), for each --plan-layers
(the short window of het* is rounded to 64 tokens; dense heads are spread over the KV groups).

Implementations (--impls): `moa-mgpu` our Mosaic GPU kernel (Hopper+), `moa-triton` our Triton
kernel, `cudnn` `jax.nn.dot_product_attention(implementation='cudnn')` with one call per distinct
window (`local_window_size=(w - 1, 0)`), `tokamax` tokamax's Mosaic GPU flash attention with a
per-head `k_start` (when importable). The peers have no sinks: their rows drop them, so they do
slightly less work. Each implementation runs in its own try block; a failure is a row with an
error.

Reported: median ms over --iters timed calls after --warmup calls (each call blocked until
ready), TFLOP/s counted on kept entries (forward 4 * D * kept, forward+backward 3.5x that; each
kernel on its own mask), and each implementation's time relative to the fastest peer's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np


def plan_windows(
    kind: str, s: int, h: int, hkv: int, *, dense_groups: bool = False
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(windows, sinks) per query head for a named configuration.

    het50 / het25 make a quarter / an eighth of the heads dense. By default the dense heads are
    spread over the KV groups (one or two per group), which is what the prefill kernels see in
    searched plans; `dense_groups=True` makes them whole KV groups instead, so that a decode
    cache holding each KV head's largest window shrinks with the density.
    """
    if kind == "dense":
        return (s,) * h, (0,) * h
    if kind.startswith("window"):
        w = int(kind[len("window") :])
        return (w,) * h, (0,) * h
    if kind in ("het50", "het25"):
        density, every = (0.5, 4) if kind == "het50" else (0.25, 8)
        sink = 64
        frac_dense = 1.0 / every
        keep = (density - frac_dense) / (1.0 - frac_dense) * s  # sink + window of short heads
        w = max(64, int(round((keep - sink) / 64)) * 64)
        g = h // hkv
        n_dense = max(1, h // every)
        dense_heads = set()
        if dense_groups:
            n_groups = max(1, n_dense // g)
            for i in range(n_groups):
                grp = i * hkv // n_groups
                dense_heads.update(range(grp * g, grp * g + g))
        else:
            for i in range(n_dense):
                grp = (i * hkv // n_dense) % hkv if n_dense < hkv else i % hkv
                dense_heads.add(grp * g + (i // hkv) % g)
        windows = tuple(s if i in dense_heads else w for i in range(h))
        sinks = tuple(0 if i in dense_heads else sink for i in range(h))
        return windows, sinks
    raise ValueError(f"unknown configuration {kind!r}")


def kv_density(windows, sinks, s: int) -> float:
    return float(
        np.mean([min(s, min(w, s) + min(sk, s - min(w, s))) for w, sk in zip(windows, sinks)]) / s
    )


def _time(fn: Callable[[], Any], warmup: int, iters: int) -> float:
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def case_windows(kind: str, s: int, h: int, hkv: int, plan=None):
    """(windows, sinks) of a named configuration (see the module docstring)."""
    if kind.startswith("mix"):
        spec, _, extra = kind[3:].partition("+")
        a, b = (int(x) for x in spec.split("-"))
        sink = 64 if extra == "sinks" else 0
        return (a,) * (h // 2) + (b,) * (h - h // 2), (sink,) * h
    if kind.startswith("plan-L"):
        if plan is None:
            raise ValueError(f"{kind} needs --plan")
        layer = int(kind[len("plan-L") :])
        if plan.num_heads != h:
            raise ValueError(f"--plan has {plan.num_heads} heads per layer, --heads is {h}")
        return plan.layer_windows(s, layer), plan.layer_sinks(layer)
    return plan_windows(kind, s, h, hkv)


def _kept(windows, sinks, s: int) -> int:
    from moa_jax.pallas_kernels.masks import MaskSpec

    return MaskSpec(windows, sinks, s, s).kept_entries()


def _ours(kernel: str, windows, sinks, args):
    from moa_jax.pallas_kernels import sparse_attention

    opts = {}
    if kernel == "gpu":
        opts = dict(block_q=args.block_q, block_k=args.block_k)
    elif args.mgpu_block_k is not None:
        opts = dict(block_k=args.mgpu_block_k)
    for name in (
        ("num_stages",)
        if kernel == "mgpu"
        else (
            "block_q_dq",
            "block_k_dq",
            "block_q_dkv",
            "block_k_dkv",
            "num_warps",
            "num_stages",
            "num_warps_bwd",
            "num_stages_bwd",
        )
    ):
        if getattr(args, name, None) is not None:
            opts[name] = getattr(args, name)
    if args.interpret:
        opts["interpret"] = True
    return lambda q, k, v: sparse_attention(
        q, k, v, windows=windows, sink=sinks, backend=kernel, **opts
    )


def _cudnn(windows, s: int, hkv: int):
    """One cuDNN call per distinct window; GQA kept when a window covers whole KV groups."""
    import jax
    import jax.numpy as jnp

    h = len(windows)
    g = h // hkv
    parts = []
    for w in sorted(set(windows), key=list(windows).index):
        idx = np.asarray([i for i, x in enumerate(windows) if x == w])
        kvs, per_kv = np.unique(idx // g, return_counts=True)
        if len(set(per_kv.tolist())) != 1 or per_kv[0] != g:
            kvs = idx // g  # partial groups: one K/V copy per query head (plain MHA)
        parts.append((w, idx, kvs))
    inv = np.argsort(np.concatenate([idx for _, idx, _ in parts]))

    def attn(q, k, v):
        outs = []
        for w, idx, kvs in parts:
            lw = None if w >= s else (w - 1, 0)
            outs.append(
                jax.nn.dot_product_attention(
                    q[:, :, idx],
                    k[:, :, kvs],
                    v[:, :, kvs],
                    is_causal=True,
                    local_window_size=lw,
                    implementation="cudnn",
                )
            )
        return jnp.concatenate(outs, axis=2)[:, :, inv]

    kept = sum(len(idx) * _kept((w,), (0,), s) for w, idx, _ in parts)
    return attn, kept, f"cudnn_{len(parts)}call" + ("s" if len(parts) > 1 else "")


def _tokamax(windows, s: int):
    """tokamax's Mosaic GPU flash attention with a per-head k_start (windows; no sinks)."""
    import jax.numpy as jnp
    from tokamax._src.ops.attention import api as tk_api
    from tokamax._src.ops.attention import base as tk_base

    try:  # tokamax reads absl flags; ours are not theirs
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS(sys.argv[:1], known_only=True)
    except ImportError:  # pragma: no cover
        pass
    impl = tk_api.IMPLEMENTATIONS["mosaic_gpu"]
    i = np.arange(s)
    k_start = np.stack([np.maximum(0, i - min(w, s) + 1) for w in windows])  # [H, T]
    k_start = jnp.asarray(k_start[None], jnp.int32)

    def attn(q, k, v):
        return impl(q, k, v, mask=tk_base.Mask(k_start=k_start, is_causal=True))

    kept = sum(_kept((w,), (0,), s) for w in windows)
    return attn, kept, "tokamax_mosaic_gpu"


def _mgpu_breakdown(q, k, v, do, windows, sinks, kept: int, args) -> dict:
    """Each Mosaic GPU kernel timed alone: ms and TFLOP/s on its own matmul work (forward
    2 matmuls = 4 D kept, dq 3 = 6 D kept, dk/dv 4 = 8 D kept). With --profile-dir, each kernel
    also runs once under Mosaic GPU's in-kernel profiler and its trace is summarised
    (`trace_summary`)."""
    import os
    import tempfile

    import jax

    from moa_jax.pallas_kernels.moa_prefill_mgpu import kernel_stages

    opts = {} if args.mgpu_block_k is None else dict(block_k=args.mgpu_block_k)
    d, b = q.shape[-1], q.shape[0]
    out = {}
    for name, fn in kernel_stages(q, k, v, do, windows=windows, sinks=sinks, **opts).items():
        ms = _time(fn, args.warmup, args.iters)
        mm = {"fwd": 4.0, "dq": 6.0, "dkv": 8.0}[name] * d * b * kept
        out[name] = dict(ms=ms, tflops=mm / ms / 1e9)
    if args.profile_dir:
        os.makedirs(args.profile_dir, exist_ok=True)
        for name in ("fwd", "dq", "dkv"):
            trace_dir = tempfile.mkdtemp(prefix=f"{name}-", dir=args.profile_dir)
            fn = kernel_stages(
                q, k, v, do, windows=windows, sinks=sinks, profile_dir=trace_dir, **opts
            )[name]
            jax.block_until_ready(fn())
            jax.effects_barrier()  # the trace is written by a callback
            traces = sorted(f for f in os.listdir(trace_dir) if f.endswith("-trace.json"))
            out[name]["profile"] = trace_summary(os.path.join(trace_dir, traces[-1]))
    return out


def trace_summary(path: str, warpgroups: int = 3) -> dict:
    """A Mosaic GPU profiler trace (Chrome JSON: B/E events per warpgroup per CTA) reduced to,
    per warpgroup role (compute = all but the last warpgroup, memory = the last), each named
    scope's share of the role's busy time and its mean duration in ns."""
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    by_tid: dict[int, list[dict]] = {}
    for e in events:
        by_tid.setdefault(e["tid"], []).append(e)
    totals: dict[str, dict[str, list[float]]] = {"compute": {}, "memory": {}}
    span = {"compute": 0.0, "memory": 0.0}
    for tid, evs in by_tid.items():
        role = "memory" if (tid - 1) % warpgroups == warpgroups - 1 else "compute"
        evs.sort(key=lambda e: e["ts"])
        span[role] += evs[-1]["ts"] - evs[0]["ts"]
        open_: dict[str, float] = {}
        for e in evs:
            if e["ph"] == "B":
                open_[e["name"]] = e["ts"]
            elif e["name"] in open_:
                totals[role].setdefault(e["name"], []).append(e["ts"] - open_.pop(e["name"]))
    return {
        role: {
            name: dict(share=sum(ds) / span[role], mean_ns=1e3 * sum(ds) / len(ds), count=len(ds))
            for name, ds in sorted(scopes.items())
        }
        for role, scopes in totals.items()
        if span[role] > 0
    }


def _fwd_bwd(attn: Callable):
    import jax

    def run(q, k, v, do):
        out, vjp = jax.vjp(attn, q, k, v)
        return vjp(do)

    return jax.jit(run)


def bench_one(kind: str, s: int, args, rows: list[dict], plan=None):
    import jax
    import jax.numpy as jnp

    b, h, hkv, d = args.batch, args.heads, args.kv_heads, args.head_dim
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    windows, sinks = case_windows(kind, s, h, hkv, plan)
    ks = jax.random.split(jax.random.PRNGKey(s), 4)
    q = jax.random.normal(ks[0], (b, s, h, d), dtype)
    k = jax.random.normal(ks[1], (b, s, hkv, d), dtype)
    v = jax.random.normal(ks[2], (b, s, hkv, d), dtype)
    do = jax.random.normal(ks[3], (b, s, h, d), dtype)
    kept = _kept(windows, sinks, s)
    base = dict(
        config=kind,
        seq_len=s,
        batch=b,
        heads=h,
        kv_heads=hkv,
        head_dim=d,
        dtype=args.dtype,
        kv_density=kv_density(windows, sinks, s),
        attention_density=kept / (h * s * (s + 1) / 2),
        windows=sorted(set(windows)),
        sinks=sorted(set(sinks)),
    )
    case_rows = []
    for impl in args.impls:
        try:
            if impl in ("moa-mgpu", "moa-triton"):
                fn = _ours("mgpu" if impl == "moa-mgpu" else "gpu", windows, sinks, args)
                n_kept, name = kept, impl
            elif impl == "cudnn":
                fn, n_kept, name = _cudnn(windows, s, hkv)
            elif impl == "tokamax":
                fn, n_kept, name = _tokamax(windows, s)
            else:
                raise ValueError(f"unknown implementation {impl!r}")
            passes = [("fwd", jax.jit(fn), (q, k, v), 1.0)]
            if not args.no_bwd:
                passes.append(("fwdbwd", _fwd_bwd(fn), (q, k, v, do), 3.5))
            for pass_, f, xs, mult in passes:
                ms = _time(lambda: f(*xs), args.warmup, args.iters)
                flops = mult * 4.0 * d * b * n_kept
                case_rows.append(
                    dict(
                        base,
                        impl=name,
                        pass_=pass_,
                        ms=ms,
                        tflops=flops / ms / 1e9,
                        kept_entries=int(b * n_kept),
                    )
                )
            if impl == "moa-mgpu" and args.breakdown:
                case_rows[-1]["kernels"] = _mgpu_breakdown(q, k, v, do, windows, sinks, kept, args)
        except Exception as e:  # noqa: BLE001
            msg = f"{type(e).__name__}: {str(e)[:400]}"
            print(f"FAILED {impl} {kind} S={s}: {msg}", file=sys.stderr, flush=True)
            case_rows.append(dict(base, impl=impl, error=msg))
    for pass_ in ("fwd", "fwdbwd"):
        done = [r for r in case_rows if r.get("pass_") == pass_]
        peers = [r["ms"] for r in done if not r["impl"].startswith("moa")]
        for r in done:
            if peers:
                r["time_vs_fastest_peer"] = r["ms"] / min(peers)
    for r in case_rows:
        print(json.dumps({k: v for k, v in r.items() if k not in ("windows", "sinks")}), flush=True)
    rows.extend(case_rows)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default in --help."""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m moa_jax.bench.attention",
        description=__doc__.split("\n\n")[0],
        formatter_class=_HelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "--seq-lens",
        type=int,
        nargs="+",
        default=[4096, 16384, 32768],
        help="sequence lengths S, one row set each",
    )
    p.add_argument(
        "--configs",
        nargs="+",
        default=["dense", "mix1024-7168", "mix1024-7168+sinks", "het50"],
        metavar="CONFIG",
        help="head configurations: dense, window<W>, mix<A>-<B>[+sinks], het50, "
        "het25 (below); plan-L<l> are added for each --plan-layers",
    )
    p.add_argument(
        "--plan",
        default=None,
        help="a plan file (ours or the MoA reference's JSON) for plan-L<l> configs",
    )
    p.add_argument(
        "--plan-layers",
        type=int,
        nargs="*",
        default=[0, 8, 16, 31],
        help="layers of --plan to benchmark",
    )
    p.add_argument(
        "--impls",
        nargs="+",
        default=["moa-mgpu", "moa-triton", "cudnn", "tokamax"],
        choices=["moa-mgpu", "moa-triton", "cudnn", "tokamax"],
        help="implementations to time (each in its own try block)",
    )
    p.add_argument(
        "--mgpu-block-k",
        type=int,
        default=None,
        help="Mosaic GPU forward key block (64 or 128; default: the kernel's)",
    )
    p.add_argument("--batch", type=int, default=1, help="batch size B")
    p.add_argument("--heads", type=int, default=32, help="query heads H")
    p.add_argument("--kv-heads", type=int, default=8, help="KV heads Hkv (GQA when < H)")
    p.add_argument("--head-dim", type=int, default=128, help="head dimension D")
    p.add_argument("--dtype", choices=["bf16", "f32"], default="bf16", help="q/k/v dtype")
    p.add_argument("--iters", type=int, default=10, help="timed calls (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (compilation)")
    p.add_argument("--block-q", type=int, default=128, help="Triton forward query block")
    p.add_argument("--block-k", type=int, default=64, help="Triton forward key block")
    p.add_argument(
        "--block-q-dq",
        type=int,
        default=None,
        help="backward dq pass: query block (default: the kernel's choice)",
    )
    p.add_argument(
        "--block-k-dq",
        type=int,
        default=None,
        help="backward dq pass: key block (default: the kernel's choice)",
    )
    p.add_argument(
        "--block-q-dkv",
        type=int,
        default=None,
        help="backward dk/dv pass: query block (default: the kernel's choice)",
    )
    p.add_argument(
        "--block-k-dkv",
        type=int,
        default=None,
        help="backward dk/dv pass: key block (default: the kernel's choice)",
    )
    p.add_argument(
        "--num-warps",
        type=int,
        default=None,
        help="Triton warps, forward (default: the kernel's choice)",
    )
    p.add_argument(
        "--num-stages",
        type=int,
        default=None,
        help="Triton pipeline stages, forward (default: the kernel's choice)",
    )
    p.add_argument(
        "--num-warps-bwd",
        type=int,
        default=None,
        help="Triton warps, backward (default: the kernel's choice)",
    )
    p.add_argument(
        "--num-stages-bwd",
        type=int,
        default=None,
        help="Triton pipeline stages, backward (default: the kernel's choice)",
    )
    p.add_argument("--no-bwd", action="store_true", help="forward only")
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="also time each Mosaic GPU kernel (fwd, dq, dk/dv) alone",
    )
    p.add_argument(
        "--profile-dir",
        default=None,
        help="with --breakdown: also trace each Mosaic GPU kernel once with its "
        "in-kernel profiler, traces here, summaries in the JSON",
    )
    p.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU smoke)")
    p.add_argument("--out", default=None, help="write the JSON here")
    args = p.parse_args(argv)

    import jax

    plan = None
    configs = list(args.configs)
    if args.plan:
        from moa_jax.plan import Plan

        plan = Plan.load(args.plan)
        configs += [f"plan-L{layer}" for layer in args.plan_layers]
    rows: list[dict] = []
    for s in args.seq_lens:
        for kind in configs:
            try:
                bench_one(kind, s, args, rows, plan)
            except Exception as e:  # noqa: BLE001
                print(f"FAILED {kind} S={s}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                rows.append(dict(config=kind, seq_len=s, error=f"{type(e).__name__}: {e}"))
    dev = jax.devices()[0]
    report = dict(
        date=datetime.date.today().isoformat(),
        device=str(dev.device_kind),
        platform=dev.platform,
        jax=jax.__version__,
        python=platform.python_version(),
        args=vars(args),
        rows=rows,
    )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)
    print(format_table(rows))
    return 0


def format_table(rows: list[dict]) -> str:
    lines = [
        "| S | config | Hkv | kv dens. | pass | impl | ms | TFLOP/s | time vs fastest peer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['seq_len']} | {r['config']} | {r.get('kv_heads', '')} | | | "
                f"{r.get('impl', '')} | error: {r['error'][:60]} | | |"
            )
            continue
        lines.append(
            f"| {r['seq_len']} | {r['config']} | {r['kv_heads']} | {r['kv_density']:.2f} | "
            f"{r['pass_']} | {r['impl']} | {r['ms']:.2f} | {r['tflops']:.0f} | "
            f"{r.get('time_vs_fastest_peer', float('nan')):.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
