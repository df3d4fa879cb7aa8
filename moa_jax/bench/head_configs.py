"""The prefill and decode benchmarks' head configurations: named per-head (windows, sinks)
(see `moa_jax.bench.attention` for the names), their KV density and kept mask entries."""

from __future__ import annotations

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
    """Mean over heads of the share of S keys a head keeps (sinks plus window)."""
    return float(
        np.mean([min(s, min(w, s) + min(sk, s - min(w, s))) for w, sk in zip(windows, sinks)]) / s
    )


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


def kept_entries(windows, sinks, s: int) -> int:
    """Entries of the S x S causal mask that the heads keep, summed over heads."""
    # the kernels load jax: the bench CLIs import this module before parsing flags (--help)
    from moa_jax.pallas_kernels.masks import MaskSpec

    return MaskSpec(windows, sinks, s, s).kept_entries()
