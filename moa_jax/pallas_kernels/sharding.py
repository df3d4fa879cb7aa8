"""Attention kernels under `shard_map`: batch rows over data x fsdp, heads over `tensor`.

A Pallas call is a custom call that XLA cannot partition: handed sharded operands, it gathers
them and every device computes every head. `shard_heads` runs the kernel on each device's own
rows and heads instead. Query heads and their KV heads are split contiguously over the `tensor`
axis, so a GQA group never straddles two devices, and a head's static window and sinks travel
with it: device i runs the kernel built for heads [i H/t, (i+1) H/t), chosen by `lax.switch` on
its axis index (devices whose head slices have the same static settings share one branch, so a
uniform plan compiles one kernel). A kernel states where its heads are with a `HeadSharding`;
`shard_heads` turns that into the `shard_map` specs, so any per-head kernel runs on a mesh.

Used by the backends (`MoAAttention(mesh=...)`); `generate(mesh=...)` hands its mesh over.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from moa_jax.pallas_kernels.caches.span import SpanKVCache
from moa_jax.pallas_kernels.dispatch import check_prefill_args, span_decode, sparse_attention

BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


def head_shards(mesh: Mesh | None, num_kv_heads: int) -> int:
    """How many ways the heads split on `mesh` (1 when `tensor` does not divide the KV heads)."""
    if mesh is None or HEAD_AXIS not in mesh.shape:
        return 1
    t = mesh.shape[HEAD_AXIS]
    return t if num_kv_heads % t == 0 else 1


@dataclasses.dataclass(frozen=True)
class HeadSharding:
    """Where the heads are in a per-head kernel's operands and outputs (batch rows at axis 0),
    the static information `shard_heads` needs to split one call over a mesh (as splash
    attention's kernel carries its sharding spec and its caller shard_maps it).

    Attributes:
      in_head_axes: per operand, the axis of its heads (query or KV), None if it has none.
      out_head_axes: the heads axis of the output, or of each output of a tuple.
      num_kv_heads: KV heads of the call (the split must keep GQA groups whole).
    """

    in_head_axes: tuple[int | None, ...]
    out_head_axes: int | tuple[int, ...]
    num_kv_heads: int

    def shards(self, mesh: Mesh | None) -> int:
        """How many ways the heads split on `mesh`."""
        return head_shards(mesh, self.num_kv_heads)

    def _batch_spec(self, mesh: Mesh, batch: int) -> tuple[str, ...] | None:
        names = tuple(a for a in BATCH_AXES if a in mesh.shape)
        rows = math.prod(mesh.shape[a] for a in names)
        return names if batch % rows == 0 else None

    def _spec(self, mesh: Mesh, batch: int, ndim: int, head_axis: int | None) -> P:
        bspec = self._batch_spec(mesh, batch)
        hspec = HEAD_AXIS if self.shards(mesh) > 1 else None
        return P(*[bspec if d == 0 else hspec if d == head_axis else None for d in range(ndim)])

    def in_specs(self, mesh: Mesh, args: Sequence[jax.Array]) -> tuple[P, ...]:
        batch = args[0].shape[0]
        return tuple(self._spec(mesh, batch, x.ndim, h) for x, h in zip(args, self.in_head_axes))

    def out_specs(self, mesh: Mesh, batch: int, out_shape: Any) -> P | tuple[P, ...]:
        if not isinstance(out_shape, (tuple, list)):
            return self._spec(mesh, batch, len(out_shape.shape), self.out_head_axes)
        axes = self.out_head_axes
        axes = (axes,) * len(out_shape) if isinstance(axes, int) else tuple(axes)
        return tuple(self._spec(mesh, batch, len(o.shape), a) for o, a in zip(out_shape, axes))

    def local_shapes(self, mesh: Mesh, args: Sequence[jax.Array]) -> list[jax.ShapeDtypeStruct]:
        """Each operand's per-device block."""
        batch = args[0].shape[0]
        rows = math.prod(mesh.shape[a] for a in self._batch_spec(mesh, batch) or ())
        t = self.shards(mesh)
        out = []
        for x, h in zip(args, self.in_head_axes):
            shape = list(x.shape)
            shape[0] //= rows
            if h is not None:
                shape[h] //= t
            out.append(jax.ShapeDtypeStruct(tuple(shape), x.dtype))
        return out


def shard_heads(
    make: Callable[[int, int], tuple[Hashable, Callable[..., Any]]],
    mesh: Mesh | None,
    args: Sequence[jax.Array],
    sharding: HeadSharding,
) -> Any:
    """Runs a per-head kernel on every device's share of batch rows and heads.

    Args:
      make: make(i, t) -> (key, fn): the kernel for head slice i of t (fn takes `args`' local
        blocks); equal keys mean equal kernels (one compiled branch).
      mesh: the device mesh; None runs make(0, 1) on the whole arrays.
      args: arrays whose axis 0 is the batch.
      sharding: where the kernel's heads are (`HeadSharding`).
    """
    if mesh is None or mesh.size == 1:
        return make(0, 1)[1](*args)
    t = sharding.shards(mesh)
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

    out_shape = jax.eval_shape(branches[0], *sharding.local_shapes(mesh, args))
    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=sharding.in_specs(mesh, args),
        out_specs=sharding.out_specs(mesh, args[0].shape[0], out_shape),
        check_vma=False,
    )(*args)


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
    # the whole arrays and every head's window and sinks, before they are split per device
    windows, sinks, _ = check_prefill_args(
        "sparse_attention_on_mesh", q, k, v, windows=windows, sink=sinks, **kw
    )

    def kernel(i: int, t: int):
        heads = slice(i * h // t, (i + 1) * h // t)
        w, s = windows[heads], sinks[heads]
        return (w, s), functools.partial(sparse_attention, windows=w, sink=s, **kw)

    return shard_heads(kernel, mesh, (q, k, v), HeadSharding((2, 2, 2), 2, k.shape[2]))


def same_kernel_on_mesh(
    fn: Callable[..., Any],
    mesh: Mesh | None,
    args: Sequence[Any],
    head_axes: Sequence[int | None],
    out_head_axes: int | Sequence[int],
    num_kv_heads: int,
) -> Any:
    """`shard_heads` for a kernel with no per-head static settings (the decode kernels)."""
    sharding = HeadSharding(tuple(head_axes), out_head_axes, num_kv_heads)
    return shard_heads(lambda i, t: (None, fn), mesh, args, sharding)


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
        HeadSharding((1, 1, 1, 1, None), 1, sched.num_kv_heads),
    )
