"""What the block-sparse flash kernels share around their Pallas calls: padding, the custom VJP
(the forward saves out and the log-sum-exp; the backward recomputes the probabilities from them)
and the backward's per-row delta."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


def pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
    """x zero-padded at the end of `axis` to `size`."""
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def pad_inputs(
    q: jax.Array, k: jax.Array, v: jax.Array, kv_lengths: jax.Array | None, t: int, s: int, d: int
):
    """(q [B, t, H, d], k, v [B, s, Hkv, d], kv_lengths int32 [B]) zero-padded; kv_lengths
    defaults to the unpadded key length."""
    kvl = (
        jnp.full((q.shape[0],), k.shape[1], jnp.int32)
        if kv_lengths is None
        else jnp.asarray(kv_lengths, jnp.int32)
    )
    return (
        pad_to(pad_to(q, 1, t), 3, d),
        pad_to(pad_to(k, 1, s), 3, d),
        pad_to(pad_to(v, 1, s), 3, d),
        kvl,
    )


def backward_delta(
    out: jax.Array, do: jax.Array, lse: jax.Array, dlse: jax.Array | None
) -> jax.Array:
    """delta [B, H, T] float32 = rowsum(out * dO) - dlse: dS = P * (dP - delta).

    out, do [B, T, H, D]; lse, dlse [B, H, T]. Rows that see no key have a constant lse (-inf):
    their lse cotangent is dropped.
    """
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))
    if dlse is not None:
        delta = delta - jnp.where(jnp.isfinite(lse), dlse.astype(jnp.float32), 0.0)
    return delta


def flash_attention(fwd_call: Callable, bwd_call: Callable) -> Callable:
    """attention(q, k, v, kv_lengths, cfg) -> (out, lse), differentiable in q, k, v.

    fwd_call(cfg, q, k, v, kv_lengths) -> (out, lse);
    bwd_call(cfg, q, k, v, kv_lengths, out, lse, do, dlse) -> (dq, dk, dv). `cfg` is static.
    """

    def attention(q, k, v, kv_lengths, cfg):
        return fwd_call(cfg, q, k, v, kv_lengths)

    def fwd(q, k, v, kv_lengths, cfg):
        out, lse = fwd_call(cfg, q, k, v, kv_lengths)
        return (out, lse), (q, k, v, kv_lengths, out, lse)

    def bwd(cfg, res, cts):
        q, k, v, kv_lengths, out, lse = res
        do, dlse = cts
        dq, dk, dv = bwd_call(cfg, q, k, v, kv_lengths, out, lse, do.astype(q.dtype), dlse)
        return dq, dk, dv, None

    attention = jax.custom_vjp(attention, nondiff_argnums=(4,))
    attention.defvjp(fwd, bwd)
    return attention


class BackwardRefs(NamedTuple):
    """The operands every backward kernel (Triton and Mosaic GPU, dq and dk/dv) takes first, in
    this order: the scalar tables of its pass (`block_tables.kernel_tables`: work order, windows,
    sinks, blocks, partial counts, counts), the kv lengths, then q, k, v, dO, lse and delta."""

    order: Any
    win: Any
    sink: Any
    blocks: Any
    npart: Any
    num: Any
    kvlen: Any
    q: Any
    k: Any
    v: Any
    do: Any
    lse: Any
    delta: Any

    @classmethod
    def split(cls, refs: tuple) -> tuple[BackwardRefs, tuple]:
        """(the shared operands, the kernel's own refs after them: outputs and scratch)."""
        n = len(cls._fields)
        return cls(*refs[:n]), tuple(refs[n:])
