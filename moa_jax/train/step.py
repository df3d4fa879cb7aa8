"""The jitted training step: summed next-token loss, gradient accumulation over micro-batches
in a `lax.scan`, the optimizer update, and the shardings of its inputs and outputs.

Compiled steps are cached across `train` calls in one process: the same model, attention,
optimizer settings, mesh and batch shape reuse the compiled step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moa_jax.models.attention import Attention
from moa_jax.parallel import logical_to_spec
from moa_jax.train.config import TrainConfig
from moa_jax.train.data import Batch
from moa_jax.train.optimizer import make_optimizer, optimizer_key

BATCH_KEYS = ("inputs", "targets", "positions", "loss_mask")

_JIT_CACHE: dict[Any, Any] = {}


def loss_sums(
    graphdef: nnx.GraphDef,
    params: Any,
    batch: dict[str, jax.Array],
    attention: Attention,
    tail: int = 0,
    remat: bool = False,
) -> dict[str, jax.Array]:
    """Summed next-token NLL and token counts of a batch ([B, T] arrays); `tail` > 0 also sums
    over the last `tail` positions only; `remat` recomputes layers in the backward pass."""
    model = nnx.merge(graphdef, params)
    logits, _ = model(
        batch["inputs"], batch["positions"], None, attention, mode="stateless", remat=remat
    )
    logz = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    nll = (logz - tgt) * batch["loss_mask"]
    out = {"nll": jnp.sum(nll), "tokens": jnp.sum(batch["loss_mask"])}
    if tail:
        out["tail_nll"] = jnp.sum(nll[:, -tail:])
        out["tail_tokens"] = jnp.sum(batch["loss_mask"][:, -tail:])
    return out


def train_step_fn(
    graphdef: nnx.GraphDef,
    attention: Attention,
    optimizer: optax.GradientTransformation,
    remat: bool = False,
):
    """`step(params, opt_state, rng, batch) -> (params, opt_state, rng, metrics)` (not jitted).

    The batch arrays are [grad_accum, micro_batch, T]; the loss is normalised by the token count
    of the whole batch, so accumulation equals one bigger batch. metrics (scalars): loss,
    grad_norm, tokens, weights_finite (whether every updated parameter is finite: a step can
    turn finite weights into inf / NaN with a finite loss and gradient).
    """

    def step(params, opt_state, rng, batch):
        def micro(acc, mb):
            def f(p):
                s = loss_sums(graphdef, p, mb, attention, remat=remat)
                return s["nll"], s["tokens"]

            (nll, n), g = jax.value_and_grad(f, has_aux=True)(params)
            g_acc, nll_acc, n_acc = acc
            return (jax.tree.map(jnp.add, g_acc, g), nll_acc + nll, n_acc + n), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (g, nll, n), _ = jax.lax.scan(micro, (zeros, jnp.float32(0), jnp.float32(0)), batch)
        n = jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda x: x / n, g)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        rng, _ = jax.random.split(rng)
        metrics = {
            "loss": nll / n,
            "grad_norm": grad_norm,
            "tokens": n,
            "weights_finite": all_finite(params),
        }
        return params, opt_state, rng, metrics

    return step


def all_finite(tree: Any) -> jax.Array:
    """A bool scalar: every element of every array of `tree` is finite."""
    return jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]).all()


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def opt_state_shardings(opt_state: Any, params: Any, p_sh: Any, mesh: Mesh) -> Any:
    """Shardings of an optax state: every sub-tree shaped like the params (AdamW's moments) gets
    the params' shardings, everything else (step counts) is replicated."""
    ptree = jax.tree.structure(params)
    rep = replicated(mesh)

    def is_param_tree(x):
        return jax.tree.structure(x) == ptree

    return jax.tree.map(
        lambda x: p_sh if is_param_tree(x) else rep, opt_state, is_leaf=is_param_tree
    )


def batch_shardings(mesh: Mesh, shape: Sequence[int], lead: int = 0) -> NamedSharding:
    """Sharding of a batch array whose axis `lead` is the batch (over data x fsdp)."""
    axes = [None] * len(shape)
    axes[lead] = "batch"
    return NamedSharding(mesh, logical_to_spec(tuple(axes), tuple(shape), mesh))


def put_batch(batch: Batch, mesh: Mesh, lead: int) -> dict[str, jax.Array]:
    """The batch's arrays on the mesh, axis `lead` sharded over data x fsdp."""
    d = batch.as_dict()
    sh = batch_shardings(mesh, d["inputs"].shape, lead)
    return {k: jax.device_put(v, sh) for k, v in d.items()}


def get_train_step(
    graphdef: nnx.GraphDef,
    attention: Attention,
    cfg: TrainConfig,
    mesh: Mesh,
    p_sh: Any,
    o_sh: Any,
    batch_shape: tuple[int, ...],
):
    """The jitted `train_step_fn` for batches of `batch_shape` = (grad_accum, micro_batch, T);
    params and optimizer state are donated."""
    key = ("train", graphdef, attention, optimizer_key(cfg), cfg.remat, mesh, batch_shape)
    if key not in _JIT_CACHE:
        b_sh = batch_shardings(mesh, batch_shape, lead=1)
        bs = {k: b_sh for k in BATCH_KEYS}
        rep = replicated(mesh)
        _JIT_CACHE[key] = jax.jit(
            train_step_fn(graphdef, attention, make_optimizer(cfg), cfg.remat),
            in_shardings=(p_sh, o_sh, rep, bs),
            out_shardings=(p_sh, o_sh, rep, rep),
            donate_argnums=(0, 1),
        )
    return _JIT_CACHE[key]
