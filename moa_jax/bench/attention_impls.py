"""The implementations the prefill benchmark times (`moa_jax.bench.attention`): ours, cuDNN
and tokamax as `(q, k, v) -> out` functions, and the Mosaic GPU kernels timed alone with
their in-kernel profiler traces summarised."""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from moa_jax.bench.head_configs import kept_entries


def median_ms(fn: Callable[[], Any], warmup: int, iters: int) -> float:
    """Median milliseconds of `fn()` (blocked until ready) over `iters` calls after `warmup`."""
    # jax loads on first use: the bench CLIs import this module before parsing flags (--help)
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def moa_impl(kernel: str, windows, sinks, args):
    """Our sparse prefill (`kernel` 'gpu': Triton, 'mgpu': Mosaic GPU) with the block and
    pipeline flags of the benchmark's config."""
    # jax loads on first use: the bench CLIs import this module before parsing flags (--help)
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


def cudnn_impl(windows, s: int, hkv: int):
    """One cuDNN call per distinct window; GQA kept when a window covers whole KV groups."""
    # jax loads on first use: the bench CLIs import this module before parsing flags (--help)
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

    kept = sum(len(idx) * kept_entries((w,), (0,), s) for w, idx, _ in parts)
    return attn, kept, f"cudnn_{len(parts)}call" + ("s" if len(parts) > 1 else "")


def tokamax_impl(windows, s: int):
    """tokamax's Mosaic GPU flash attention with a per-head k_start (windows; no sinks)."""
    # on call: tokamax is not a dependency (installed by hand for this comparison)
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

    kept = sum(kept_entries((w,), (0,), s) for w in windows)
    return attn, kept, "tokamax_mosaic_gpu"


def fwd_bwd(attn: Callable):
    """`attn`'s forward and backward (the VJP of `do`) as one jitted call."""
    # jax loads on first use: the bench CLIs import this module before parsing flags (--help)
    import jax

    def run(q, k, v, do):
        out, vjp = jax.vjp(attn, q, k, v)
        return vjp(do)

    return jax.jit(run)


def mgpu_breakdown(q, k, v, do, windows, sinks, kept: int, args) -> dict:
    """Each Mosaic GPU kernel timed alone: ms and TFLOP/s on its own matmul work (forward
    2 matmuls = 4 D kept, dq 3 = 6 D kept, dk/dv 4 = 8 D kept). With --profile-dir, each kernel
    also runs once under Mosaic GPU's in-kernel profiler and its trace is summarised
    (`trace_summary`)."""
    # jax loads on first use: the bench CLIs import this module before parsing flags (--help)
    import jax

    from moa_jax.pallas_kernels.prefill.mosaic_gpu import kernel_stages

    opts = {} if args.mgpu_block_k is None else dict(block_k=args.mgpu_block_k)
    d, b = q.shape[-1], q.shape[0]
    out = {}
    for name, fn in kernel_stages(q, k, v, do, windows=windows, sinks=sinks, **opts).items():
        ms = median_ms(fn, args.warmup, args.iters)
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
