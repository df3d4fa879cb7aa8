"""Attention methods: the one place an attention backend is built from a config.

A method is a name plus a builder: `build_attention(name, AttentionConfig(...), length)` returns
the backend for prompts + generations of up to `length` tokens, already placed on
`AttentionConfig.mesh` (every backend honours the mesh the same way: `Attention.on_mesh`).
Each backend has a prefill part (how a prompt chunk is attended: the jnp oracle, the Pallas
block-sparse kernel with a MoA plan's windows, or exact masks) and a decode part that owns its
cache type (`init_cache`; `Method.cache` names it). Training forms of the methods are built by
`build_train_attention`. generate's CLI, the evaluation, the decode benchmark and the training
loop all build their backends here; search-internal backends (influence probes, needle mass)
are not methods and live with the search.

Every method names a typed options class (`Method.options`, a `MethodOptions` dataclass);
commands parse `--method-opt METHOD.KEY=VALUE` (and their alias flags such as `--recycle-k`)
into it once, with `parse_method_options`, and the builders read the typed values with
`AttentionConfig.options_for(name)`.

Built in (options in brackets):
- `dense`: full causal attention (jnp oracle over a position-indexed cache).
- `dense-kernel`: dense decoding through the head-major cache and the Pallas decode kernel.
- `moa` (`MoAOptions`): the per-head elastic plan (`AttentionConfig.plan`, from `Plan.load`:
  our JSON, the reference `moa_alpha_beta.json`, 'dense' or 'streaming:W[:S]'), resolved at
  the given length; dense attention, with a warning, where the plan keeps every token
  (`dense_when_full`).
- `uniform` (`UniformOptions`): StreamingLLM-style: every head the same window plus `sink`
  sink tokens, with the decode-cache size matched to the MoA plan's at each length when a plan
  is given (`match=heads` matches the mean span over query heads instead), else `density`.
- `recycled` (`RecycledOptions`): Recycled Attention decoding
  (`moa_jax.models.recycled_attention`): dense prefill (or the plan's, `prefill=plan`), then a
  recycled cache of `k` tokens per layer and KV head refreshed by a full step every `stride`
  decode steps. K = length / 8 and S = 10 by default (the paper's LM setting); `threshold`
  selects the dynamic schedule, S then being the check interval.
- `streaming` (`StreamingOptions`: StreamingLLM decoding, `sink` = 4 sinks + the K - 4 most
  recent tokens) and `h2o` (`H2OOptions`: K/2 heavy hitters + K/2 recent tokens), the
  recycled paper's baselines: dense prefill, K-token decode; K = length / 8 by default.

The model's own sliding window (`ModelConfig.model_window`: Mistral, Qwen2 with
`use_sliding_window`) composes with every method and is never widened: `AttentionConfig`
composes its plan with it once (`Plan.within_model_window`: on a windowed layer every head has
sink 0 and window min(w', W)), `dense` on a windowed model is the dense plan composed the same
way (the masked path, or the MoA span kernels with a span cache of W slots: Mistral's rolling
buffer), `uniform` composes its plan, and the head-major backends (`dense-kernel`, `recycled`,
`streaming`, `h2o`) get the per-layer windows (`model_windows`), which their prefill and decode
kernels apply. Every backend built here for a windowed model reports `applies_model_window`.

Decode-time methods (`Method.decode_only`) leave the prompt's prefill dense: the evaluation
teacher-forces their answer NLL through their decode path, and their reported density is the KV
read per decode step, K / length.

Adding a method is one module with its backend and options plus one `register_method` call;
docs/architecture.md ("Add a method") walks through it.

Implementations (`AttentionConfig.impl`):
- 'masked' (the default on CPU): `MaskedAttention` (`moa_jax.models.masked_attention`), exact
  masks computed with the jnp reference in query chunks: what a plan keeps, not how fast a
  kernel runs. The decode methods use the jnp oracles of their kernels.
- 'native' (the default on GPU/TPU): the library's backends with their Pallas kernels.
"""

from __future__ import annotations

import dataclasses
import types
import typing
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import jax
from jax.sharding import Mesh

from moa_jax.config import ModelConfig
from moa_jax.errors import ConfigError
from moa_jax.models.attention import Attention, DenseAttention
from moa_jax.models.dense_attention import TrainDenseAttention
from moa_jax.models.eviction_attention import H2OAttention, StreamingAttention
from moa_jax.models.head_major_attention import FullCacheAttention
from moa_jax.models.masked_attention import MaskedAttention
from moa_jax.models.moa_attention import MoAAttention
from moa_jax.models.recycled_attention import RecycleConfig, RecycledAttention
from moa_jax.models.recycled_train_attention import RecycledTrainAttention
from moa_jax.plan import Plan


# ----------------------------------------------------------------------------- plans
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


# ----------------------------------------------------------------------------- options
_NONE = ("none", "None", "null")
_TRUE, _FALSE = ("1", "true", "True", "yes", "on"), ("0", "false", "False", "no", "off")


def _parse_value(text: str, kind: Any) -> Any:
    """`text` as a value of the annotated type `kind`; ValueError saying what was expected."""
    text = text.strip()
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        if type(None) in args and text in _NONE:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _parse_value(text, inner)
    if typing.get_origin(kind) is Literal:
        if text not in args:
            raise ValueError(f"expected one of {', '.join(map(str, args))}")
        return text
    if kind is bool:
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise ValueError("expected true or false")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError("expected an integer") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError("expected a number") from None
    if kind is str:
        return text
    raise TypeError(f"options of type {kind} cannot be read from text")


@dataclasses.dataclass(frozen=True)
class MethodOptions:
    """Typed settings of one method, read once from text (`--method-opt METHOD.KEY=VALUE`, or a
    command's alias flags) by `parse`; a subclass lists its fields with annotated types (int,
    float, bool, str, Literal[...] choices, `X | None` where 'none' is a value) and checks its
    values in `__post_init__`. `ALIASES` maps extra key names to fields."""

    ALIASES: ClassVar[Mapping[str, str]] = {}

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def parse(cls, method: str, settings: Mapping[str, str]) -> MethodOptions:
        """The options from {KEY: VALUE text}; a `ConfigError` (a ValueError) names the bad
        option ('METHOD.KEY') and says what it takes."""
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for key, text in settings.items():
            name = cls.ALIASES.get(key, key)
            if name not in hints or name == "ALIASES":
                known = ", ".join(cls.keys()) or "none"
                raise ConfigError(f"unknown option {method}.{key} (options of {method!r}: {known})")
            try:
                values[name] = _parse_value(str(text), hints[name])
            except ValueError as e:
                raise ConfigError(f"option {method}.{key}={text!r}: {e}") from None
        try:
            return cls(**values)
        except ValueError as e:
            raise ConfigError(f"options of {method!r}: {e}") from None


@dataclasses.dataclass(frozen=True)
class NoOptions(MethodOptions):
    """A method without settings."""


@dataclasses.dataclass(frozen=True)
class MoAOptions(MethodOptions):
    """`moa`: the plan comes from `AttentionConfig.plan` (`--plan`).

    Args:
      dense_when_full: where the plan keeps every token at the length asked for, build dense
        attention (the span cache and block-sparse kernels would only add work) and warn;
        False builds the plan's kernels all the same (the benchmarks time them). Never on a
        model with its own sliding window: the composed plan (`Plan.within_model_window`)
        runs, which applies the window at any cache length.
    """

    dense_when_full: bool = True


@dataclasses.dataclass(frozen=True)
class UniformOptions(MethodOptions):
    """`uniform`: one window + `sink` sinks for every head.

    Args:
      density: KV density when no plan is given to match.
      sink: sink tokens.
      match: with a plan, match its decode-cache density ('cache': equal memory; with GQA a
        KV head keeps its query heads' largest span) or its mean span over query heads
        ('heads').
    """

    density: float = 0.5
    sink: int = 64
    match: Literal["cache", "heads"] = "cache"

    def __post_init__(self):
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.sink < 0:
            raise ValueError(f"sink must be >= 0, got {self.sink}")


def _check_k(k: int | None) -> None:
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


@dataclasses.dataclass(frozen=True)
class RecycledOptions(MethodOptions):
    """`recycled`: Recycled Attention decoding.

    Args:
      k: recycled tokens per layer and KV head (None: length / 8, at least 8).
      stride: a full step every `stride` decode steps (with `threshold`: the query check
        interval); None or 0: never refresh (SnapKV). Key alias `s`.
      threshold: dynamic schedule: refresh a layer when the cosine of its query with the last
        full step's is at or below this.
      prefill: 'dense', or 'plan' (the MoA plan's windows for the prompt).
    """

    ALIASES: ClassVar[Mapping[str, str]] = {"s": "stride"}

    k: int | None = None
    stride: int | None = 10
    threshold: float | None = None
    prefill: Literal["dense", "plan"] = "dense"

    def __post_init__(self):
        _check_k(self.k)
        if self.stride is not None and self.stride < 0:
            raise ValueError(f"stride must be >= 0 (0: never refresh), got {self.stride}")
        if self.stride == 0:
            object.__setattr__(self, "stride", None)
        if self.threshold is not None and self.stride is None:
            raise ValueError("the dynamic schedule (threshold) needs a check interval: stride")
        if self.prefill not in ("dense", "plan"):
            raise ValueError(f"prefill must be 'dense' or 'plan', got {self.prefill!r}")


@dataclasses.dataclass(frozen=True)
class StreamingOptions(MethodOptions):
    """`streaming`: K cached tokens, `sink` of them the first (None: K = length / 8)."""

    k: int | None = None
    sink: int = 4

    def __post_init__(self):
        _check_k(self.k)
        if self.sink < 0:
            raise ValueError(f"sink must be >= 0, got {self.sink}")


@dataclasses.dataclass(frozen=True)
class H2OOptions(MethodOptions):
    """`h2o`: K cached tokens, K/2 heavy hitters + K/2 recent (None: K = length / 8)."""

    k: int | None = None

    def __post_init__(self):
        _check_k(self.k)


def split_method_options(
    entries: Sequence[str], default_method: str | None = None
) -> dict[str, dict[str, str]]:
    """`--method-opt` entries 'METHOD.KEY=VALUE' (or 'KEY=VALUE' for `default_method`, a
    command's one --method) as {METHOD: {KEY: VALUE}}; a malformed entry is a ValueError."""
    out: dict[str, dict[str, str]] = {}
    for entry in entries:
        key, sep, value = str(entry).partition("=")
        key = key.strip()
        method, dot, name = key.rpartition(".")
        if not dot and default_method is not None:
            method, name = default_method, key
        if not sep or not method or not name:
            want = "METHOD.KEY=VALUE" + (" or KEY=VALUE" if default_method else "")
            raise ConfigError(f"--method-opt wants {want}, got {entry!r}")
        out.setdefault(method, {})[name] = value.strip()
    return out


def parse_method_options(
    settings: Mapping[str, Mapping[str, str]] | Mapping[str, str] | Sequence[str],
    default_method: str | None = None,
) -> dict[str, MethodOptions]:
    """Typed options per method name from text: `--method-opt` entries, {'METHOD.KEY': VALUE}
    or {METHOD: {KEY: VALUE}}. Parsed here once; errors name the option."""
    if isinstance(settings, Mapping):
        nested: dict[str, dict[str, str]] = {}
        for key, value in settings.items():
            if isinstance(value, Mapping):
                nested.setdefault(key, {}).update({k: str(v) for k, v in value.items()})
            else:
                for m, kv in split_method_options([f"{key}={value}"], default_method).items():
                    nested.setdefault(m, {}).update(kv)
    else:
        nested = split_method_options(settings, default_method)
    out = {}
    for name, kv in nested.items():
        if name not in METHODS:
            raise ConfigError(
                f"--method-opt for unknown method {name!r}; methods: {sorted(METHODS)}"
            )
        out[name] = METHODS[name].options.parse(name, kv)
    return out


# ----------------------------------------------------------------------------- configs
@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Run-wide inputs of the method builders.

    Args:
      config: the model's config.
      plan: the MoA plan (`Plan.load`), or None; `moa` runs it, `uniform` matches its density,
        `recycled` prefills with it (option prefill=plan). Composed here with the model's own
        sliding window, if it has one (`Plan.within_model_window`).
      impl: 'auto' | 'masked' | 'native' (see the module docstring).
      q_chunk: query chunk of the masked implementation.
      kernel_backend: Pallas backend of the native kernels: 'auto' | 'gpu' | 'mgpu' | 'tpu' |
        'reference' (see `moa_jax.pallas_kernels.sparse_attention`).
      interpret: Pallas interpret mode (None: automatic, True off the kernel's platform).
      block: cache padding granularity of the head-major caches (None: the default).
      num_splits: GPU split-K factor of the decode kernels (None: automatic).
      mesh: device mesh the backend's kernels run on (None: one device).
      options: typed settings per method name (`MethodOptions`: `RecycledOptions(k=2048)` ...);
        a method without an entry runs with its defaults. Text settings ({'recycled.k':
        '2048'} or `--method-opt` entries) are parsed here, once (`parse_method_options`).
    """

    config: ModelConfig
    plan: Plan | None = None
    impl: str = "auto"
    q_chunk: int = 512
    kernel_backend: str = "auto"
    interpret: bool | None = None
    block: int | None = None
    num_splits: int | None = None
    mesh: Mesh | None = None
    options: Mapping[str, MethodOptions] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        given = self.options
        if isinstance(given, Mapping):
            opts = {k: v for k, v in given.items() if isinstance(v, MethodOptions)}
            text = {k: v for k, v in given.items() if not isinstance(v, MethodOptions)}
        else:  # --method-opt entries
            opts, text = {}, list(given)
        if text:
            opts.update(parse_method_options(text))
        for name, o in opts.items():
            want = METHODS[name].options if name in METHODS else MethodOptions
            if not isinstance(o, want):
                raise TypeError(f"options of {name!r} must be {want.__name__}, got {o!r}")
        object.__setattr__(self, "options", dict(opts))
        if self.plan is not None and self.plan.num_layers == self.config.num_layers:
            # (a plan of another shape is refused by `Plan.validate` when a backend is built)
            object.__setattr__(self, "plan", self.plan.within_model_window(self.config))

    @property
    def model_windows(self) -> tuple[int | None, ...] | None:
        """Per layer the model's own sliding window (None where a layer has none), or None when
        the model has no window."""
        cfg = self.config
        if not cfg.has_model_window:
            return None
        return tuple(cfg.model_window(i) for i in range(cfg.num_layers))

    def compose(self, plan: Plan) -> Plan:
        """`plan` composed with the model's own sliding window (`Plan.within_model_window`)."""
        return plan.within_model_window(self.config)

    def options_for(self, method: str) -> Any:
        """The typed options of `method`: the run's, else the method's defaults."""
        got = self.options.get(method)
        return got if got is not None else METHODS[method].options()

    @property
    def resolved_impl(self) -> str:
        if self.impl not in ("auto", "masked", "native"):
            raise ValueError(f"impl must be auto | masked | native, got {self.impl!r}")
        if self.impl != "auto":
            return self.impl
        return "native" if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else "masked"

    @property
    def decode_kernel_options(self) -> dict[str, Any]:
        """Keyword options of the head-major-cache backends (recycled, dense kernel,
        StreamingLLM, H2O); the masked implementation runs their jnp oracles."""
        masked = self.resolved_impl == "masked"
        return dict(
            kernel_backend="reference" if masked else self.kernel_backend,
            interpret=self.interpret,
            block=self.block,
            num_splits=self.num_splits,
            model_windows=self.model_windows,
        )

    def backend_for_plan(self, plan: Plan, length: int) -> Attention:
        """`plan` (composed with the model's window) resolved at `length`: exact masks
        (masked) or the MoA kernels (native)."""
        plan.validate(self.config)
        plan = self.compose(plan)
        if self.resolved_impl == "masked":
            return MaskedAttention.for_plan(plan, length, self.q_chunk)
        return MoAAttention(
            plan, length=length, kernel_backend=self.kernel_backend, interpret=self.interpret
        )


@dataclasses.dataclass(frozen=True)
class TrainAttentionConfig:
    """Settings of the training forms of the methods (`build_train_attention`).

    Args:
      impl: kernel of full causal blocks: 'auto' | 'reference' | 'xla' | 'cudnn' | 'pallas'.
      segments: rows hold several documents (packing 'segments'): attention stays within each.
      prefix_len, tail_len: recycled: L rows with full attention, S rows attending to the
        selected top-K + the tail.
      top_k: recycled: K tokens selected per layer and KV head.
      stride: recycled: 0 = the paper's recipe (one selection at row L); n > 0 = the decoder's
        schedule, every n-th tail row full.
      pool_kernel: recycled: max-pool kernel over tokens before the top-K.
      decode_eviction: recycled: tail row j sees only the K - j best (the decoder's cache).
    """

    impl: str = "auto"
    segments: bool = False
    prefix_len: int = 0
    tail_len: int = 0
    top_k: int = 0
    stride: int = 0
    pool_kernel: int = 7
    decode_eviction: bool = False


# ----------------------------------------------------------------------------- registry
@dataclasses.dataclass(frozen=True)
class Method:
    """An attention method.

    Attributes:
      name, description: shown in tables and results.json.
      build: (AttentionConfig, length) -> the inference backend (prefill part + decode part) for
        prompts + generations of up to `length` tokens; None if the method has no
        implementation yet. It reads its settings with `ac.options_for(name)`.
      kv_density: (AttentionConfig, length) -> kept KV / length (for reports).
      requires: (AttentionConfig) -> None when the method can run, else the reason it cannot.
      decode_only: the method changes decoding only (dense prefill).
      cache: the decode part's cache type, by name (documentation and reports).
      train: (AttentionConfig, TrainAttentionConfig, seq_len) -> the training backend; None when
        the method has no training form.
      options: the method's `MethodOptions` type (`--method-opt METHOD.KEY=VALUE` parses into
        it; `NoOptions` when it has no settings).
    """

    name: str
    description: str
    build: Callable[[AttentionConfig, int], Attention] | None
    kv_density: Callable[[AttentionConfig, int], float] | None = None
    requires: Callable[[AttentionConfig], str | None] | None = None
    decode_only: bool = False
    cache: str = ""
    train: Callable[[AttentionConfig, TrainAttentionConfig, int], Attention] | None = None
    options: type[MethodOptions] = NoOptions

    def unavailable(self, ac: AttentionConfig) -> str | None:
        if self.build is None:
            return "not implemented yet"
        return self.requires(ac) if self.requires is not None else None


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


def _method(name: str | Method) -> Method:
    if isinstance(name, Method):
        return name
    return resolve_methods([name])[0]


def build_attention(method: str | Method, ac: AttentionConfig, length: int) -> Attention:
    """The inference backend of `method` for up to `length` tokens, on `ac.mesh`.

    Raises ValueError naming the reason when the method cannot run with `ac`.
    """
    m = _method(method)
    why = m.unavailable(ac)
    if why is not None:
        raise ValueError(f"method {m.name!r} cannot run: {why}")
    backend = m.build(ac, int(length))
    return backend.on_mesh(ac.mesh) if ac.mesh is not None else backend


def build_train_attention(
    method: str | Method, ac: AttentionConfig, tc: TrainAttentionConfig, seq_len: int
) -> Attention:
    """The training backend of `method` for rows of `seq_len` tokens (see
    `TrainAttentionConfig`); ValueError when the method has no training form."""
    m = _method(method)
    if m.train is None:
        raise ValueError(f"method {m.name!r} has no training form; trainable: {trainable()}")
    why = m.requires(ac) if m.requires is not None else None
    if why is not None:
        raise ValueError(f"method {m.name!r} cannot run: {why}")
    backend = m.train(ac, tc, int(seq_len))
    windows = [w for w in (ac.model_windows or ()) if w is not None]
    if windows and not backend.applies_model_window and int(seq_len) > min(windows):
        raise ValueError(
            f"method {m.name!r}'s training form does not apply this {ac.config.family} "
            f"model's own sliding window of {min(windows)} tokens: train on rows of at most "
            f"{min(windows)} tokens"
        )
    return backend.on_mesh(ac.mesh) if ac.mesh is not None else backend


def trainable() -> list[str]:
    """The registered methods with a training form."""
    return sorted(n for n, x in METHODS.items() if x.train is not None)


# ----------------------------------------------------------------------------- built in
def _dense_plan(ac: AttentionConfig) -> Plan:
    """The dense plan composed with the model's own sliding window."""
    cfg = ac.config
    return ac.compose(Plan.dense(cfg.num_layers, cfg.num_heads))


def _dense_build(ac: AttentionConfig, length: int) -> Attention:
    if ac.config.has_model_window:
        # the model's own attention is the dense plan composed with its window; a layer
        # without one stays dense at any length (masked: resolved at the longest position the
        # model takes; MoA kernels: resolved at each call's length)
        plan = _dense_plan(ac)
        if ac.resolved_impl == "masked":
            n = max(int(length), ac.config.max_position_embeddings)
            return MaskedAttention.for_plan(plan, n, ac.q_chunk)
        return MoAAttention(plan, kernel_backend=ac.kernel_backend, interpret=ac.interpret)
    if ac.resolved_impl == "masked":
        return MaskedAttention(q_chunk=ac.q_chunk)
    return DenseAttention()


def _dense_density(ac: AttentionConfig, length: int) -> float:
    """1, or the windowed model's own kept KV / length (its rolling buffer)."""
    if not ac.config.has_model_window:
        return 1.0
    return _dense_plan(ac).kv_density(length)


def _dense_train(ac: AttentionConfig, tc: TrainAttentionConfig, seq_len: int) -> Attention:
    return TrainDenseAttention(tc.impl, segments=tc.segments)


def _dense_kernel_build(ac: AttentionConfig, length: int) -> Attention:
    return FullCacheAttention(**ac.decode_kernel_options)


def _moa_build(ac: AttentionConfig, length: int) -> Attention:
    """The plan at `length`; dense attention (with a warning) where it keeps every token and
    the native kernels would run (option `dense_when_full`), unless the model has its own
    window (`DenseAttention` does not apply it)."""
    backend = ac.backend_for_plan(ac.plan, length)
    if (
        ac.options_for("moa").dense_when_full
        and isinstance(backend, MoAAttention)
        and not backend.applies_model_window
        and backend.resolves_dense(length)
    ):
        warnings.warn(
            f"the MoA plan keeps every token at {length} tokens (prompt + new tokens): "
            "running dense attention",
            stacklevel=3,
        )
        return DenseAttention()
    return backend


def _moa_train(ac: AttentionConfig, tc: TrainAttentionConfig, seq_len: int) -> Attention:
    return MoAAttention(ac.plan, length=seq_len, kernel_backend=ac.kernel_backend)


def _uniform_density(ac: AttentionConfig, length: int) -> float:
    """The plan's decode-cache density (`match='cache'`, the default: equal memory) or its
    mean span over query heads (`match='heads'`); the option `density` without a plan."""
    o = ac.options_for("uniform")
    if ac.plan is None:
        return o.density
    if o.match == "cache":
        return ac.plan.kv_cache_density(length, ac.config.num_kv_heads)
    return ac.plan.kv_density(length)


def _uniform(ac: AttentionConfig, length: int) -> Plan:
    return ac.compose(
        uniform_plan(
            ac.config, length, _uniform_density(ac, length), ac.options_for("uniform").sink
        )
    )


def _decode_k(ac: AttentionConfig, method: str, length: int) -> int:
    k = ac.options_for(method).k
    return max(8, length // 8) if k is None else k


def _recycled(ac: AttentionConfig, length: int) -> Attention:
    o = ac.options_for("recycled")
    rc = RecycleConfig(
        k=_decode_k(ac, "recycled", length), stride=o.stride, dynamic_threshold=o.threshold
    )
    if o.prefill == "plan":
        if ac.plan is None:
            raise ValueError("recycled.prefill=plan needs a plan")
        return RecycledAttention(
            rc, prefill_moa=ac.backend_for_plan(ac.plan, length), **ac.decode_kernel_options
        )
    return RecycledAttention(rc, **ac.decode_kernel_options)


def _recycled_train(ac: AttentionConfig, tc: TrainAttentionConfig, seq_len: int) -> Attention:
    kw = dict(pool_kernel=tc.pool_kernel, decode_eviction=tc.decode_eviction, impl=tc.impl)
    if tc.stride:
        return RecycledTrainAttention.strided(tc.prefix_len, tc.tail_len, tc.stride, tc.top_k, **kw)
    return RecycledTrainAttention.paper(tc.prefix_len, tc.tail_len, tc.top_k, **kw)


def _streaming(ac: AttentionConfig, length: int) -> Attention:
    return StreamingAttention(
        _decode_k(ac, "streaming", length),
        sink=ac.options_for("streaming").sink,
        **ac.decode_kernel_options,
    )


def _h2o(ac: AttentionConfig, length: int) -> Attention:
    return H2OAttention(_decode_k(ac, "h2o", length), **ac.decode_kernel_options)


def _decode_method(
    name: str,
    description: str,
    build: Callable[[AttentionConfig, int], Attention],
    cache: str,
    options: type[MethodOptions],
    train: Callable[[AttentionConfig, TrainAttentionConfig, int], Attention] | None = None,
) -> Method:
    """A decode-time method over K cached tokens per layer and KV head (option `<name>.k`):
    its KV density is the K / length it reads per step."""
    return Method(
        name,
        description,
        build,
        kv_density=lambda ac, n: min(1.0, _decode_k(ac, name, n) / n),
        decode_only=True,
        cache=cache,
        train=train,
        options=options,
    )


def _needs_plan(ac: AttentionConfig) -> str | None:
    return None if ac.plan is not None else "needs --plan FILE"


for _m in (
    Method(
        "dense",
        "full causal attention",
        _dense_build,
        kv_density=_dense_density,
        cache="DenseKVCache",
        train=_dense_train,
    ),
    Method(
        "dense-kernel",
        "full causal attention, decoded by the Pallas kernel over a head-major cache",
        _dense_kernel_build,
        kv_density=lambda ac, n: 1.0,
        cache="HeadMajorKVCache",
    ),
    Method(
        "moa",
        "MoA per-head elastic windows + sinks from the plan",
        _moa_build,
        kv_density=lambda ac, n: ac.plan.kv_density(n),
        requires=_needs_plan,
        cache="SpanKVCache",
        train=_moa_train,
        options=MoAOptions,
    ),
    Method(
        "uniform",
        "StreamingLLM-style: one window + sinks for every head, matched KV density",
        lambda ac, n: ac.backend_for_plan(_uniform(ac, n), n),
        kv_density=lambda ac, n: _uniform(ac, n).kv_density(n),
        cache="SpanKVCache",
        options=UniformOptions,
    ),
    _decode_method(
        "recycled",
        "Recycled Attention decoding: dense prefill, K = L/8 recycled tokens, full step "
        "every S = 10",
        _recycled,
        "RecycledKVCache",
        RecycledOptions,
        train=_recycled_train,
    ),
    _decode_method(
        "streaming",
        "StreamingLLM decoding: dense prefill, 4 sinks + K - 4 recent tokens, K = L/8",
        _streaming,
        "SelectedKVCache",
        StreamingOptions,
    ),
    _decode_method(
        "h2o",
        "H2O decoding: dense prefill, K/2 heavy hitters + K/2 recent tokens, K = L/8",
        _h2o,
        "SelectedKVCache",
        H2OOptions,
    ),
):
    register_method(_m)
