"""What the benchmarks read about device memory: the allocator's statistics and the measured
copy bandwidth (the floor a memory-bound step is compared with)."""

from __future__ import annotations

import time

GIB = float(1 << 30)


def memory_stats(devices=None) -> dict:
    """The allocator's statistics; over several devices the largest use and peak and the
    smallest limit (what bounds a program sharded over all of them)."""
    # jax loads on first use: the bench CLIs import this module before parsing flags (--help)
    import jax

    out: dict = {}
    for d in devices if devices is not None else jax.devices()[:1]:
        try:
            st = d.memory_stats() or {}
        except Exception:  # noqa: BLE001
            st = {}
        for k in ("bytes_in_use", "peak_bytes_in_use"):
            if k in st:
                out[k] = max(out.get(k, 0), st[k])
        if st.get("bytes_limit"):
            out["bytes_limit"] = min(out.get("bytes_limit", st["bytes_limit"]), st["bytes_limit"])
    return out


def copy_bandwidth(nbytes: int, iters: int = 10, warmup: int = 3) -> float:
    """Bytes per second of `x + 1` over a bf16 array of nbytes (read + write counted), from the
    fastest of `iters` calls after `warmup`: single calls vary by up to 30% on a GPU whose
    clocks are still rising, and the floor should use what the memory can do."""
    # jax loads on first use: the bench CLIs import this module before parsing flags (--help)
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda a: a + jnp.bfloat16(1))
    for _ in range(warmup):
        jax.block_until_ready(f(x))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x))
        times.append(time.perf_counter() - t0)
    del x
    return 2 * (nbytes // 2) * 2 / min(times)
