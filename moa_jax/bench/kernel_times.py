"""Device time per kernel of one call, from a `jax.profiler` trace.

Used by the benchmarks (`--kernel-profile`) to say where a step's time goes: the call runs once
under `jax.profiler.trace`, the trace is read back with `jax.profiler.ProfileData`, and the
events of the device planes (`/device:GPU:0`, `/device:TPU:0`, ...; on the CPU backend, the XLA
client's worker threads of the host plane) are summed by name.
"""

from __future__ import annotations

import collections
import glob
import os
import tempfile
from collections.abc import Callable
from typing import Any

import jax
from jax.profiler import ProfileData

_CPU_THREADS = ("tf_XLAPjRtCpuClient", "tf_XLAEigen")
_SKIP = ("ThreadpoolListener", "SlinkyThreadPool", "ThunkExecutor", "end: ")


def _device_events(path: str):
    """(name, duration ns) of every kernel event in the trace file."""
    data = ProfileData.from_file(path)
    device = [p for p in data.planes if p.name.startswith("/device:")]
    if device:
        for plane in device:
            for line in plane.lines:
                # Per-stream lines hold the kernels; the others repeat them per XLA op/module.
                if not line.name.startswith("Stream"):
                    continue
                for ev in line.events:
                    yield ev.name, ev.duration_ns
        return
    for plane in data.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if line.name.startswith(_CPU_THREADS):
                for ev in line.events:
                    if not ev.name.startswith(_SKIP):
                        yield ev.name, ev.duration_ns


def kernel_times(fn: Callable[[], Any], *, per: int = 1, top: int = 30) -> dict:
    """Runs `fn()` once under the profiler and sums device time by kernel name.

    Args:
      fn: a thunk that launches the work; its result is waited for.
      per: divide times and counts by this (e.g. the decode steps in the call).
      top: keep this many kernels, the longest first.
    Returns:
      {"busy_us": total kernel time / per, "kernels": [{"name", "us", "calls"}, ...] (/ per),
       "other_us": the time of the kernels left out / per}.
    """
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            jax.block_until_ready(fn())
        files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        if not files:
            raise RuntimeError(f"the profiler wrote no trace under {d}")
        total: dict[str, float] = collections.defaultdict(float)
        calls: dict[str, int] = collections.Counter()
        for path in files:
            for name, ns in _device_events(path):
                total[name] += ns
                calls[name] += 1
    ranked = sorted(total, key=total.get, reverse=True)
    busy = sum(total.values()) / 1e3 / per
    kept = [dict(name=n, us=total[n] / 1e3 / per, calls=calls[n] / per) for n in ranked[:top]]
    return dict(busy_us=busy, kernels=kept, other_us=busy - sum(k["us"] for k in kept))


def format_kernel_times(prof: dict, width: int = 60) -> str:
    """The profile as text lines: microseconds, calls, name."""
    lines = [f"  device busy {prof['busy_us']:.1f} us"]
    lines += [
        f"  {k['us']:9.1f} us {k['calls']:7.1f}x  {k['name'][:width]}" for k in prof["kernels"]
    ]
    if prof["other_us"] > 0:
        lines.append(f"  {prof['other_us']:9.1f} us           (the rest)")
    return "\n".join(lines)
