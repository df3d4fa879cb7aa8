"""The argument checks of the kernel operations (`dispatch.py`) and the jnp oracle
(`reference.mha_reference`): shapes, dtypes and static values only, so under `jit` they run
once, when the function is traced. An array that does not fit raises `ArrayError`, an option
`ConfigError` (`moa_jax.domains.checked`); the message names the argument and, for arrays, the
layout."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from moa_jax.domains import Int, checked
from moa_jax.errors import ArrayError, ConfigError

PREFILL_LAYOUT = "q [B, T, H, D], k and v [B, S, Hkv, D]"
SPAN_LAYOUT = "q [B, H, D], cache.k and cache.v [B, M, D]"
HEAD_MAJOR_LAYOUT = "q [B, H, D], k and v [B, Hkv, N, D]"


def array_shape(
    op: str, name: str, x: Any, ndim: int, layout: str, nonempty: bool = True
) -> tuple[int, ...]:
    """x's shape, checked to be an array of `ndim` axes (`nonempty`: none of size 0)."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ArrayError(f"{op}: {name} must be an array, got {type(x).__name__} ({layout})")
    shape = tuple(x.shape)
    if len(shape) != ndim or (nonempty and 0 in shape):
        empty = " with no empty axis" if nonempty else ""
        raise ArrayError(
            f"{op}: {name} must be a {ndim}-d array{empty}, got shape {shape} ({layout})"
        )
    return shape


def same_size(op: str, name: str, what: str, got: Any, ref: str, want: Any, layout: str) -> None:
    if got != want:
        raise ArrayError(f"{op}: {name} has {what} {got} but {ref} has {want} ({layout})")


def check_qkv(
    op: str, q: Any, k: Any, v: Any, layout: str, *, decode: bool = False, nonempty: bool = True
) -> tuple[int, ...]:
    """The shapes of q [B, T, H, D] and k, v [B, S, Hkv, D] (`decode`: q [B, H, D] and k, v
    [B, Hkv, N, D]): k and v of one shape, q's batch and head_dim, H a multiple of Hkv.
    Returns q's shape followed by k's."""
    qshape = array_shape(op, "q", q, 3 if decode else 4, layout, nonempty)
    kshape = array_shape(op, "k", k, 4, layout, nonempty)
    vshape = array_shape(op, "v", v, 4, layout, nonempty)
    if vshape != kshape:
        raise ArrayError(f"{op}: v has shape {vshape} but k has {kshape} ({layout})")
    same_size(op, "k", "batch", kshape[0], "q", qshape[0], layout)
    same_size(op, "k", "head_dim", kshape[3], "q", qshape[-1], layout)
    h, hkv = qshape[-2], kshape[1 if decode else 2]
    if hkv == 0 or h % hkv:
        raise ArrayError(
            f"{op}: k has {hkv} KV heads, which do not divide the {h} query heads of q (query "
            f"heads must be a multiple of KV heads; {layout})"
        )
    return qshape + kshape


def one_float_dtype(op: str, **arrays: Any) -> None:
    """The arrays hold floats of one dtype (the kernels read q, k and v as they are)."""
    (first, x0), *rest = arrays.items()
    for name, x in arrays.items():
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ArrayError(
                f"{op}: {name} must have a floating dtype (float32, bfloat16, ...), got {x.dtype}"
            )
    for name, x in rest:
        if x.dtype != x0.dtype:
            raise ArrayError(
                f"{op}: {name} is {x.dtype} but {first} is {x0.dtype} "
                f"({', '.join(arrays)} take one dtype)"
            )


def per_head(
    op: str, name: str, noun: str, x: Any, heads: int, at_least: int, one_for_all: bool
) -> tuple[int, ...]:
    """`x` as one static int >= at_least per query head (`one_for_all`: or one int for every
    head), or ConfigError naming `name` (`noun`: the plural for the message)."""
    scalar = isinstance(x, (str, bytes)) or getattr(x, "ndim", 1) == 0 or not hasattr(x, "__iter__")
    if scalar and one_for_all:
        return (checked(f"{op}: {name}", x, Int(at_least)),) * heads
    if scalar:
        raise ConfigError(
            f"{op}: {name} must be a sequence of one int per query head ({heads}), got "
            f"{x!r:.60} ({type(x).__name__})"
        )
    values = list(x)
    if len(values) != heads:
        raise ConfigError(
            f"{op}: {name} gives {len(values)} {noun} for {heads} query heads; it takes one per "
            "query head"
        )
    return tuple(checked(f"{op}: {name}[{i}]", w, Int(at_least)) for i, w in enumerate(values))
