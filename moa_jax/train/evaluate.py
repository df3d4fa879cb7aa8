"""Held-out evaluation: mean NLL and perplexity of packed rows under each attention method."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from moa_jax.models.attention import Attention
from moa_jax.train.data import PackedData
from moa_jax.train.step import BATCH_KEYS, batch_shardings, loss_sums, put_batch, replicated

_JIT_CACHE: dict[Any, Any] = {}


def get_eval_step(
    graphdef: nnx.GraphDef,
    attention: Attention,
    tail: int,
    mesh: Mesh,
    p_sh: Any,
    batch_shape: tuple[int, ...],
):
    """The jitted `loss_sums` for [B, T] batches of `batch_shape` (cached per process)."""
    key = (graphdef, attention, tail, mesh, batch_shape)
    if key not in _JIT_CACHE:
        b_sh = batch_shardings(mesh, batch_shape, lead=0)
        bs = {k: b_sh for k in BATCH_KEYS}
        _JIT_CACHE[key] = jax.jit(
            lambda params, batch: loss_sums(graphdef, params, batch, attention, tail),
            in_shardings=(p_sh, bs),
            out_shardings=replicated(mesh),
        )
    return _JIT_CACHE[key]


def evaluate(
    graphdef: nnx.GraphDef,
    params: Any,
    data: PackedData,
    rows: np.ndarray,
    methods: dict[str, Attention],
    tail: int,
    batch_size: int,
    mesh: Mesh,
    p_sh: Any,
) -> dict[str, dict[str, float]]:
    """Mean NLL and perplexity of the rows under each attention method (all positions, and the
    last `tail` positions when tail > 0)."""
    out = {}
    pad = (-len(rows)) % batch_size
    rows_p = np.concatenate([rows, np.repeat(rows[:1], pad)]) if pad else rows
    for name, attention in methods.items():
        sums: dict[str, float] = {}
        for i in range(0, len(rows_p), batch_size):
            b = data.batch(rows_p[i : i + batch_size])
            if i + batch_size > len(rows):  # padding rows count for nothing
                b.loss_mask[len(rows) - i :] = 0.0
            fn = get_eval_step(graphdef, attention, tail, mesh, p_sh, b.inputs.shape)
            res = jax.device_get(fn(params, put_batch(b, mesh, 0)))
            for k, v in res.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        m = {"loss": sums["nll"] / max(sums["tokens"], 1.0), "tokens": sums["tokens"]}
        m["ppl"] = math.exp(m["loss"])
        if tail:
            m["loss_tail"] = sums["tail_nll"] / max(sums["tail_tokens"], 1.0)
            m["ppl_tail"] = math.exp(m["loss_tail"])
            m["tail_tokens"] = sums["tail_tokens"]
        out[name] = m
    return out
