"""Attention methods compared by the evaluation, as a registry.

A method is a name plus a function building an attention backend for a model config and a
context length (`Method.build(ctx, length)`), a KV density at that length, and a check that
says why it cannot run (missing plan, not implemented yet). New methods (Recycled Attention,
H2O) plug in with `register_method`.

Built in:
- `dense`: full causal attention.
- `moa`: the per-head elastic plan given with `--plan` (our JSON or the reference
  `moa_alpha_beta.json`), resolved at the cell's length.
- `uniform`: StreamingLLM-style: every head the same window plus `sink` sink tokens, with the
  decode-cache size matched to the MoA plan's at each length when a plan is given
  (`--method-opt uniform.match=heads` matches the mean span over query heads instead), else
  `--density`.
- `recycled`: Recycled Attention decoding (`moa_jax.models.recycled`): dense prefill, then a
  recycled cache of K tokens per layer and KV head refreshed by a full step every S decode
  steps. K = length / 8 and S = 10 by default (the paper's LM setting), `--method-opt
  recycled.k=...`, `recycled.s=...`, `recycled.threshold=...` (dynamic schedule, S then being
  the check interval).
- `streaming` (StreamingLLM decoding: 4 sinks + the K - 4 most recent tokens) and `h2o` (K/2
  heavy hitters + K/2 recent tokens), the recycled paper's baselines: dense prefill, K-token
  decode; K = length / 8 by default (`streaming.k`, `streaming.sink`, `h2o.k`).

Decode-time methods (`Method.decode_only`) leave the prompt's prefill dense: their answer NLL is
therefore teacher-forced through their decode path (prefill the context, then feed the gold
tokens one by one), and their reported density is the KV read per decode step, K / length.

Plugging a method in (settings come from `--method-opt METHOD.KEY=VALUE`):

    register_method(Method(
        "mine", "my sparse decoding", lambda ctx, n: MyAttention(k=ctx.option("mine", "k",
        n // 8, int)), kv_density=lambda ctx, n: 1 / 8, decode_only=True))

Implementations (`MethodContext.impl`):
- 'masked' (the default on CPU): `MaskedAttention` (`moa_jax.models.masked_attention`), exact
  masks computed with the jnp reference in query chunks: what a plan keeps, not how fast a
  kernel runs. Memory stays at a query chunk x keys per layer, and a prefill skips keys no
  query of the chunk can see.
- 'native' (the default on GPU/TPU): the library's backends, `DenseAttention` and `MoAAttention`
  (Pallas kernels).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Mapping

import jax

from moa_jax.config import ModelConfig
from moa_jax.models.attention import AttentionBackend, DenseAttention
from moa_jax.models.masked_attention import MaskedAttention
from moa_jax.plan import Plan


# ----------------------------------------------------------------------------- plans
def load_plan(path: str | Path) -> Plan:
    """A plan file: moa-jax's own JSON (`Plan.save`) or the reference `{"alphas", "betas"}`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"plan file {path} does not exist")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if isinstance(d, dict) and "schema_version" not in d and "alphas" in d and "betas" in d:
        return Plan.from_moa_json(path)
    return Plan.from_dict(d)


def uniform_plan(cfg: ModelConfig, length: int, density: float, sink: int) -> Plan:
    """Every head: `sink` sinks + a window, keeping round(density * length) KV at `length`."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    kept = max(1, int(round(density * length)))
    sink = max(0, min(int(sink), kept - 1))
    return Plan.uniform(
        cfg.num_layers,
        cfg.num_heads,
        window=kept - sink,
        sink=sink,
        metadata={"kv_density_target": density, "length": length},
    )


# ----------------------------------------------------------------------------- registry
@dataclasses.dataclass(frozen=True)
class MethodContext:
    """Run-wide inputs of method builders.

    Args:
      config: the model's config.
      plan: the MoA plan (`--plan`), or None.
      density: KV density of `uniform` when there is no plan to match.
      sink: sink tokens of `uniform`.
      impl: 'auto' | 'masked' | 'native' (see the module docstring).
      q_chunk: query chunk of the masked implementation.
      options: method-specific settings from `--method-opt name.key=value` (strings), e.g.
        {'recycled.k': '2048', 'recycled.s': '10'}; `option()` reads them with a default.
    """

    config: ModelConfig
    plan: Plan | None = None
    density: float = 0.5
    sink: int = 64
    impl: str = "auto"
    q_chunk: int = 512
    options: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def option(self, method: str, key: str, default: Any = None, cast: Callable = str) -> Any:
        """`options['<method>.<key>']` converted with `cast`, or `default` when unset."""
        raw = self.options.get(f"{method}.{key}")
        return default if raw is None else cast(raw)

    @property
    def resolved_impl(self) -> str:
        if self.impl not in ("auto", "masked", "native"):
            raise ValueError(f"impl must be auto | masked | native, got {self.impl!r}")
        if self.impl != "auto":
            return self.impl
        return "native" if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else "masked"

    def backend_for_plan(self, plan: Plan, length: int) -> AttentionBackend:
        plan.validate(self.config)
        if self.resolved_impl == "masked":
            return MaskedAttention.for_plan(plan, length, self.q_chunk)
        from moa_jax.models.moa_attention import MoAAttention

        return MoAAttention(plan, length=length)


@dataclasses.dataclass(frozen=True)
class Method:
    """An attention method under evaluation.

    Attributes:
      name, description: shown in tables and results.json.
      build: (ctx, length) -> backend for prompts of up to `length` tokens; None if the method
        has no implementation yet.
      kv_density: (ctx, length) -> kept KV / length (for the report).
      requires: (ctx) -> None when the method can run, else the reason it cannot.
      decode_only: the method changes decoding only (dense prefill): teacher-forced NLLs go
        through its decode path.
    """

    name: str
    description: str
    build: Callable[[MethodContext, int], AttentionBackend] | None
    kv_density: Callable[[MethodContext, int], float] | None = None
    requires: Callable[[MethodContext], str | None] | None = None
    decode_only: bool = False

    def unavailable(self, ctx: MethodContext) -> str | None:
        if self.build is None:
            return "not implemented yet"
        return self.requires(ctx) if self.requires is not None else None


METHODS: dict[str, Method] = {}


def register_method(method: Method, *, replace: bool = False) -> Method:
    if method.name in METHODS and not replace:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def resolve_methods(spec: str | list[str]) -> list[Method]:
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec)]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; methods: {sorted(METHODS)}")
    if not names:
        raise ValueError("no methods selected")
    return [METHODS[n] for n in dict.fromkeys(names)]


def _dense_build(ctx: MethodContext, length: int) -> AttentionBackend:
    if ctx.resolved_impl == "masked":
        return MaskedAttention(q_chunk=ctx.q_chunk)
    return DenseAttention()


def _uniform_density(ctx: MethodContext, length: int) -> float:
    """The plan's decode-cache density (`uniform.match=cache`, the default: equal memory; with
    GQA a KV head keeps its query heads' largest span) or its mean span over query heads
    (`uniform.match=heads`); `--density` without a plan."""
    if ctx.plan is None:
        return ctx.density
    match = ctx.option("uniform", "match", "cache")
    if match == "cache":
        return ctx.plan.kv_cache_density(length, ctx.config.num_kv_heads)
    if match == "heads":
        return ctx.plan.kv_density(length)
    raise ValueError(f"uniform.match must be 'cache' or 'heads', got {match!r}")


def _uniform(ctx: MethodContext, length: int) -> Plan:
    return uniform_plan(ctx.config, length, _uniform_density(ctx, length), ctx.sink)


register_method(
    Method("dense", "full causal attention", _dense_build, kv_density=lambda ctx, n: 1.0)
)
register_method(
    Method(
        "moa",
        "MoA per-head elastic windows + sinks from --plan",
        lambda ctx, n: ctx.backend_for_plan(ctx.plan, n),
        kv_density=lambda ctx, n: ctx.plan.kv_density(n),
        requires=lambda ctx: None if ctx.plan is not None else "needs --plan FILE",
    )
)
register_method(
    Method(
        "uniform",
        "StreamingLLM-style: one window + sinks for every head, matched KV density",
        lambda ctx, n: ctx.backend_for_plan(_uniform(ctx, n), n),
        kv_density=lambda ctx, n: _uniform(ctx, n).kv_density(n),
    )
)


def _kernel_backend(ctx: MethodContext) -> str:
    return "reference" if ctx.resolved_impl == "masked" else "auto"


def _decode_k(ctx: MethodContext, method: str, length: int) -> int:
    return ctx.option(method, "k", max(8, length // 8), int)


def _recycled(ctx: MethodContext, length: int) -> AttentionBackend:
    from moa_jax.models.recycled_attention import RecycleConfig, RecycledAttention

    stride = ctx.option("recycled", "s", "10")
    cfg = RecycleConfig(
        k=_decode_k(ctx, "recycled", length),
        stride=None if stride in ("none", "None") else int(stride),
        dynamic_threshold=ctx.option("recycled", "threshold", None, float),
    )
    return RecycledAttention(cfg, kernel_backend=_kernel_backend(ctx))


def _streaming(ctx: MethodContext, length: int) -> AttentionBackend:
    from moa_jax.models.eviction_attention import StreamingAttention

    return StreamingAttention(
        _decode_k(ctx, "streaming", length),
        sink=ctx.option("streaming", "sink", 4, int),
        kernel_backend=_kernel_backend(ctx),
    )


def _h2o(ctx: MethodContext, length: int) -> AttentionBackend:
    from moa_jax.models.eviction_attention import H2OAttention

    return H2OAttention(_decode_k(ctx, "h2o", length), kernel_backend=_kernel_backend(ctx))


register_method(
    Method(
        "recycled",
        "Recycled Attention decoding: dense prefill, K = L/8 recycled tokens, full step "
        "every S = 10",
        _recycled,
        kv_density=lambda ctx, n: min(1.0, _decode_k(ctx, "recycled", n) / n),
        decode_only=True,
    )
)
register_method(
    Method(
        "streaming",
        "StreamingLLM decoding: dense prefill, 4 sinks + K - 4 recent tokens, K = L/8",
        _streaming,
        kv_density=lambda ctx, n: min(1.0, _decode_k(ctx, "streaming", n) / n),
        decode_only=True,
    )
)
register_method(
    Method(
        "h2o",
        "H2O decoding: dense prefill, K/2 heavy hitters + K/2 recent tokens, K = L/8",
        _h2o,
        kv_density=lambda ctx, n: min(1.0, _decode_k(ctx, "h2o", n) / n),
        decode_only=True,
    )
)
