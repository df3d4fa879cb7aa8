"""The update rule: the learning-rate schedule (optax schedules) and AdamW after global-norm
clipping."""

from __future__ import annotations

import jax
import optax

from moa_jax.train.config import TrainConfig


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Optimizer count -> learning rate (count 0 is step 1).

    Warm-up: count c < warmup_steps gives lr * (c + 1) / warmup_steps, so the last warm-up step
    reaches lr; then cosine / linear decay from lr at count warmup_steps to lr * min_lr_ratio at
    count `steps`, or constant lr.
    """
    peak, warm = cfg.lr, cfg.warmup_steps
    decay_steps = max(cfg.steps - warm, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, peak * cfg.min_lr_ratio, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if not warm:
        return decay
    warmup = optax.linear_schedule(peak / warm, peak, warm - 1)
    return optax.join_schedules([warmup, decay], [warm])


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW on `lr_schedule` (decoupled weight decay on matrices only), after clipping the
    global gradient norm to `clip_norm` when it is > 0."""

    def decay_mask(params):
        return jax.tree.map(lambda x: x.ndim >= 2, params)

    adamw = optax.adamw(
        lr_schedule(cfg),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    return adamw


def optimizer_key(cfg: TrainConfig) -> tuple:
    """The config values `make_optimizer` reads (a compiled step is reused when they match)."""
    return tuple(
        getattr(cfg, k)
        for k in (
            "lr",
            "schedule",
            "warmup_steps",
            "min_lr_ratio",
            "weight_decay",
            "b1",
            "b2",
            "eps",
            "clip_norm",
            "steps",
        )
    )
