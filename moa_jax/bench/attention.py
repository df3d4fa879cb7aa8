"""Prefill attention benchmark: MoA block-sparse kernel vs cuDNN, forward and forward+backward.

    python -m moa_jax.bench.attention --seq-lens 4096 16384 32768 --out results.json

Configurations (per sequence length S, B x H query heads over Hkv KV heads, head_dim D):
  dense       every head causal (windows = S), no sinks
  window1024  every head a 1024-token window, no sinks
  het50       KV density 50%: a quarter of the heads dense, the rest one short window, 64 sinks
  het25       KV density 25%: an eighth of the heads dense, the rest one short window, 64 sinks
(the short window is rounded to 64 tokens; dense heads are spread over the KV groups).

Baselines: `jax.nn.dot_product_attention(implementation='cudnn')`: causal for dense, with
`local_window_size=(w - 1, 0)` for windows; for the heterogeneous plans one call per head group
(dense heads causal, the others windowed; cuDNN has no sinks, so it does slightly less work).

Reported: median ms over --iters timed calls after --warmup calls (each call blocked until
ready), TFLOP/s counted on kept entries (forward 4 * D * kept, forward+backward 3.5x that; each
kernel on its own mask), and our speed relative to cuDNN's (TFLOP/s ratio and time ratio).
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


def plan_windows(kind: str, s: int, h: int, hkv: int, *,
                 dense_groups: bool = False) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(windows, sinks) per query head for a named configuration.

    het50 / het25 make a quarter / an eighth of the heads dense. By default the dense heads are
    spread over the KV groups (one or two per group), which is what the prefill kernels see in
    searched plans; `dense_groups=True` makes them whole KV groups instead, so that a decode
    cache holding each KV head's largest window shrinks with the density.
    """
    if kind == "dense":
        return (s,) * h, (0,) * h
    if kind.startswith("window"):
        w = int(kind[len("window"):])
        return (w,) * h, (0,) * h
    if kind in ("het50", "het25"):
        density, every = (0.5, 4) if kind == "het50" else (0.25, 8)
        sink = 64
        frac_dense = 1.0 / every
        keep = (density - frac_dense) / (1.0 - frac_dense) * s      # sink + window of short heads
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
    return float(np.mean([min(s, min(w, s) + min(sk, s - min(w, s)))
                          for w, sk in zip(windows, sinks)]) / s)


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


def _fwd_bwd(attn: Callable):
    import jax

    def run(q, k, v, do):
        out, vjp = jax.vjp(attn, q, k, v)
        return vjp(do)
    return jax.jit(run)


def _cudnn_groups(windows, hkv):
    """Head groups by window for cuDNN: {window: query head indices} (sinks dropped)."""
    groups: dict[int, list[int]] = {}
    for i, w in enumerate(windows):
        groups.setdefault(int(w), []).append(i)
    return groups


def bench_one(kind: str, s: int, args, rows: list[dict]):
    import jax
    import jax.numpy as jnp

    from moa_jax.pallas_kernels import sparse_attention
    from moa_jax.pallas_kernels.masks import MaskSpec

    b, h, hkv, d = args.batch, args.heads, args.kv_heads, args.head_dim
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    windows, sinks = plan_windows(kind, s, h, hkv)
    ks = jax.random.split(jax.random.PRNGKey(s), 4)
    q = jax.random.normal(ks[0], (b, s, h, d), dtype)
    k = jax.random.normal(ks[1], (b, s, hkv, d), dtype)
    v = jax.random.normal(ks[2], (b, s, hkv, d), dtype)
    do = jax.random.normal(ks[3], (b, s, h, d), dtype)
    kept = b * MaskSpec(windows, sinks, s, s).kept_entries()
    fwd_flops = 4.0 * d * kept
    kopts = dict(block_q=args.block_q, block_k=args.block_k)
    for name in ("block_q_dq", "block_k_dq", "block_q_dkv", "block_k_dkv", "num_warps",
                 "num_stages", "num_warps_bwd", "num_stages_bwd"):
        if getattr(args, name) is not None:
            kopts[name] = getattr(args, name)
    if args.interpret:
        kopts["interpret"] = True

    def ours(q, k, v):
        return sparse_attention(q, k, v, windows=windows, sink=sinks, **kopts)

    base = dict(config=kind, seq_len=s, batch=b, heads=h, kv_heads=hkv, head_dim=d,
                dtype=args.dtype, kv_density=kv_density(windows, sinks, s),
                attention_density=kept / (b * h * s * (s + 1) / 2),
                windows=sorted(set(windows)), sinks=sorted(set(sinks)))
    results = {}
    # cuDNN first: per head group, K/V shared (GQA kept when the group covers whole KV groups).
    groups = _cudnn_groups(windows, hkv)
    cudnn_ok = not args.no_cudnn
    if cudnn_ok:
        g = h // hkv
        parts = []
        for w, idx in groups.items():
            idx = np.asarray(idx)
            kvs, per_kv = np.unique(idx // g, return_counts=True)
            if len(set(per_kv.tolist())) != 1:
                kvs = idx // g      # uneven groups: one K/V copy per query head (plain MHA)
            parts.append((w, idx, kvs))
        qs = [q[:, :, idx] for _, idx, _ in parts]
        kvsub = [(k[:, :, kvs], v[:, :, kvs]) for _, _, kvs in parts]
        cudnn_kept = sum(b * len(idx) * (s * (s + 1) // 2 if w >= s else
                                         MaskSpec((w,), (0,), s, s).kept_entries())
                         for w, idx, _ in parts)

        def cudnn(qs_, kvs_):
            outs = []
            for (w, _, _), qq, (kk, vv) in zip(parts, qs_, kvs_):
                lw = None if w >= s else (w - 1, 0)
                outs.append(jax.nn.dot_product_attention(qq, kk, vv, is_causal=True,
                                                         local_window_size=lw,
                                                         implementation="cudnn"))
            return outs
        dos = [do[:, :, idx] for _, idx, _ in parts]
        try:
            f = jax.jit(cudnn)
            results["cudnn_fwd"] = (_time(lambda: f(qs, kvsub), args.warmup, args.iters),
                                    4.0 * d * cudnn_kept)
            if not args.no_bwd:
                fb = jax.jit(lambda qs_, kvs_, dos_: jax.vjp(cudnn, qs_, kvs_)[1](dos_))
                results["cudnn_fwdbwd"] = (_time(lambda: fb(qs, kvsub, dos), args.warmup,
                                                 args.iters), 3.5 * 4.0 * d * cudnn_kept)
        except Exception as e:  # noqa: BLE001
            print(f"cuDNN failed for {kind} S={s}: {type(e).__name__}: {e}", file=sys.stderr)
            cudnn_ok = False
    f = jax.jit(ours)
    results["moa_fwd"] = (_time(lambda: f(q, k, v), args.warmup, args.iters), fwd_flops)
    if not args.no_bwd:
        fb = _fwd_bwd(ours)
        results["moa_fwdbwd"] = (_time(lambda: fb(q, k, v, do), args.warmup, args.iters),
                                 3.5 * fwd_flops)
    for pass_ in ("fwd", "fwdbwd"):
        if f"moa_{pass_}" not in results:
            continue
        ms, flops = results[f"moa_{pass_}"]
        row = dict(base, impl="moa_pallas_triton", pass_=pass_, ms=ms,
                   tflops=flops / ms / 1e9, kept_entries=int(kept))
        if cudnn_ok and f"cudnn_{pass_}" in results:
            cms, cflops = results[f"cudnn_{pass_}"]
            crow = dict(base, impl="cudnn" + ("" if len(groups) == 1 else f"_{len(groups)}calls"),
                        pass_=pass_, ms=cms, tflops=cflops / cms / 1e9,
                        kept_entries=int(cflops / 4.0 / d / (3.5 if pass_ == "fwdbwd" else 1)))
            row["tflops_ratio_vs_cudnn"] = row["tflops"] / crow["tflops"]
            row["speedup_vs_cudnn"] = cms / ms
            rows.append(crow)
        rows.append(row)
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("windows", "sinks")}),
              flush=True)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter,
                     argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default in --help."""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m moa_jax.bench.attention",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=_HelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384, 32768],
                   help="sequence lengths S, one row set each")
    p.add_argument("--configs", nargs="+", default=["dense", "window1024", "het50", "het25"],
                   metavar="CONFIG",
                   help="head configurations: dense, window<W> (any W), het50, het25 (below)")
    p.add_argument("--batch", type=int, default=1, help="batch size B")
    p.add_argument("--heads", type=int, default=32, help="query heads H")
    p.add_argument("--kv-heads", type=int, default=8, help="KV heads Hkv (GQA when < H)")
    p.add_argument("--head-dim", type=int, default=128, help="head dimension D")
    p.add_argument("--dtype", choices=["bf16", "f32"], default="bf16", help="q/k/v dtype")
    p.add_argument("--iters", type=int, default=10, help="timed calls (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (compilation)")
    p.add_argument("--block-q", type=int, default=128, help="forward query block")
    p.add_argument("--block-k", type=int, default=64, help="forward key block")
    p.add_argument("--block-q-dq", type=int, default=None,
                   help="backward dq pass: query block (default: the kernel's choice)")
    p.add_argument("--block-k-dq", type=int, default=None,
                   help="backward dq pass: key block (default: the kernel's choice)")
    p.add_argument("--block-q-dkv", type=int, default=None,
                   help="backward dk/dv pass: query block (default: the kernel's choice)")
    p.add_argument("--block-k-dkv", type=int, default=None,
                   help="backward dk/dv pass: key block (default: the kernel's choice)")
    p.add_argument("--num-warps", type=int, default=None,
                   help="Triton warps, forward (default: the kernel's choice)")
    p.add_argument("--num-stages", type=int, default=None,
                   help="Triton pipeline stages, forward (default: the kernel's choice)")
    p.add_argument("--num-warps-bwd", type=int, default=None,
                   help="Triton warps, backward (default: the kernel's choice)")
    p.add_argument("--num-stages-bwd", type=int, default=None,
                   help="Triton pipeline stages, backward (default: the kernel's choice)")
    p.add_argument("--no-bwd", action="store_true", help="forward only")
    p.add_argument("--no-cudnn", action="store_true", help="skip the cuDNN baseline")
    p.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU smoke)")
    p.add_argument("--out", default=None, help="write the JSON here")
    args = p.parse_args(argv)

    import jax
    rows: list[dict] = []
    for s in args.seq_lens:
        for kind in args.configs:
            try:
                bench_one(kind, s, args, rows)
            except Exception as e:  # noqa: BLE001
                print(f"FAILED {kind} S={s}: {type(e).__name__}: {e}", file=sys.stderr,
                      flush=True)
                rows.append(dict(config=kind, seq_len=s, error=f"{type(e).__name__}: {e}"))
    dev = jax.devices()[0]
    report = dict(date=datetime.date.today().isoformat(), device=str(dev.device_kind),
                  platform=dev.platform, jax=jax.__version__, python=platform.python_version(),
                  args=vars(args), rows=rows)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)
    print(format_table(rows))
    return 0


def format_table(rows: list[dict]) -> str:
    lines = ["| S | config | kv dens. | attn dens. | pass | impl | ms | TFLOP/s | vs cuDNN (TFLOP/s) |"
             " vs cuDNN (time) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['seq_len']} | {r['config']} | | | | error: {r['error'][:60]} |"
                         " | | | |")
            continue
        lines.append(
            f"| {r['seq_len']} | {r['config']} | {r['kv_density']:.2f} | "
            f"{r['attention_density']:.2f} | {r['pass_']} | {r['impl']} | {r['ms']:.2f} | "
            f"{r['tflops']:.0f} | {r.get('tflops_ratio_vs_cudnn', float('nan')):.2f} | "
            f"{r.get('speedup_vs_cudnn', float('nan')):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
