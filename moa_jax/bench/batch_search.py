"""Finding the batches a method fits: batches in order until one runs out of memory, a
bisection of the boundary, and the largest batch estimated from the caches' shapes."""

from __future__ import annotations

import gc
from collections.abc import Callable

from moa_jax.bench.decode_config import DecodeConfig
from moa_jax.bench.decode_variants import Variant, make_backend
from moa_jax.bench.device_memory import GIB, memory_stats
from moa_jax.errors import UserError


def is_oom(e: BaseException) -> bool:
    """Whether an exception is the device (or XLA's estimate) running out of memory."""
    s = f"{type(e).__name__}: {e}"
    return any(
        x in s
        for x in (
            "RESOURCE_EXHAUSTED",
            "Out of memory",
            "out of memory",
            "OutOfMemory",
            "Failed to allocate",
            "OOM",
        )
    )


def guard(fn: Callable[[], dict], base: dict) -> dict:
    """`fn()`'s row, or `base` with status 'oom' or 'error' and the error's first 400
    characters if it raises; a user's mistake (`UserError`: a bad option, a plan that does not
    fit) is not a row, it stops the command."""
    try:
        return fn()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        status = "oom" if is_oom(e) else "error"
        return dict(base, status=status, error=f"{type(e).__name__}: {str(e)[:400]}")
    finally:
        gc.collect()


def sweep(
    run_one: Callable[[int], dict],
    batches: list,
    refine: bool,
    log: Callable[[dict], None],
    largest: Callable[[], int] | None = None,
    multiple: int = 1,
) -> list[dict]:
    """Runs batches in order until one runs out of memory; optionally bisects the boundary.

    An entry "max" runs `largest()` (the estimated largest batch; skipped when not above the
    last batch that fit) and, while that runs out of memory, up to 4 batches 5% smaller each
    (rounded down to a `multiple`).
    """
    rows, fit, oom = [], None, None

    def go(b):
        row = run_one(b)
        rows.append(row)
        log(row)
        return row["status"]

    for b in batches:
        if b == "max":
            if largest is None:
                raise ValueError("batch 'max' needs a memory estimate (a GPU or TPU, not hf)")
            b = largest()
            if fit is not None and b <= fit:
                continue
            status = go(b)
            for _ in range(4):
                if status != "oom" or b <= 1 or (fit is not None and b <= fit + 1):
                    break
                smaller = max(1, min(b - 1, int(b * 0.95)))
                smaller = max(multiple, smaller - smaller % multiple)
                if smaller >= b:
                    break
                oom, b = b, smaller
                status = go(b)
        else:
            status = go(b)
        if status == "ok":
            fit = b
        else:
            if status == "oom":
                oom = b
            break
    if refine and fit is not None and oom is not None:
        lo, hi = fit, oom
        while hi - lo > 1:
            mid = (lo + hi) // 2
            status = go(mid)
            if status == "ok":
                lo = mid
            elif status == "oom":
                hi = mid
            else:
                break
    return rows


def largest_batch(
    variant: Variant,
    cfg,
    context: int,
    config: DecodeConfig,
    stats: dict | None = None,
    mesh=None,
) -> int:
    """Largest batch whose caches (plus one layer's copy while they are filled, and 1 GiB for
    the loop's temporaries) fit in the device memory not yet in use; on `mesh` the caches
    spread over every device and the batch is a multiple of the data x fsdp size."""
    # Imported here: `moa_jax.bench.decode` imports this module at its top, and its command line
    # (--help, the config checks) runs without loading JAX.
    import jax
    import jax.numpy as jnp

    devices = None if mesh is None else list(mesh.devices.flat)
    st = memory_stats(devices) if stats is None else stats
    if not st.get("bytes_limit"):
        raise RuntimeError("batch 'max' needs a device that reports its memory limit")
    cache_len = config.cache_len(context)
    attention = make_backend(variant, cfg, config, cache_len)

    def nbytes(b):
        shapes = jax.eval_shape(lambda: attention.init_cache(cfg, b, cache_len, jnp.bfloat16))
        return sum(c.nbytes for c in shapes)

    per_row = (nbytes(2) - nbytes(1)) * (1 + 1 / cfg.num_layers)
    free = st["bytes_limit"] - st.get("bytes_in_use", 0) - GIB
    if mesh is None:
        return max(1, int(free // per_row))
    rows = batch_multiple(mesh)
    b = int(free * mesh.devices.size // per_row)
    return max(rows, b - b % rows)


def batch_multiple(mesh) -> int:
    """Batches on `mesh` are multiples of this (rows split over data x fsdp)."""
    return 1 if mesh is None else int(mesh.shape["data"] * mesh.shape["fsdp"])
