"""Which attention backends the decode benchmark times: one `Variant` per (method, setting),
and the one function that builds a variant's backend."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from moa_jax.bench.decode_config import DecodeConfig

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
        if m in ("dense", "dense-kernel"):
            out.append(Variant(m, m))
        elif m == "moa":
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
    return out


def make_backend(variant: Variant, cfg, config: DecodeConfig, cache_len: int):
    """The `Attention` of a JAX variant for caches of `cache_len` slots, built by the
    method registry (`moa_jax.methods`) with the library's kernels (impl 'native')."""
    from moa_jax.methods import AttentionConfig, build_attention

    m, p = variant.method, variant.params
    options: dict[str, str] = {}
    plan = None
    if m == "moa":
        plan = moa_plan(p["plan"], cfg, cache_len)
    elif m in ("streaming", "h2o", "recycled"):
        options[f"{m}.k"] = str(p["k"])
    if m == "recycled":
        if "threshold" in p:
            options.update(
                {"recycled.s": str(p["check"]), "recycled.threshold": str(p["threshold"])}
            )
        else:
            options["recycled.s"] = str(p["stride"])
    ac = AttentionConfig(
        config=cfg,
        plan=plan,
        impl="native",
        kernel_backend=config.kernel_backend,
        interpret=config.interpret or None,
        block=config.block,
        num_splits=config.num_splits,
        options=options,
    )
    return build_attention(m, ac, cache_len)


def moa_plan(spec: str, cfg, cache_len: int):
    """The `Plan` of a `--moa-densities` entry ('het:0.5', 'het:0.25': synthetic, whole dense
    KV groups, windows for `cache_len`), a plan file or a plan spec ('streaming:W[:S]')."""
    from moa_jax.bench.head_configs import plan_windows
    from moa_jax.plan import Plan

    if spec.startswith("het:"):
        density = float(spec[4:])
        kind = {0.5: "het50", 0.25: "het25"}.get(density)
        if kind is None:
            raise ValueError(f"--moa-densities takes 0.5 or 0.25, got {density}")
        w, s = plan_windows(kind, cache_len, cfg.num_heads, cfg.num_kv_heads, dense_groups=True)
        return Plan.from_windows([list(w)] * cfg.num_layers, [list(s)] * cfg.num_layers)
    if Path(spec).is_file():
        return Plan.load(spec)
    return Plan.from_spec(spec, cfg.num_layers, cfg.num_heads)
