"""Device meshes and logical-axis sharding for params, activations and KV caches.

One `MeshConfig` (axes `data`, `fsdp`, `tensor`) drives every job. Arrays are described by logical
axis names (`batch`, `embed`, `q_heads`, ...); `LOGICAL_RULES` maps them to mesh axes, as in
MaxText. A dimension that a mesh axis does not divide is replicated instead (e.g. SmolLM2's 3 KV
heads on a 2-way `tensor` axis): correct, only less memory-efficient.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: Mapping[str, Any] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "vocab": "tensor",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "seq": None,
    "kv_slots": "tensor",  # a head-sharded MoA span cache's slots (MoASchedule.shards)
    "head_dim": None,
    "activation_embed": None,  # hidden states: rows split, features whole (Megatron style)
    "activation_vocab": "tensor",
    "norm": None,
}

# Parameter name (last path entries) -> logical axes of the array.
_PARAM_AXES: Sequence[tuple[str, tuple[str | None, ...]]] = (
    (r"embed_tokens\.embedding$", ("vocab", "embed")),
    (r"q_proj\.kernel$", ("embed", "q_heads")),
    (r"[kv]_proj\.kernel$", ("embed", "kv_heads")),
    (r"o_proj\.kernel$", ("q_heads", "embed")),
    (r"q_proj\.bias$", ("q_heads",)),
    (r"[kv]_proj\.bias$", ("kv_heads",)),
    (r"o_proj\.bias$", ("norm",)),
    (r"(gate|up)_proj\.kernel$", ("embed", "mlp")),
    (r"(gate|up)_proj\.bias$", ("mlp",)),
    (r"down_proj\.kernel$", ("mlp", "embed")),
    (r"down_proj\.bias$", ("norm",)),
    (r"(layernorm|norm)\.weight$", ("norm",)),
    (r"lm_head\.kernel$", ("embed", "vocab")),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape. -1 on one axis means 'all remaining devices'."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    @classmethod
    def parse(cls, text: str) -> MeshConfig:
        """'DATA,FSDP,TENSOR' (command lines), e.g. '2,2,2' or '-1,1,2'."""
        try:
            data, fsdp, tensor = (int(x) for x in text.split(","))
        except ValueError:
            raise ValueError(f"a mesh is DATA,FSDP,TENSOR (three integers), got {text!r}") from None
        return cls(data, fsdp, tensor)

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        dims = [self.data, self.fsdp, self.tensor]
        if sum(d == -1 for d in dims) > 1:
            raise ValueError(f"at most one mesh axis may be -1, got {self}")
        if any(d == 0 or d < -1 for d in dims):
            raise ValueError(f"mesh axis sizes must be positive or -1, got {self}")
        known = math.prod(d for d in dims if d != -1)
        if -1 in dims:
            if num_devices % known:
                raise ValueError(f"{num_devices} devices do not divide into mesh {self}")
            dims[dims.index(-1)] = num_devices // known
        if math.prod(dims) != num_devices:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, dims))} needs {math.prod(dims)} devices, "
                f"{num_devices} are available"
            )
        return tuple(dims)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Sequence[Any] | None = None) -> Mesh:
    """A `Mesh` with axes (data, fsdp, tensor) over `devices` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = cfg.shape(len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def mesh_context(mesh: Mesh | None):
    """The mesh as jax's context mesh (`jax.set_mesh`) while tracing and running, so that
    `constrain` inside the model sees it; a no-op context for None."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def constrain(
    x: jax.Array, axes: Sequence[str | None], rules: Mapping[str, Any] = LOGICAL_RULES
) -> jax.Array:
    """A sharding constraint on an activation by logical axes, on the context mesh
    (`mesh_context`); no-op without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh, rules))


def logical_to_spec(
    axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Mapping[str, Any] = LOGICAL_RULES,
) -> P:
    """PartitionSpec for an array with logical `axes`; undivisible dims are replicated."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match array shape {shape}")
    spec, used = [], set()
    for name, dim in zip(axes, shape):
        mesh_axes = rules.get(name) if name is not None else None
        if mesh_axes is None:
            spec.append(None)
            continue
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in mesh_axes)
        if not mesh_axes or dim % size:
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*spec)


def param_logical_axes(path: Sequence[Any]) -> tuple[str | None, ...]:
    """Logical axes of a model parameter from its nnx state path (every family names its
    parameters alike)."""
    name = ".".join(str(p) for p in path)
    for pattern, axes in _PARAM_AXES:
        if re.search(pattern, name):
            return axes
    raise KeyError(f"no sharding rule for parameter {name!r}")


def param_shardings(state: nnx.State, mesh: Mesh, rules: Mapping[str, Any] = LOGICAL_RULES) -> Any:
    """A pytree like `state` with a NamedSharding per parameter."""

    def one(path, leaf):
        keys = tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)
        keys = tuple(k for k in keys if k != "value")
        spec = logical_to_spec(param_logical_axes(keys), leaf.shape, mesh, rules)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, state)


def batch_sharding(
    mesh: Mesh, shape: Sequence[int], rules: Mapping[str, Any] = LOGICAL_RULES
) -> NamedSharding:
    """Sharding for a [B, ...] activation (tokens, lengths): batch over data x fsdp."""
    axes = ("batch",) + (None,) * (len(shape) - 1)
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def cache_shardings(cache: Any, mesh: Mesh, rules: Mapping[str, Any] = LOGICAL_RULES) -> Any:
    """Shardings for a tuple of per-layer caches; each cache class names its axes in
    `logical_axes()` (a pytree like itself with tuples of logical names as leaves)."""

    def one_layer(layer_cache):
        axes = layer_cache.logical_axes()
        return jax.tree_util.tree_map(
            lambda leaf, ax: NamedSharding(mesh, logical_to_spec(ax, leaf.shape, mesh, rules)),
            layer_cache,
            axes,
            is_leaf=lambda x: isinstance(x, tuple),
        )

    return tuple(one_layer(c) for c in cache)


def initialize_distributed() -> bool:
    """Joins a multi-process run (`jax.distributed.initialize`) when the launch says so.

    Explicit: `JAX_COORDINATOR_ADDRESS` (host:port of process 0), `JAX_NUM_PROCESSES` and
    `JAX_PROCESS_ID`, the same on every host but the id. Otherwise jax's own cluster detection
    (TPU pod slices, SLURM, Open MPI) when one of those launched us. A plain single-process run
    does nothing. Returns whether a distributed run was joined. Call it before anything touches
    a device.
    """
    addr = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if addr:
        n, pid = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
        if n is None or pid is None:
            raise ValueError(
                "JAX_COORDINATOR_ADDRESS is set but JAX_NUM_PROCESSES and "
                "JAX_PROCESS_ID are not: set all three on every process"
            )
        jax.distributed.initialize(addr, num_processes=int(n), process_id=int(pid))
        return True
    if (
        os.environ.get("SLURM_NTASKS", "1") != "1"
        or os.environ.get("OMPI_COMM_WORLD_SIZE", "1") != "1"
        or os.environ.get("TPU_WORKER_HOSTNAMES", "localhost").count(",") > 0
    ):
        jax.distributed.initialize()
        return True
    return False
