"""Which attention backends the decode benchmark times: one `Variant` per (method, setting),
and the one function that builds a variant's backend."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from moa_jax.bench.decode_config import DecodeConfig
from moa_jax.bench.head_configs import plan_windows
from moa_jax.bench.random_model import model_config
from moa_jax.methods import (
    AttentionConfig,
    H2OOptions,
    MethodOptions,
    MoAOptions,
    RecycledOptions,
    StreamingOptions,
    build_attention,
    parse_method_options,
)
from moa_jax.plan import Plan

HF_LABEL = "hf transformers sdpa"


@dataclasses.dataclass(frozen=True)
class Variant:
    """A method with its settings; `params` (k, stride, threshold, check, plan) go into every
    row of the variant and are all `make_backend` needs."""

    method: str
    label: str
    params: dict = dataclasses.field(default_factory=dict)


def variants(config: DecodeConfig) -> list[Variant]:
    """The variants of a resolved config, in the order of `--method`."""
    k = config.recycle_k
    out: list[Variant] = []
    for m in config.method:
        if m == "moa":
            specs = [f"het:{d}" for d in config.moa_densities] + list(config.plan or ())
            for spec in specs:
                name = spec if spec.startswith(("het:", "streaming:")) else Path(spec).stem
                out.append(Variant(m, f"moa {name}", dict(plan=spec)))
        elif m in ("streaming", "h2o"):
            out.append(Variant(m, f"{m} K={k}", dict(k=k)))
        elif m == "recycled":
            for s in config.recycle_stride:
                out.append(
                    Variant(m, f"recycled K={k} S={s or 'never'}", dict(k=k, stride=s or None))
                )
            for thr in config.recycle_threshold or ():
                qc = config.recycle_check
                out.append(
                    Variant(
                        m, f"recycled K={k} dyn={thr} QC={qc}", dict(k=k, threshold=thr, check=qc)
                    )
                )
        elif m == "hf":
            out.append(Variant(m, HF_LABEL))
        else:  # another registered method, with its default options
            out.append(Variant(m, m))
    return out


def variant_options(
    variant: Variant, given: dict[str, MethodOptions] | None = None
) -> dict[str, MethodOptions]:
    """The typed method options of a JAX variant: its `params` (K, stride, threshold) over the
    method's `given` options (`--method-opt`); a plan is timed with its kernels even where it
    keeps every token."""
    m, p = variant.method, variant.params
    base = (given or {}).get(m)
    if m == "moa":
        return {m: dataclasses.replace(base or MoAOptions(), dense_when_full=False)}
    if m == "recycled":
        if "threshold" in p:
            fields = dict(k=p["k"], stride=p["check"], threshold=p["threshold"])
        else:
            fields = dict(k=p["k"], stride=p["stride"])
        return {m: dataclasses.replace(base or RecycledOptions(), **fields)}
    if m == "streaming":
        return {m: dataclasses.replace(base or StreamingOptions(), k=p["k"])}
    if m == "h2o":
        return {m: dataclasses.replace(base or H2OOptions(), k=p["k"])}
    return {}


def make_backend(variant: Variant, cfg, config: DecodeConfig, cache_len: int):
    """The `Attention` of a JAX variant for caches of `cache_len` slots, built by the
    method registry (`moa_jax.methods`) with the library's kernels (impl 'native')."""
    plan = None
    if variant.method == "moa":
        plan = moa_plan(variant.params["plan"], cfg, cache_len, config)
    given = parse_method_options(config.method_opt)
    ac = AttentionConfig(
        config=cfg,
        plan=plan,
        impl="native",
        kernel_backend=config.kernel_backend,
        interpret=config.interpret or None,
        block=config.block,
        num_splits=config.num_splits,
        options={**given, **variant_options(variant, given)},
    )
    return build_attention(variant.method, ac, cache_len)


def check_plans(config: DecodeConfig, cfg) -> None:
    """Every plan file or spec of the `moa` variants loaded and checked against the model's
    config (`Plan.validate`: the family and shape a plan records, its layer and head counts)
    before any weights are made: a plan for another model is a PlanError, not an error row."""
    for v in variants(config):
        spec = v.params.get("plan") if v.method == "moa" else None
        if spec is not None and not spec.startswith("het:"):
            moa_plan(spec, cfg, 0, config)


def moa_plan(spec: str, cfg, cache_len: int, config: DecodeConfig | None = None):
    """The `Plan` of a `--moa-densities` entry ('het:0.5', 'het:0.25': synthetic, whole dense
    KV groups, windows for `cache_len`), a plan file or a plan spec ('streaming:W[:S]'),
    checked against the model (`Plan.validate`). With `config.narrow` the timed model is the
    shape at CPU widths (another head_dim): a plan file is checked against the full shape and
    runs without its record of the model it was searched for."""
    if spec.startswith("het:"):
        density = float(spec[4:])
        kind = {0.5: "het50", 0.25: "het25"}.get(density)
        if kind is None:
            raise ValueError(f"--moa-densities takes 0.5 or 0.25, got {density}")
        w, s = plan_windows(kind, cache_len, cfg.num_heads, cfg.num_kv_heads, dense_groups=True)
        return Plan.from_windows([list(w)] * cfg.num_layers, [list(s)] * cfg.num_layers)
    plan = Plan.load(spec, cfg.num_layers, cfg.num_heads)
    if config is None or not config.narrow:
        return plan.validate(cfg)
    plan.validate(model_config(config.shape, config.layers))
    record = ("model_family", "model_shape")
    return dataclasses.replace(
        plan, metadata={k: v for k, v in plan.metadata.items() if k not in record}
    )
