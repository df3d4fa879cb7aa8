"""MoA compression plans: per (layer, query head) elastic span rules and sinks.

A plan holds, for every layer l and query head h, an elastic rule

    span(N) = alpha[l][h] + beta[l][h] * N,   clipped to [0, N],

and a sink count `sink[l][h]` (the first `sink` tokens every query may see). As in the MoA reference
(thu-nics/MoA), the span **includes** the sinks: it is the decode cache footprint of the head, sinks
plus a ring of the most recent tokens.

From span to kernel window
--------------------------
The kernels implement the per-head mask

    query i sees key j  iff  j <= i  and  (i - j < w  or  j < sink)

(`moa_jax.pallas_kernels.reference.window_sink_mask`). `Plan.resolve(N)` maps a span to `w` exactly
as the reference sizes its cache:

    C = granularity * ceil(max(span, min_span) / granularity)   # cache slots (ref.: g=64, min 128)
    w = N                    if C >= N          (the head is dense: canonical form)
    w = max(C - sink, 1)     otherwise          (sink slots + a ring of C - sink recent tokens)

so with the reference defaults (granularity 64, min_span 128, sink 64) a query sees the 64 sink
tokens plus the `C - 64` most recent tokens including itself: the prefill mask equals what the
decode cache holds. (The reference's prefill works on whole 64-blocks, i.e. the window is
block-aligned there; ours slides per token, with the same number of keys per query once the
query is past the first window.) With `granularity=1, min_span=0` the span is used as is (rounded
up to an integer). `w` is always in [1, N]; `w == N` means dense.

The model's own sliding window
------------------------------
A model may attend within its own sliding window (`ModelConfig.model_window(layer)`: Mistral's
and Qwen2's `sliding_window`, W tokens a query sees, itself included). A plan never widens it:
on a layer with model window W every head runs with

    sink = 0   and   window = min(w', W)

where w' is the window the head's span resolves to with its sinks counted as 0 (the span's C
cache slots all go to the ring: w' = N if C >= N, else max(C, 1)). The plan's sink tokens sit at
the start of the sequence, outside the model's window once the sequence passes W, so their
slots go to the ring instead; the head then sees at most the smaller of its span and the
model's window. `Plan.within_model_window(cfg)` is the plan composed with the model's windows
(a per-layer cap, `model_windows`, part of equality and hashing but not of the saved JSON);
`resolve`, `sink_array` / `layer_sinks` and everything derived from them (densities, the
schedule, hence the span cache and the kernels) apply it. A layer without a model window is
unchanged. `moa_jax.methods.AttentionConfig` composes its plan once, so every method runs the
composed plan; the `dense` method on a windowed model is the dense plan composed the same way
(window min(N, W): the span cache keeps W slots, Mistral's rolling buffer).

Densities (METHODS.md)
----------------------
- `kv_density(N)`: kept KV / N, the decode cache footprint at length N; for one head
  `|{j < sink} ∪ {N - w <= j < N}| / N`. This is what budgets, the reference plans and the paper's
  "50%" mean.
- `attention_density(N)`: the exact fraction of the N(N+1)/2 causal (query, key) entries kept, sinks
  included; prefill work follows this one.

Files
-----
- `Plan.from_moa_json(path)`: the reference format `{"alphas": [[...]], "betas": [[...]]}`
  ([layer][query head]), loaded unchanged. It carries no sink count: the reference's MoA plans use
  64 sinks, its StreamingLLM plans (same format, every head alpha 0, beta 0.5) keep 4; the loader
  picks 4 when the file name contains "streamingllm" and 64 otherwise, unless `sink=` is given.
- `Plan.save(path)`: our own JSON with `schema_version`, sinks, resolution parameters and a
  metadata dict.
- `Plan.load(spec)`: the one loader every command calls: either file format, or the
  command-line specs 'dense' and 'streaming:WINDOW[:SINK]'.

The model a plan is for
-----------------------
A plan the profile writes records the model it was searched on: `metadata.model_family` and
`metadata.model_shape` (`ModelConfig.shape_summary`: family, num_layers, num_heads,
num_kv_heads, head_dim; `model_metadata(cfg)` gives both). `Plan.validate(cfg)`, which every
command calls against the model's config (`registry.load_config`, before the weights load),
refuses a plan recorded for another family or shape in one line naming both; plans without
these keys (the reference plans, older plans) are checked on their layer and head counts.

Plans are frozen dataclasses of tuples, hashable, so they can be static `jit` arguments (the
metadata dict is excluded from hashing and equality). `Plan.schedule(N, layer, num_kv_heads)`
resolves one layer into the `MoASchedule` (windows, sinks, ring sizes, cache layout, decode work
list) that the span cache and the decode kernels share.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moa_jax.domains import NON_NEGATIVE, POSITIVE, Choice, Domain, Float
from moa_jax.errors import PlanError
from moa_jax.files import atomic_write_text
from moa_jax.pallas_kernels.caches.schedule import MoASchedule

SCHEMA_VERSION = 1
FORMAT_NAME = "moa-jax-plan"
REFERENCE_SINK = 64
STREAMINGLLM_SINK = 4


_NUMBER = Float()
_COUNT = NON_NEGATIVE


def _cell(value: Any, domain: Domain, where: str) -> Any:
    try:
        return domain.check(value.item() if isinstance(value, np.generic) else value)
    except ValueError as e:
        raise PlanError(f"plan {where} {e}") from None


def _rows(x: Any, name: str) -> list:
    if isinstance(x, np.ndarray):
        x = x.tolist()
    if isinstance(x, (str, bytes, Mapping)) or not isinstance(x, Sequence):
        raise PlanError(f"plan {name} must be a list of rows [layer][head], got {x!r:.60}")
    return list(x)


def _as_2d_tuple(x: Any, domain: Domain, name: str) -> tuple[tuple, ...]:
    """`x` as a [layer][head] tuple of tuples, every entry in `domain`; `PlanError` naming the
    entry otherwise."""
    rows = []
    for i, row in enumerate(_rows(x, name)):
        row = _rows(row, f"{name}[{i}]")
        rows.append(tuple(_cell(v, domain, f"{name}[{i}][{j}]") for j, v in enumerate(row)))
    if not rows or not rows[0]:
        raise PlanError(f"plan {name} is empty")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise PlanError(f"plan {name} is ragged: rows of lengths {sorted(widths)}")
    return tuple(rows)


def _broadcast_2d(x: Any, shape: tuple[int, int], domain: Domain, name: str) -> tuple[tuple, ...]:
    """`x` (one value, one per head, or [layer][head]) broadcast to `shape`."""
    if isinstance(x, np.ndarray):
        x = x.tolist()
    if not isinstance(x, (list, tuple)):
        x = [[_cell(x, domain, name)] * shape[1]] * shape[0]
    elif x and not isinstance(x[0], (list, tuple, np.ndarray)) and len(x) == shape[1]:
        x = [list(x)] * shape[0]
    rows = _as_2d_tuple(x, domain, name)
    if (len(rows), len(rows[0])) != shape:
        raise PlanError(f"plan {name} has shape {(len(rows), len(rows[0]))}, expected {shape}")
    return rows


PLAN_KEYS: dict[str, Domain | None] = {
    "format": Choice(FORMAT_NAME),
    "schema_version": POSITIVE,
    "num_layers": POSITIVE,
    "num_heads": POSITIVE,
    "granularity": POSITIVE,
    "min_span": NON_NEGATIVE,
    "alphas": None,  # [layer][head] arrays: checked entry by entry
    "betas": None,
    "sinks": None,
    "metadata": None,
}
"""The keys of a plan file in our format, with their domains (`Plan.from_dict`)."""
REFERENCE_KEYS = ("alphas", "betas")
"""The keys of a reference MoA plan file (`Plan.from_moa_json`)."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per (layer, query head) elastic rule `span(N) = alpha + beta * N` and sink count.

    Attributes:
      alphas, betas: float [L][H] as nested tuples.
      sinks: int [L][H] sink tokens per head (inside the span, see module docstring).
      granularity: span rounding in tokens (reference: 64).
      min_span: smallest span before rounding (reference: 128).
      metadata: free-form dict (model name, source, density budget, profile lengths, the
        model family and shape it was searched for, ...); not part of equality or the hash.
      origin: the file the plan was loaded from (`Plan.load`), for messages; not saved, not
        part of equality or the hash.
      model_windows: None for the plan on its own; for the plan composed with a model's own
        sliding windows (`within_model_window`, module docstring), per layer the model's
        window (None where a layer has none). Part of equality and the hash, not of the saved
        JSON.
    """

    alphas: tuple[tuple[float, ...], ...]
    betas: tuple[tuple[float, ...], ...]
    sinks: tuple[tuple[int, ...], ...]
    granularity: int = 64
    min_span: int = 128
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)
    origin: str | None = dataclasses.field(default=None, compare=False, hash=False, repr=False)
    model_windows: tuple[int | None, ...] | None = None

    def __post_init__(self):
        alphas = _as_2d_tuple(self.alphas, _NUMBER, "alphas")
        shape = (len(alphas), len(alphas[0]))
        betas = _broadcast_2d(self.betas, shape, _NUMBER, "betas")
        sinks = _broadcast_2d(self.sinks, shape, _COUNT, "sinks")
        object.__setattr__(self, "alphas", alphas)
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "sinks", sinks)
        if self.metadata is not None and not isinstance(self.metadata, Mapping):
            raise PlanError(f"plan metadata must be an object, got {self.metadata!r:.60}")
        object.__setattr__(self, "metadata", dict(self.metadata or {}))
        object.__setattr__(self, "granularity", _cell(self.granularity, POSITIVE, "granularity"))
        object.__setattr__(self, "min_span", _cell(self.min_span, _COUNT, "min_span"))
        if self.model_windows is not None:
            caps = tuple(None if w is None else int(w) for w in self.model_windows)
            if len(caps) != len(alphas):
                raise ValueError(f"{len(caps)} model windows for a plan of {len(alphas)} layers")
            if any(w is not None and w < 1 for w in caps):
                raise ValueError(f"model windows must be >= 1 or None, got {caps}")
            object.__setattr__(
                self, "model_windows", None if all(w is None for w in caps) else caps
            )
        for layer, (ra, rb) in enumerate(zip(alphas, betas)):
            for head, (a, b) in enumerate(zip(ra, rb)):
                if b <= 0 and a + b < 0:  # alpha + beta * N < 0 for every N >= 1
                    raise ValueError(
                        f"layer {layer} head {head}: span {a:g} + {b:g} * N is negative at "
                        f"every length (a rule that keeps nothing)"
                    )

    # ------------------------------------------------------------------ shape
    @property
    def num_layers(self) -> int:
        return len(self.alphas)

    @property
    def num_heads(self) -> int:
        return len(self.alphas[0])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_layers, self.num_heads)

    def sink_array(self) -> np.ndarray:
        """int [L, H] sink counts the heads run with: 0 on a layer with a model window
        (`within_model_window`)."""
        s = np.asarray(self.sinks, dtype=np.int64)
        if self.model_windows is not None:
            s = np.where(self._capped()[:, None], 0, s)
        return s

    # ------------------------------------------------------------ model window
    def within_model_window(self, cfg) -> Plan:
        """This plan composed with the model's own sliding windows (`ModelConfig.model_window`):
        on a windowed layer every head runs with sink 0 and window min(w', W) (module
        docstring). A model without a window gives the plan without caps."""
        caps = tuple(cfg.model_window(layer) for layer in range(cfg.num_layers))
        if all(w is None for w in caps):
            return (
                self
                if self.model_windows is None
                else dataclasses.replace(self, model_windows=None)
            )
        if cfg.num_layers != self.num_layers:
            raise ValueError(
                f"plan has {self.num_layers} layers but the model has {cfg.num_layers}"
            )
        return dataclasses.replace(self, model_windows=caps)

    def _capped(self) -> np.ndarray:
        """bool [L]: layers with a model window."""
        caps = self.model_windows or (None,) * self.num_layers
        return np.asarray([w is not None for w in caps])

    def _cap_windows(self, win: np.ndarray, n: int) -> np.ndarray:
        """win [L, H] capped at each layer's model window."""
        if self.model_windows is None:
            return win
        cap = np.asarray([n if w is None else w for w in self.model_windows], np.int64)
        return np.minimum(win, cap[:, None])

    # --------------------------------------------------------------- resolve
    def spans(self, n: int) -> np.ndarray:
        """float [L, H]: alpha + beta * n clipped to [0, n] (before rounding)."""
        a = np.asarray(self.alphas, np.float64)
        b = np.asarray(self.betas, np.float64)
        return np.clip(a + b * n, 0.0, float(n))

    def resolve(
        self, n: int, *, granularity: int | None = None, min_span: int | None = None
    ) -> np.ndarray:
        """int64 [L, H] kernel windows (tokens, in [1, n]; n means dense) at input length n.

        See the module docstring for the exact span -> (window, sink) mapping, and for the cap
        on a layer with a model window (`within_model_window`).
        """
        n = int(n)
        if n < 1:
            raise ValueError(f"input length must be >= 1, got {n}")
        g = self.granularity if granularity is None else int(granularity)
        lo = self.min_span if min_span is None else int(min_span)
        span = self.spans(n)
        # Round to integers before the ceil so that float noise (e.g. 0.1 * n) does not add a block.
        span = np.ceil(np.round(span, 6)).astype(np.int64)
        cache = g * -(-np.maximum(span, lo) // g)
        win = np.maximum(cache - self.sink_array(), 1)
        win = np.where(cache >= n, n, np.minimum(win, n))
        return self._cap_windows(win, n).astype(np.int64)

    def layer_windows(self, n: int, layer: int) -> tuple[int, ...]:
        """The windows of one layer at length n as a hashable tuple (a static kernel argument)."""
        return tuple(int(w) for w in self.resolve(n)[layer])

    def layer_sinks(self, layer: int) -> tuple[int, ...]:
        """The sinks of one layer's heads as a hashable tuple (0 under a model window)."""
        return tuple(int(s) for s in self.sink_array()[layer])

    def schedule(
        self,
        n: int,
        layer: int,
        num_kv_heads: int,
        *,
        max_len: int | None = None,
        block: int = 64,
        shards: int = 1,
    ) -> MoASchedule:
        """One layer resolved at length n as the static value the span cache and the decode
        kernels share: windows and sinks per query head, ring per KV head, cache layout and
        kernel tables, for sequences of up to `max_len` tokens (default n), the cache in
        `block`-slot blocks packed for `shards` head groups (see `MoASchedule`)."""
        return MoASchedule.build(
            self.layer_windows(n, layer),
            self.layer_sinks(layer),
            num_kv_heads,
            int(n if max_len is None else max_len),
            block=block,
            shards=shards,
        )

    # -------------------------------------------------------------- densities
    def kept_kv(self, n: int) -> np.ndarray:
        """int64 [L, H]: keys the last query of a length-n input sees (the cache footprint)."""
        w = np.minimum(self.resolve(n), n)
        s = np.minimum(self.sink_array(), n)
        return w + np.minimum(s, n - w)

    def kv_density(self, n: int, *, per_head: bool = False):
        """Kept KV / n (METHODS.md's density): mean over heads, or [L, H] with per_head=True."""
        d = self.kept_kv(n) / float(n)
        return d if per_head else float(d.mean())

    def kv_cache_density(self, n: int, num_kv_heads: int) -> float:
        """Size of a span cache relative to a dense one at length n: with GQA each KV head keeps
        the largest footprint among its query heads (block rounding aside)."""
        return kv_group_max_mean(self.kept_kv(n), num_kv_heads) / n

    def kept_entries(self, n: int) -> np.ndarray:
        """int64 [L, H]: exact number of kept (i, j) entries of the causal n x n mask."""
        return kept_entries(self.resolve(n), self.sink_array(), n)

    def attention_density(self, n: int, *, per_head: bool = False):
        """Fraction of the n(n+1)/2 causal entries kept (sinks included), exact."""
        d = self.kept_entries(n) / (n * (n + 1) / 2)
        return d if per_head else float(d.mean())

    # ------------------------------------------------------------ validation
    def searched_for(self) -> dict[str, Any] | None:
        """The model family and shape the plan records it was searched for
        (`metadata.model_shape`, with `metadata.model_family`), or None for a plan that
        records neither (reference plans, older plans). A malformed record is a PlanError."""
        shape = self.metadata.get("model_shape")
        family = self.metadata.get("model_family")
        if shape is None and family is None:
            return None
        out: dict[str, Any] = {}
        if shape is not None:
            if not isinstance(shape, Mapping):
                raise PlanError(
                    f"{self._label()}: metadata.model_shape must be an object, got {shape!r}"
                )
            for key, val in shape.items():
                if key == "family":
                    out[key] = str(val)
                    continue
                try:
                    out[key] = int(val)
                except (TypeError, ValueError):
                    raise PlanError(
                        f"{self._label()}: metadata.model_shape.{key} must be an integer, "
                        f"got {val!r}"
                    ) from None
        if family is not None:
            if "family" in out and out["family"] != str(family):
                raise PlanError(
                    f"{self._label()}: metadata.model_family {family!r} contradicts "
                    f"metadata.model_shape.family {out['family']!r}"
                )
            out["family"] = str(family)
        return out

    def validate(self, cfg) -> Plan:
        """Checks the plan against a `ModelConfig` (cheap: every command calls it with the
        config of `registry.load_config`, before the weights load).

        A plan that records the model it was searched for (`searched_for`) must be for the
        same family and shape (`ModelConfig.shape_summary`); any plan must have the model's
        layer and query-head counts. Raises PlanError (a ValueError) in one line naming the
        plan, what it is for and the model."""
        recorded = self.searched_for()
        if recorded is not None:
            model = cfg.shape_summary
            if any(recorded[k] != model[k] for k in recorded if k in model):
                raise PlanError(
                    f"{self._label()} was searched for {describe_shape({**model, **recorded})} "
                    f"but the model is {describe_shape(model)}"
                )
        errors = []
        if self.num_layers != cfg.num_layers:
            errors.append(f"plan has {self.num_layers} layers but the model has {cfg.num_layers}")
        if self.num_heads != cfg.num_heads:
            errors.append(
                f"plan has {self.num_heads} query heads per layer but the model has {cfg.num_heads}"
            )
        if errors:
            raise PlanError(f"{self._label()} does not fit the model: " + "; ".join(errors))
        return self

    def _label(self) -> str:
        """How messages name the plan: its file, else its source, with the model it names."""
        where = self.origin or self.metadata.get("source")
        model = self.metadata.get("model")
        label = f"plan {where}" if where else "plan"
        if model and str(model) != str(where):
            label += f" (for {model})"
        return label

    # ---------------------------------------------------------- constructors
    @classmethod
    def uniform(
        cls,
        num_layers: int,
        num_heads: int,
        window: int,
        sink: int = 0,
        metadata: Mapping[str, Any] | None = None,
    ) -> Plan:
        """Every head: a window of exactly `window` tokens plus `sink` sinks, at every length."""
        _cell(window, POSITIVE, "window")
        _cell(sink, NON_NEGATIVE, "sink")
        shape = (num_layers, num_heads)
        return cls(
            alphas=np.full(shape, float(window + sink)).tolist(),
            betas=0.0,
            sinks=sink,
            granularity=1,
            min_span=0,
            metadata={"source": "uniform", "window": window, "sink": sink, **(metadata or {})},
        )

    @classmethod
    def dense(
        cls, num_layers: int, num_heads: int, metadata: Mapping[str, Any] | None = None
    ) -> Plan:
        """Every head dense (span = N, no sinks): the model's own attention."""
        shape = (num_layers, num_heads)
        return cls(
            alphas=np.zeros(shape).tolist(),
            betas=1.0,
            sinks=0,
            granularity=1,
            min_span=0,
            metadata={"source": "dense", **(metadata or {})},
        )

    @classmethod
    def from_windows(
        cls,
        windows: Sequence[Sequence[int]],
        sinks: Any = 0,
        metadata: Mapping[str, Any] | None = None,
    ) -> Plan:
        """Fixed per-head windows (beta 0): resolve(N) gives exactly these (capped at N)."""
        w = np.asarray(windows, np.int64)
        s = np.broadcast_to(np.asarray(sinks, np.int64), w.shape)
        if (w < 1).any():
            raise ValueError("windows must be >= 1")
        return cls(
            alphas=(w + s).astype(float).tolist(),
            betas=0.0,
            sinks=s.tolist(),
            granularity=1,
            min_span=0,
            metadata={"source": "windows", **(metadata or {})},
        )

    # ----------------------------------------------------------------- files
    @classmethod
    def from_moa_json(
        cls, path: str | Path, *, sink: int | None = None, metadata: Mapping[str, Any] | None = None
    ) -> Plan:
        """Loads a reference `moa_alpha_beta.json` ({"alphas": [[..]], "betas": [[..]]})."""
        path = Path(path)
        d = _read_json(path)
        if not isinstance(d, dict) or "alphas" not in d or "betas" not in d:
            raise PlanError(f"{path} is not a MoA plan: expected keys 'alphas' and 'betas'")
        unknown = sorted(set(d) - set(REFERENCE_KEYS))
        if unknown:
            raise PlanError(
                f"{path}: unknown key(s) {unknown} in a reference MoA plan (alphas, betas)"
            )
        if sink is not None:
            _cell(sink, NON_NEGATIVE, "sink")
        streaming = "streamingllm" in path.name.lower()
        if sink is None:
            sink = STREAMINGLLM_SINK if streaming else REFERENCE_SINK
        alphas = _as_2d_tuple(d["alphas"], _NUMBER, "alphas")
        betas = _as_2d_tuple(d["betas"], _NUMBER, "betas")
        if (len(alphas), len(alphas[0])) != (len(betas), len(betas[0])):
            raise ValueError(
                f"{path}: alphas are {len(alphas)}x{len(alphas[0])} but betas are "
                f"{len(betas)}x{len(betas[0])}"
            )
        name = path.name
        for suffix in (".json", ".moa", ".streamingllm"):
            name = name.removesuffix(suffix)
        meta = {
            "source": str(path),
            "format": "moa-reference",
            "kind": "streamingllm" if streaming else "moa",
            "model": name.replace("--", "/"),
            "sink": int(sink),
        }
        meta.update(metadata or {})
        return cls(
            alphas=alphas, betas=betas, sinks=int(sink), granularity=64, min_span=128, metadata=meta
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "granularity": self.granularity,
            "min_span": self.min_span,
            "alphas": [list(r) for r in self.alphas],
            "betas": [list(r) for r in self.betas],
            "sinks": [list(r) for r in self.sinks],
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        """A plan from our JSON format (`to_dict`): the keys of `PLAN_KEYS` only, each in its
        domain; `PlanError` naming the key otherwise (an unknown key is a typo or a newer
        format, never ignored)."""
        if not isinstance(d, Mapping):
            raise PlanError(f"a plan must be a JSON object, not {type(d).__name__}")
        version = d.get("schema_version")
        if version is None:
            if "alphas" in d and "betas" in d and "sinks" not in d:
                raise PlanError("this looks like a reference MoA plan: use Plan.from_moa_json")
            raise PlanError("plan JSON has no schema_version")
        unknown = sorted(set(d) - set(PLAN_KEYS))
        if unknown:
            raise PlanError(
                f"plan JSON has unknown key(s) {unknown}; a plan holds {', '.join(PLAN_KEYS)}"
            )
        for key, domain in PLAN_KEYS.items():
            if domain is not None and key in d:
                _cell(d[key], domain, key)
        if version > SCHEMA_VERSION:
            raise PlanError(
                f"plan schema_version {version} is newer than this moa-jax understands "
                f"({SCHEMA_VERSION})"
            )
        missing = [k for k in ("alphas", "betas", "sinks") if k not in d]
        if missing:
            raise PlanError(f"plan JSON is missing {missing}")
        plan = cls(
            alphas=d["alphas"],
            betas=d["betas"],
            sinks=d["sinks"],
            granularity=d.get("granularity", 64),
            min_span=d.get("min_span", 128),
            metadata=d.get("metadata") or {},
        )
        for key, val in (("num_layers", plan.num_layers), ("num_heads", plan.num_heads)):
            if key in d and d[key] != val:
                raise PlanError(f"plan JSON says {key}={d[key]} but its arrays have {val}")
        return plan

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(
        cls, spec: str | Path, num_layers: int | None = None, num_heads: int | None = None
    ) -> Plan:
        """The one plan loader: a plan file (our JSON with `schema_version`, or the reference
        `{"alphas", "betas"}`) or a spec: 'dense' (every head keeps every token) or
        'streaming:WINDOW[:SINK]' (one window for every head, StreamingLLM-style; sink default
        4). The specs build a plan of `num_layers` x `num_heads` heads, which they then need."""
        text = str(spec)
        if text == "dense" or text.startswith("streaming:"):
            if num_layers is None or num_heads is None:
                raise PlanError(f"plan spec {text!r} needs the model's layer and head counts")
            if text == "dense":
                return cls.dense(num_layers, num_heads)
            parts = text.split(":")[1:]
            if len(parts) not in (1, 2):
                raise PlanError(f"bad plan spec {text!r}; expected streaming:WINDOW[:SINK]")
            fields = [("WINDOW", POSITIVE), ("SINK", NON_NEGATIVE)]
            values = []
            for (name, domain), part in zip(fields, parts):
                try:
                    values.append(domain.parse(part))
                except ValueError as e:
                    raise PlanError(
                        f"bad plan spec {text!r}: {name} {e}; expected streaming:WINDOW[:SINK]"
                    ) from None
            window, sink = values if len(values) == 2 else (values[0], STREAMINGLLM_SINK)
            return cls.uniform(
                num_layers, num_heads, window=window, sink=sink, metadata={"source": "streamingllm"}
            )
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"no plan file at {path}")
        d = _read_json(path)
        if not isinstance(d, dict):
            raise PlanError(f"plan file {path} must hold a JSON object, not a {type(d).__name__}")
        try:
            if "schema_version" not in d and "alphas" in d:
                plan = cls.from_moa_json(path)
            else:
                plan = cls.from_dict(d)
        except (ValueError, TypeError, KeyError, IndexError, OverflowError) as e:
            if str(path) in str(e):
                raise
            raise PlanError(f"plan file {path}: {e}") from None
        return dataclasses.replace(plan, origin=str(path))

    def summary(self, n: int) -> str:
        w = self.resolve(n)
        return (
            f"Plan {self.num_layers}x{self.num_heads} at N={n}: windows {int(w.min())}.."
            f"{int(w.max())} (mean {w.mean():.0f}), kv density {self.kv_density(n):.3f}, "
            f"attention density {self.attention_density(n):.3f}"
        )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlanError(f"plan file {path} is not valid JSON (truncated?): {e}") from None


def model_metadata(cfg) -> dict[str, Any]:
    """What a plan records of the model it is searched for (`Plan.searched_for`, checked by
    `Plan.validate`): `model_family` and `model_shape` (`ModelConfig.shape_summary`)."""
    return {"model_family": cfg.family, "model_shape": dict(cfg.shape_summary)}


def describe_shape(shape: Mapping[str, Any]) -> str:
    """A model shape (`ModelConfig.shape_summary`) in words: 'qwen2 28 layers x 28 heads
    (4 KV heads, head_dim 128)'."""
    text = f"{shape.get('family', '?')} {shape.get('num_layers', '?')} layers x "
    text += f"{shape.get('num_heads', '?')} heads"
    extra = []
    if "num_kv_heads" in shape:
        extra.append(f"{shape['num_kv_heads']} KV heads")
    if "head_dim" in shape:
        extra.append(f"head_dim {shape['head_dim']}")
    return text + (f" ({', '.join(extra)})" if extra else "")


def kv_group_max_mean(per_head: Any, num_kv_heads: int) -> float:
    """Mean over layers and KV heads of the largest of a per-query-head quantity [L, H] (kept
    KV, or kept KV / N) among the query heads sharing each KV head: a GQA span cache's size
    (relative to a dense cache for a density)."""
    x = np.asarray(per_head, np.float64)
    L, H = x.shape
    if num_kv_heads < 1 or H % num_kv_heads:
        raise ValueError(f"{H} query heads do not split over {num_kv_heads} KV heads")
    return float(x.reshape(L, num_kv_heads, H // num_kv_heads).max(-1).mean())


def kept_entries(windows: Any, sinks: Any, n: int) -> np.ndarray:
    """Exact kept entries of the causal n x n mask per head (int64, broadcasting windows/sinks).

    Row i keeps min(i + 1, w) window keys plus the sinks left of the window,
    max(0, min(s, i - w + 1)).
    """
    w = np.minimum(np.asarray(windows, np.int64), n)
    s = np.minimum(np.asarray(sinks, np.int64), n)
    w, s = np.broadcast_arrays(w, s)
    win = w * (w + 1) // 2 + (n - w) * w
    m = n - w  # rows whose window leaves keys 0 .. i - w uncovered
    sink = np.where(m <= s, m * (m + 1) // 2, s * (s + 1) // 2 + (m - s) * s)
    return win + sink
