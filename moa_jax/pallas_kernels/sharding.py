"""Attention kernels under `shard_map`: batch rows over data x fsdp, heads over `tensor`.

A Pallas call is a custom call that XLA cannot partition: handed sharded operands, it gathers
them and every device computes every head. `shard_heads` runs the kernel on each device's own
rows and heads instead. Query heads and their KV heads are split contiguously over the `tensor`
axis, so a GQA group never straddles two devices, and a head's static window and sinks travel
with it: device i runs the kernel built for heads [i H/t, (i+1) H/t), chosen by `lax.switch` on
its axis index (devices whose head slices have the same static settings share one branch, so a
uniform plan compiles one kernel).

Used by the backends (`MoAAttention(mesh=...)`); `generate(mesh=...)` hands its mesh over.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from moa_jax.pallas_kernels.caches.span import SpanKVCache
from moa_jax.pallas_kernels.dispatch import span_decode, sparse_attention

BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


def head_shards(mesh: Mesh | None, num_kv_heads: int) -> int:
    """How many ways the heads split on `mesh` (1 when `tensor` does not divide the KV heads)."""
    if mesh is None or HEAD_AXIS not in mesh.shape:
        return 1
    t = mesh.shape[HEAD_AXIS]
    return t if num_kv_heads % t == 0 else 1


def shard_heads(
    make: Callable[[int, int], tuple[Hashable, Callable[..., Any]]],
    mesh: Mesh | None,
    args: Sequence[jax.Array],
    head_axes: Sequence[int | None],
    out_head_axes: int | Sequence[int],
    num_kv_heads: int,
) -> Any:
    """Runs a per-head kernel on every device's share of batch rows and heads.

    Args:
      make: make(i, t) -> (key, fn): the kernel for head slice i of t (fn takes `args`' local
        blocks); equal keys mean equal kernels (one compiled branch).
      mesh: the device mesh; None runs make(0, 1) on the whole arrays.
      args: arrays whose axis 0 is the batch.
      head_axes: per argument, the axis of its heads (query or KV), None if it has none.
      out_head_axes: the heads axis of the output (or of each output of a tuple), batch at 0.
      num_kv_heads: KV heads of the call (the split must keep GQA groups whole).
    """
    if mesh is None or mesh.size == 1:
        return make(0, 1)[1](*args)
    t = head_shards(mesh, num_kv_heads)
    batch = args[0].shape[0]
    rows = math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)
    bspec = tuple(a for a in BATCH_AXES if a in mesh.shape) if batch % rows == 0 else None
    hspec = HEAD_AXIS if t > 1 else None

    def spec(ndim: int, head_axis: int | None) -> P:
        return P(*[bspec if d == 0 else hspec if d == head_axis else None for d in range(ndim)])

    keys, branches, index = [], [], []
    for i in range(t):
        key, fn = make(i, t)
        if key not in keys:
            keys.append(key)
            branches.append(fn)
        index.append(keys.index(key))

    def body(*local):
        if len(branches) == 1:
            return branches[0](*local)
        which = jnp.asarray(index, jnp.int32)[lax.axis_index(HEAD_AXIS)]
        return lax.switch(which, branches, *local)

    out_shape = jax.eval_shape(
        branches[0],
        *[_local_shape(x, rows if bspec else None, h, t) for x, h in zip(args, head_axes)],
    )
    if isinstance(out_shape, (tuple, list)):
        axes = (
            (out_head_axes,) * len(out_shape)
            if isinstance(out_head_axes, int)
            else tuple(out_head_axes)
        )
        out_specs = tuple(spec(len(o.shape), a) for o, a in zip(out_shape, axes))
    else:
        out_specs = spec(len(out_shape.shape), out_head_axes)
    in_specs = tuple(spec(x.ndim, h) for x, h in zip(args, head_axes))
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(
        *args
    )


def _local_shape(
    x: jax.Array, rows: int | None, head_axis: int | None, t: int
) -> jax.ShapeDtypeStruct:
    shape = list(x.shape)
    if rows:
        shape[0] //= rows
    if head_axis is not None:
        shape[head_axis] //= t
    return jax.ShapeDtypeStruct(tuple(shape), x.dtype)


def sparse_attention_on_mesh(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mesh: Mesh | None,
    *,
    windows: Sequence[int],
    sinks: Sequence[int],
    **kw: Any,
) -> jax.Array:
    """`sparse_attention` (q [B, T, H, D], k/v [B, S, Hkv, D]) with each device's rows and heads,
    each head with its own window and sinks; kw: `sparse_attention`'s other options."""
    h = q.shape[2]
    windows, sinks = tuple(windows), tuple(sinks)

    def kernel(i: int, t: int):
        heads = slice(i * h // t, (i + 1) * h // t)
        w, s = windows[heads], sinks[heads]
        return (w, s), functools.partial(sparse_attention, windows=w, sink=s, **kw)

    return shard_heads(kernel, mesh, (q, k, v), (2, 2, 2), 2, k.shape[2])


def same_kernel_on_mesh(
    fn: Callable[..., Any],
    mesh: Mesh | None,
    args: Sequence[Any],
    head_axes: Sequence[int | None],
    out_head_axes: int | Sequence[int],
    num_kv_heads: int,
) -> Any:
    """`shard_heads` for a kernel with no per-head static settings (the decode kernels)."""
    return shard_heads(lambda i, t: (None, fn), mesh, args, head_axes, out_head_axes, num_kv_heads)


def span_decode_on_mesh(
    q: jax.Array, cache: SpanKVCache, q_positions: jax.Array, mesh: Mesh | None, **kw: Any
) -> jax.Array:
    """`span_decode` (q [B, H, D], a `SpanKVCache`) with each device's rows and heads. The cache
    must be packed for the mesh's head split (a `MoASchedule` built with `shards=`); one that is
    not runs as a single call (XLA gathers its operands)."""
    sched = cache.schedule
    if mesh is None or sched.shards != head_shards(mesh, sched.num_kv_heads):
        return span_decode(q, cache, q_positions, **kw)

    def kernel(i: int, t: int):
        def run(q, k, v, pos, qp):
            return span_decode(q, cache.shard(i, k, v, pos), qp, **kw)

        return sched.shard(i), run

    return shard_heads(
        kernel,
        mesh,
        (q, cache.k, cache.v, cache.pos, q_positions),
        (1, 1, 1, 1, None),
        1,
        sched.num_kv_heads,
    )
