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

Built in:
- `dense`: full causal attention (jnp oracle over a position-indexed cache).
- `dense-kernel`: dense decoding through the head-major cache and the Pallas decode kernel.
- `moa`: the per-head elastic plan (`AttentionConfig.plan`: our JSON or the reference
  `moa_alpha_beta.json`), resolved at the given length.
- `uniform`: StreamingLLM-style: every head the same window plus `sink` sink tokens, with the
  decode-cache size matched to the MoA plan's at each length when a plan is given (option
  `uniform.match=heads` matches the mean span over query heads instead), else `density`.
- `recycled`: Recycled Attention decoding (`moa_jax.models.recycled_attention`): dense
  prefill (or the plan's, option `recycled.prefill=plan`), then a recycled cache of K tokens
  per layer and KV head refreshed by a full step every S decode steps. K = length / 8 and
  S = 10 by default (the paper's LM setting); options `recycled.k`, `recycled.s`,
  `recycled.threshold` (dynamic schedule, S then being the check interval).
- `streaming` (StreamingLLM decoding: 4 sinks + the K - 4 most recent tokens) and `h2o` (K/2
  heavy hitters + K/2 recent tokens), the recycled paper's baselines: dense prefill, K-token
  decode; K = length / 8 by default (`streaming.k`, `streaming.sink`, `h2o.k`).

Decode-time methods (`Method.decode_only`) leave the prompt's prefill dense: the evaluation
teacher-forces their answer NLL through their decode path, and their reported density is the KV
read per decode step, K / length.

Plugging a method in (settings come from `AttentionConfig.options`, on the evaluation's command
line `--method-opt METHOD.KEY=VALUE`):

    register_method(Method(
        "mine", "my sparse decoding", lambda ac, n: MyAttention(k=ac.option("mine", "k",
        n // 8, int)), kv_density=lambda ac, n: 1 / 8, decode_only=True))

Implementations (`AttentionConfig.impl`):
- 'masked' (the default on CPU): `MaskedAttention` (`moa_jax.models.masked_attention`), exact
  masks computed with the jnp reference in query chunks: what a plan keeps, not how fast a
  kernel runs. The decode methods use the jnp oracles of their kernels.
- 'native' (the default on GPU/TPU): the library's backends with their Pallas kernels.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
from jax.sharding import Mesh

from moa_jax.config import ModelConfig
from moa_jax.models.attention import Attention, DenseAttention
from moa_jax.models.dense_attention import TrainDenseAttention
from moa_jax.models.masked_attention import MaskedAttention
from moa_jax.models.recycled_train_attention import RecycledTrainAttention
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


# ----------------------------------------------------------------------------- configs
@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Run-wide inputs of the method builders.

    Args:
      config: the model's config.
      plan: the MoA plan, or None.
      density: KV density of `uniform` when there is no plan to match.
      sink: sink tokens of `uniform`.
      impl: 'auto' | 'masked' | 'native' (see the module docstring).
      q_chunk: query chunk of the masked implementation.
      kernel_backend: Pallas backend of the native kernels: 'auto' | 'gpu' | 'mgpu' | 'tpu' |
        'reference' (see `moa_jax.pallas_kernels.sparse_attention`).
      interpret: Pallas interpret mode (None: automatic, True off the kernel's platform).
      block: cache padding granularity of the head-major caches (None: the default).
      num_splits: GPU split-K factor of the decode kernels (None: automatic).
      mesh: device mesh the backend's kernels run on (None: one device).
      options: method-specific settings as 'method.key' -> string (the evaluation's
        `--method-opt`), e.g. {'recycled.k': '2048', 'recycled.s': '10'}; `option()` reads them.
    """

    config: ModelConfig
    plan: Plan | None = None
    density: float = 0.5
    sink: int = 64
    impl: str = "auto"
    q_chunk: int = 512
    kernel_backend: str = "auto"
    interpret: bool | None = None
    block: int | None = None
    num_splits: int | None = None
    mesh: Mesh | None = None
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
        )

    def backend_for_plan(self, plan: Plan, length: int) -> Attention:
        """`plan` resolved at `length`: exact masks (masked) or the MoA kernels (native)."""
        plan.validate(self.config)
        if self.resolved_impl == "masked":
            return MaskedAttention.for_plan(plan, length, self.q_chunk)
        from moa_jax.models.moa_attention import MoAAttention

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
        implementation yet.
      kv_density: (AttentionConfig, length) -> kept KV / length (for reports).
      requires: (AttentionConfig) -> None when the method can run, else the reason it cannot.
      decode_only: the method changes decoding only (dense prefill).
      cache: the decode part's cache type, by name (documentation and reports).
      train: (AttentionConfig, TrainAttentionConfig, seq_len) -> the training backend; None when
        the method has no training form.
    """

    name: str
    description: str
    build: Callable[[AttentionConfig, int], Attention] | None
    kv_density: Callable[[AttentionConfig, int], float] | None = None
    requires: Callable[[AttentionConfig], str | None] | None = None
    decode_only: bool = False
    cache: str = ""
    train: Callable[[AttentionConfig, TrainAttentionConfig, int], Attention] | None = None

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
        trainable = sorted(n for n, x in METHODS.items() if x.train is not None)
        raise ValueError(f"method {m.name!r} has no training form; trainable: {trainable}")
    backend = m.train(ac, tc, int(seq_len))
    return backend.on_mesh(ac.mesh) if ac.mesh is not None else backend


# ----------------------------------------------------------------------------- built in
def _dense_build(ac: AttentionConfig, length: int) -> Attention:
    if ac.resolved_impl == "masked":
        return MaskedAttention(q_chunk=ac.q_chunk)
    return DenseAttention()


def _dense_train(ac: AttentionConfig, tc: TrainAttentionConfig, seq_len: int) -> Attention:
    return TrainDenseAttention(tc.impl, segments=tc.segments)


def _dense_kernel_build(ac: AttentionConfig, length: int) -> Attention:
    from moa_jax.models.head_major_attention import FullCacheAttention

    return FullCacheAttention(**ac.decode_kernel_options)


def _moa_train(ac: AttentionConfig, tc: TrainAttentionConfig, seq_len: int) -> Attention:
    from moa_jax.models.moa_attention import MoAAttention

    return MoAAttention(ac.plan, length=seq_len, kernel_backend=ac.kernel_backend)


def _uniform_density(ac: AttentionConfig, length: int) -> float:
    """The plan's decode-cache density (`uniform.match=cache`, the default: equal memory; with
    GQA a KV head keeps its query heads' largest span) or its mean span over query heads
    (`uniform.match=heads`); `density` without a plan."""
    if ac.plan is None:
        return ac.density
    match = ac.option("uniform", "match", "cache")
    if match == "cache":
        return ac.plan.kv_cache_density(length, ac.config.num_kv_heads)
    if match == "heads":
        return ac.plan.kv_density(length)
    raise ValueError(f"uniform.match must be 'cache' or 'heads', got {match!r}")


def _uniform(ac: AttentionConfig, length: int) -> Plan:
    return uniform_plan(ac.config, length, _uniform_density(ac, length), ac.sink)


def _decode_k(ac: AttentionConfig, method: str, length: int) -> int:
    return ac.option(method, "k", max(8, length // 8), int)


def _recycled(ac: AttentionConfig, length: int) -> Attention:
    from moa_jax.models.recycled_attention import RecycleConfig, RecycledAttention

    stride = ac.option("recycled", "s", "10")
    rc = RecycleConfig(
        k=_decode_k(ac, "recycled", length),
        stride=None if stride in ("none", "None") else int(stride),
        dynamic_threshold=ac.option("recycled", "threshold", None, float),
    )
    prefill = ac.option("recycled", "prefill", "dense")
    if prefill not in ("dense", "plan"):
        raise ValueError(f"recycled.prefill must be 'dense' or 'plan', got {prefill!r}")
    if prefill == "plan":
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
    from moa_jax.models.eviction_attention import StreamingAttention

    return StreamingAttention(
        _decode_k(ac, "streaming", length),
        sink=ac.option("streaming", "sink", 4, int),
        **ac.decode_kernel_options,
    )


def _h2o(ac: AttentionConfig, length: int) -> Attention:
    from moa_jax.models.eviction_attention import H2OAttention

    return H2OAttention(_decode_k(ac, "h2o", length), **ac.decode_kernel_options)


def _decode_method(
    name: str,
    description: str,
    build: Callable[[AttentionConfig, int], Attention],
    cache: str,
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
    )


def _needs_plan(ac: AttentionConfig) -> str | None:
    return None if ac.plan is not None else "needs --plan FILE"


for _m in (
    Method(
        "dense",
        "full causal attention",
        _dense_build,
        kv_density=lambda ac, n: 1.0,
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
        lambda ac, n: ac.backend_for_plan(ac.plan, n),
        kv_density=lambda ac, n: ac.plan.kv_density(n),
        requires=_needs_plan,
        cache="SpanKVCache",
        train=_moa_train,
    ),
    Method(
        "uniform",
        "StreamingLLM-style: one window + sinks for every head, matched KV density",
        lambda ac, n: ac.backend_for_plan(_uniform(ac, n), n),
        kv_density=lambda ac, n: _uniform(ac, n).kv_density(n),
        cache="SpanKVCache",
    ),
    _decode_method(
        "recycled",
        "Recycled Attention decoding: dense prefill, K = L/8 recycled tokens, full step "
        "every S = 10",
        _recycled,
        "RecycledKVCache",
        train=_recycled_train,
    ),
    _decode_method(
        "streaming",
        "StreamingLLM decoding: dense prefill, 4 sinks + K - 4 recent tokens, K = L/8",
        _streaming,
        "SelectedKVCache",
    ),
    _decode_method(
        "h2o",
        "H2O decoding: dense prefill, K/2 heavy hitters + K/2 recent tokens, K = L/8",
        _h2o,
        "SelectedKVCache",
    ),
):
    register_method(_m)
