"""One dispatcher per kernel operation, each over a table of implementations in fallback order.

Operations: prefill (`sparse_attention`), span decode over a MoA `SpanKVCache` (`span_decode`)
and head-major decode over the dense / recycled / K-slot caches (`full_step_decode`,
`recycled_decode`). Every operation takes `backend=` with the same names:

  'mgpu' (Mosaic GPU, sm90+), 'gpu' (Triton), 'tpu' (Mosaic TPU / splash), 'reference' (jnp),
  or 'auto'.

An operation's `IMPLEMENTATIONS` table lists its implementations in that order. A request runs
the first implementation, from the requested one down the table, that supports the case
(platform, dtype, head dim, block sizes, interpret mode); when it is not the requested one, the
reason is logged once (`logging` at INFO). So 'mgpu' runs the Mosaic GPU prefill where it can
and the Triton kernels elsewhere (decode has no Mosaic GPU kernel), and the jnp reference,
last in every table, runs any case. 'auto' walks the whole table but takes on a GPU or TPU only
that platform's kernels (and the reference), and on a machine with neither the first kernel
that runs in interpret mode (Triton).

Platform and interpret defaults come from one helper (`resolve_interpret`): interpret mode when
asked for, else exactly when the kernel's platform is not this machine's.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from moa_jax.domains import (
    FLAG,
    NON_NEGATIVE,
    POSITIVE,
    POWER_OF_TWO,
    Choice,
    Float,
    check_int_array,
    checked,
)
from moa_jax.errors import ArrayError, ConfigError
from moa_jax.pallas_kernels import heuristics, reference
from moa_jax.pallas_kernels.caches.span import SpanKVCache
from moa_jax.pallas_kernels.checks import (
    HEAD_MAJOR_LAYOUT,
    PREFILL_LAYOUT,
    SPAN_LAYOUT,
    array_shape,
    check_qkv,
    one_float_dtype,
    per_head,
    same_size,
)
from moa_jax.pallas_kernels.decode import head_major_tpu, head_major_triton, span_tpu, span_triton
from moa_jax.pallas_kernels.prefill import mosaic_gpu, tpu, triton

logger = logging.getLogger(__name__)

# Every name a caller may pass, the implementations in fallback order after 'auto'.
BACKENDS = ("auto", "mgpu", "gpu", "tpu", "reference")
_ORDER = BACKENDS[1:]


# ------------------------------------------------------------------------------ platform
_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("target", default=None)


def platform() -> str:
    """The kernel platform traced for: 'gpu', 'tpu' or 'cpu' (no Pallas compiler); this
    machine's, or the one `lowering_for` names."""
    target = _TARGET.get()
    if target is not None:
        return target
    p = jax.default_backend()
    return "gpu" if p in ("gpu", "cuda", "rocm") else p if p == "tpu" else "cpu"


@contextlib.contextmanager
def lowering_for(target: str) -> Iterator[None]:
    """Inside, the dispatchers choose as on a `target` machine ('gpu' or 'tpu'): its compiled
    kernels, never interpret mode. For lowering a program for that platform from another one
    (`jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`); the Mosaic GPU kernel still
    needs an sm90+ GPU here to be chosen. It acts when a function is traced: a jitted function
    traced before, with the same arguments, keeps the kernels of that trace."""
    if target not in ("gpu", "tpu"):
        raise ConfigError(f"lowering_for: target takes 'gpu' or 'tpu', got {target!r}")
    token = _TARGET.set(target)
    try:
        yield
    finally:
        _TARGET.reset(token)


def resolve_interpret(
    kernel_platform: str | None, interpret: bool | None, here: str | None = None
) -> bool:
    """Interpret mode of a kernel compiled for `kernel_platform`: as requested, else on
    whenever this machine (`here`, default `platform()`) is not that platform."""
    if interpret is not None:
        return bool(interpret)
    return kernel_platform is not None and (here or platform()) != kernel_platform


# ------------------------------------------------------------------------------ tables
@dataclasses.dataclass(frozen=True)
class Case:
    """What implementations decide on: this machine, the inputs and the requested mode."""

    platform: str
    dtype: Any
    head_dim: int
    interpret: bool | None = None
    block_k: int | None = None


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One kernel of an operation.

    Attributes:
      name: the `backend=` name that asks for it.
      platform: the platform its kernel compiles for ('gpu', 'tpu'); None for jnp code.
      run: the operation on this kernel (keyword arguments of the operation's dispatcher, plus
        `interpret` resolved).
      interpretable: whether the kernel has a Pallas interpret mode (runs on any machine).
      check: case -> why this kernel cannot run it (None: it can), beyond platform and mode.
      options: the kernel options it takes (others are dropped when it runs as a fallback).
      compiles_here: whether this machine compiles the kernel (default: it is `platform`), and
        `needs`, what it needs otherwise (for the log).
    """

    name: str
    platform: str | None
    run: Callable[..., Any]
    interpretable: bool = True
    check: Callable[[Case], str | None] | None = None
    options: frozenset[str] = frozenset()
    compiles_here: Callable[[], bool] | None = None
    needs: str = ""

    def unsupported(self, case: Case, auto: bool) -> str | None:
        """Why this implementation does not run `case` (None: it does)."""
        if self.platform is None:
            return None
        on_kernel_machine = case.platform in ("gpu", "tpu")
        if auto and on_kernel_machine and self.platform != case.platform:
            return f"'auto' runs {case.platform} kernels on a {case.platform}"
        interpret = resolve_interpret(self.platform, case.interpret, case.platform)
        if interpret and not self.interpretable:
            return f"it has no interpret mode (this is a {case.platform})"
        why = self.check(case) if self.check is not None else None
        if why is None and not interpret:
            here = self.compiles_here() if self.compiles_here else case.platform == self.platform
            if not here:
                why = f"it needs {self.needs or 'a ' + self.platform} (this is a {case.platform})"
        return why


_logged: set[tuple[str, str, str]] = set()


def _log_once(op: str, backend: str, reason: str) -> None:
    key = (op, backend, reason)
    if key not in _logged:
        _logged.add(key)
        logger.info("%s: %s", op, reason)


def select(
    op: str, table: Mapping[str, Implementation], backend: str, case: Case
) -> Implementation:
    """The implementation of `op` that runs `case` for `backend` (see the module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    auto = backend == "auto"
    first = 0 if auto else _ORDER.index(backend)
    skipped = []
    if not auto and backend not in table:
        skipped.append(f"no {backend!r} kernel")
    for name in _ORDER[first:]:
        impl = table.get(name)
        if impl is None:
            continue
        why = impl.unsupported(case, auto)
        if why is None:
            if skipped and not auto:
                why = "; ".join(skipped)
                _log_once(op, backend, f"{backend!r} requested, {name!r} runs ({why})")
            elif skipped:
                logger.debug("%s: 'auto' runs %r (%s)", op, name, "; ".join(skipped))
            return impl
        skipped.append(f"{name}: {why}")
    raise ValueError(f"{op}: no implementation runs this case ({'; '.join(skipped)})")


def _options(impl: Implementation, backend: str, options: dict) -> dict:
    """Kernel options for `impl`: all of them when it is the one requested (one it does not take
    is an error there), only those it takes when it runs for 'auto' or as a fallback."""
    if impl.name == backend:
        extra = sorted(set(options) - impl.options)
        if extra:
            raise ConfigError(
                f"sparse_attention: the {backend!r} kernel does not take the kernel options "
                f"{extra} (it takes {sorted(impl.options)})"
            )
        return options
    dropped = sorted(set(options) - impl.options)
    if dropped:
        logger.debug("%s does not take %s: dropped", impl.name, dropped)
    return {k: v for k, v in options.items() if k in impl.options}


# ------------------------------------------------------------------------------ argument checks
# Every operation checks its arguments first, before an implementation is chosen, so every
# backend refuses the same inputs (`checks.py`): shapes, dtypes and static values only (the
# abstract values `jit` traces with), so a check costs nothing per call of a jitted function.


_SCALE = Float(0.0, lo_open=True)


def _check_options(op: str, backend: Any, interpret: Any, scale: Any, **sizes: Any) -> None:
    """The options every operation takes; `sizes`: block sizes and num_warps (powers of two),
    num_splits, per_split and num_stages (>= 1), poison (a flag), None for the default."""
    checked(f"{op}: backend", backend, Choice(*BACKENDS))
    checked(f"{op}: interpret", interpret, FLAG, optional=True)
    checked(f"{op}: scale", scale, _SCALE, optional=True)
    for name, value in sizes.items():
        domain = (
            POWER_OF_TWO
            if name.startswith(("block_", "num_warps"))
            else FLAG
            if name == "poison"
            else POSITIVE
        )
        checked(f"{op}: {name}", value, domain, optional=True)


# ------------------------------------------------------------------------------ prefill
def _prefill_mgpu(q, k, v, *, block_q, block_k, interpret, return_lse, **kw):
    del block_q, interpret, return_lse  # fixed query tiles; no interpret mode; lse always
    if block_k is not None:
        kw["block_k"] = int(block_k)
    return mosaic_gpu.sparse_attention_mgpu(q, k, v, **kw)


def _prefill_triton(q, k, v, *, block_q, block_k, interpret, return_lse, **kw):
    del return_lse  # the kernel always returns the lse
    bq, bk = heuristics.triton_prefill_blocks(q.dtype, q.shape[1], k.shape[1], block_q, block_k)
    return triton.sparse_attention_gpu(q, k, v, block_q=bq, block_k=bk, interpret=interpret, **kw)


def _prefill_tpu(q, k, v, *, block_q, block_k, interpret, return_lse, **kw):
    bq, bk = heuristics.tpu_prefill_blocks(q.shape[1], k.shape[1], block_q, block_k)
    return tpu.sparse_attention_tpu(
        q, k, v, block_q=bq, block_k=bk, interpret=interpret, return_lse=return_lse, **kw
    )


def _prefill_reference(q, k, v, *, windows, sinks, return_lse, **kw):
    res = reference.window_sink_attention(
        q,
        k,
        v,
        windows,
        sinks,
        q_offset=kw["q_offset"],
        kv_lengths=kw["kv_lengths"],
        scale=kw["scale"],
        return_lse=return_lse,
    )
    return res if return_lse else (res, None)


def _mgpu_check(case: Case) -> str | None:
    if case.block_k not in (None, *heuristics.MGPU_BLOCK_K):
        return f"block_k {case.block_k} is not one of {heuristics.MGPU_BLOCK_K}"
    if not mosaic_gpu.supported(case.dtype, case.head_dim):
        return (
            f"it takes bf16/f16 with head_dim <= {heuristics.MGPU_MAX_HEAD_DIM}, not "
            f"{jnp.dtype(case.dtype)} and {case.head_dim}"
        )
    return None


PREFILL_IMPLEMENTATIONS: dict[str, Implementation] = {
    "mgpu": Implementation(
        "mgpu",
        "gpu",
        _prefill_mgpu,
        interpretable=False,
        check=_mgpu_check,
        options=frozenset(("block_k_dq", "num_stages", "num_stages_dq", "num_stages_dkv")),
        compiles_here=lambda: mosaic_gpu.available(),
        needs="an NVIDIA GPU of compute capability >= 9.0",
    ),
    "gpu": Implementation(
        "gpu",
        "gpu",
        _prefill_triton,
        options=frozenset(
            (
                "block_q_dq",
                "block_k_dq",
                "block_q_dkv",
                "block_k_dkv",
                "num_warps",
                "num_stages",
                "num_warps_bwd",
                "num_stages_bwd",
                "poison",  # a test hook: output buffers start as NaN
            )
        ),
    ),
    "tpu": Implementation("tpu", "tpu", _prefill_tpu),
}
# every kernel option of some prefill kernel; the jnp reference has no tiling and ignores them
_PREFILL_OPTIONS = frozenset().union(*(i.options for i in PREFILL_IMPLEMENTATIONS.values()))
PREFILL_IMPLEMENTATIONS["reference"] = Implementation(
    "reference", None, _prefill_reference, options=_PREFILL_OPTIONS
)


def check_prefill_args(
    op: str,
    q: Any,
    k: Any,
    v: Any,
    /,
    *,
    windows: Any,
    sink: Any = 0,
    q_offset: Any = 0,
    kv_lengths: Any = None,
    backend: Any = "auto",
    interpret: Any = None,
    block_q: Any = None,
    block_k: Any = None,
    return_lse: Any = False,
    scale: Any = None,
    **options: Any,
) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """`sparse_attention`'s checks of its arguments (`op`: the function named in messages);
    returns (windows, sinks, q_offset) as ints."""
    b, _, h, *_ = check_qkv(op, q, k, v, PREFILL_LAYOUT)  # q's shape, then k's
    one_float_dtype(op, q=q, k=k, v=v)
    if kv_lengths is not None:
        check_int_array(f"{op}: kv_lengths", kv_lengths, (b,), "[B]")
    windows = per_head(op, "windows", "windows", windows, h, 1, one_for_all=False)
    sinks = per_head(op, "sink", "sinks", sink, h, 0, one_for_all=True)
    q_offset = checked(f"{op}: q_offset", q_offset, NON_NEGATIVE)
    checked(f"{op}: return_lse", return_lse, FLAG)
    unknown = sorted(set(options) - _PREFILL_OPTIONS)
    if unknown:
        raise ConfigError(
            f"{op}: unknown kernel options {unknown}; the kernels take {sorted(_PREFILL_OPTIONS)}"
        )
    _check_options(op, backend, interpret, scale, block_q=block_q, block_k=block_k, **options)
    return windows, sinks, q_offset


def sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    windows: Sequence[int],
    sink: int | Sequence[int] = 0,
    q_offset: int = 0,
    kv_lengths: jax.Array | None = None,
    backend: str = "auto",
    interpret: bool | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    return_lse: bool = False,
    scale: float | None = None,
    **kernel_options,
):
    """Causal attention with a sliding window and sinks per query head (prefill, training).

    Semantics (`reference.window_sink_mask`): query head h at absolute position i attends key j
    iff `j <= i and (i - j < windows[h] or j < sink[h])`, and `j < kv_lengths[b]` when given.
    Queries sit at positions [q_offset, q_offset + T), keys at [0, S).

    Args:
      q: [B, T, H, D]; k, v: [B, S, Hkv, D] with H a multiple of Hkv (GQA: heads of one KV group
        may have different windows; K/V are never repeated).
      windows: static per-query-head window lengths in tokens (>= 1; >= S means dense).
      sink: sink tokens, one int for all heads or one per query head (static).
      q_offset: static position of the first query (queries at [q_offset, q_offset + T)).
      kv_lengths: optional int [B], valid keys per row (keys j >= kv_lengths[b] are padding).
      backend: 'auto', 'mgpu' (Mosaic GPU: sm90+, bf16/f16, D <= 128, block_k 64 or 128),
        'gpu' (Triton), 'tpu' (splash attention) or 'reference' (the jnp oracle), in that
        fallback order (module docstring). 'auto' on a TPU runs splash, on a GPU the Mosaic GPU
        kernel where it can and else Triton, and elsewhere the Triton kernel in interpret mode.
      interpret: run the Pallas kernel in interpret mode (default: off its platform).
      block_q, block_k: forward block sizes (powers of two; clamped to the sequence lengths;
        `heuristics.py` has the defaults). The Mosaic GPU kernel's query tiles are fixed.
      return_lse: also return the log-sum-exp [B, H, T] (float32; -inf for rows with no key).
      scale: logit scale, default 1/sqrt(D).
      kernel_options: implementation options (Triton: block_q_dq, block_k_dq, block_q_dkv,
        block_k_dkv, num_warps, num_stages, num_warps_bwd, num_stages_bwd; Mosaic GPU:
        block_k_dq, num_stages, num_stages_dq, num_stages_dkv). When another implementation
        than the requested one runs, the options it does not take are dropped; the requested
        one refuses them, and the jnp reference ignores them all.
    Returns:
      out [B, T, H, D] in q's dtype (and lse). Differentiable with respect to q, k, v.
    Raises:
      ArrayError: q, k, v not floats of one dtype and the shapes above (non-empty axes), or
        kv_lengths not int [B]; ConfigError: an option out of its domain (windows and sinks
        static ints, one per query head, >= 1 and >= 0; q_offset an int >= 0; scale a finite
        number > 0; block sizes and num_warps powers of two; a backend or kernel option that
        does not exist). Checked before an implementation is chosen, the same for every backend.
    """
    windows, sinks, q_offset = check_prefill_args(
        "sparse_attention",
        q,
        k,
        v,
        windows=windows,
        sink=sink,
        q_offset=q_offset,
        kv_lengths=kv_lengths,
        backend=backend,
        interpret=interpret,
        block_q=block_q,
        block_k=block_k,
        return_lse=return_lse,
        scale=scale,
        **kernel_options,
    )
    case = Case(platform(), q.dtype, q.shape[3], interpret, block_k)
    impl = select("prefill", PREFILL_IMPLEMENTATIONS, backend, case)
    out, lse = impl.run(
        q,
        k,
        v,
        windows=windows,
        sinks=sinks,
        q_offset=q_offset,
        kv_lengths=kv_lengths,
        scale=scale,
        block_q=block_q,
        block_k=block_k,
        interpret=resolve_interpret(impl.platform, interpret),
        return_lse=return_lse,
        **_options(impl, backend, kernel_options),
    )
    return (out, lse) if return_lse else out


# ------------------------------------------------------------------------------ span decode
def _span_triton(q, cache, q_positions, *, scale, interpret, per_split, num_warps):
    return span_triton.span_decode_triton(
        q,
        cache,
        q_positions,
        scale=scale,
        per_split=per_split,
        interpret=interpret,
        num_warps=num_warps,
    )


def _span_tpu(q, cache, q_positions, *, scale, interpret, per_split, num_warps):
    del per_split, num_warps  # the TPU kernel walks whole segments with its own grid
    return span_tpu.span_decode_tpu(q, cache, q_positions, scale=scale, interpret=interpret)


def _span_reference(q, cache, q_positions, *, scale, interpret, per_split, num_warps):
    return reference.span_decode_reference(q, cache, q_positions, scale)


SPAN_DECODE_IMPLEMENTATIONS: dict[str, Implementation] = {
    "gpu": Implementation("gpu", "gpu", _span_triton),
    "tpu": Implementation("tpu", "tpu", _span_tpu),
    "reference": Implementation("reference", None, _span_reference),
}


def _check_span_args(q, cache, q_positions, backend, interpret, per_split, scale, num_warps):
    """`span_decode`'s checks."""
    op, layout = "span_decode", SPAN_LAYOUT
    b, h, d = array_shape(op, "q", q, 3, layout)
    if not isinstance(cache, SpanKVCache):
        raise ArrayError(f"{op}: cache must be a SpanKVCache, got {type(cache).__name__}")
    kshape = array_shape(op, "cache.k", cache.k, 3, layout)
    vshape = array_shape(op, "cache.v", cache.v, 3, layout)
    if vshape != kshape:
        raise ArrayError(f"{op}: cache.v has shape {vshape} but cache.k has {kshape} ({layout})")
    same_size(op, "cache.k", "batch", kshape[0], "q", b, layout)
    same_size(op, "cache.k", "head_dim", kshape[2], "q", d, layout)
    check_int_array(f"{op}: cache.pos", cache.pos, kshape[:2], "[B, M]")
    if h != cache.schedule.num_heads:
        raise ArrayError(
            f"{op}: q has {h} query heads but the cache's schedule has {cache.schedule.num_heads}; "
            f"it needs one window and sink per query head ({layout})"
        )
    one_float_dtype(op, q=q, **{"cache.k": cache.k, "cache.v": cache.v})
    check_int_array(f"{op}: q_positions", q_positions, (b,), "[B]")
    _check_options(op, backend, interpret, scale, per_split=per_split, num_warps=num_warps)


def span_decode(
    q: jax.Array,
    cache: SpanKVCache,
    q_positions: jax.Array,
    *,
    backend: str = "auto",
    interpret: bool | None = None,
    per_split: int | None = None,
    scale: float | None = None,
    num_warps: int = heuristics.DECODE_NUM_WARPS,
) -> jax.Array:
    """Decode attention of one token per row over a MoA span cache.

    Args:
      q: [B, H, D], the new token's queries (after RoPE) at positions q_positions int [B]; the
        token itself must already be written to the cache.
      cache: the layer's `SpanKVCache`; its schedule holds the per-query-head windows and sinks.
      backend: 'auto', 'mgpu', 'gpu', 'tpu' or 'reference' (module docstring: 'mgpu' has no
        decode kernel and runs Triton).
      per_split: split-K work per program in cache blocks (default: `split_segments`'s via
        `MoASchedule.work_list`: enough programs to fill the GPU, the long segments cut to the
        short ones' length). Triton only.
    Returns:
      [B, H, D] in q's dtype.
    Raises:
      ArrayError / ConfigError naming the argument, as `sparse_attention` (q, cache.k, cache.v
      floats of one dtype, cache.pos and q_positions int, per_split >= 1).
    """
    _check_span_args(q, cache, q_positions, backend, interpret, per_split, scale, num_warps)
    case = Case(platform(), q.dtype, q.shape[-1], interpret)
    impl = select("span decode", SPAN_DECODE_IMPLEMENTATIONS, backend, case)
    return impl.run(
        q,
        cache,
        q_positions,
        scale=scale,
        interpret=resolve_interpret(impl.platform, interpret),
        per_split=per_split,
        num_warps=num_warps,
    )


# ------------------------------------------------------------------------------ head-major decode
_SCORES = Choice("max", "sum")  # or None


def _check_head_major_args(
    op,
    q,
    k,
    v,
    q_positions,
    pos,
    k_new,
    v_new,
    scores,
    backend,
    interpret,
    num_splits,
    block_k,
    scale,
    num_warps,
    window,
) -> int | None:
    """`full_step_decode`'s and `recycled_decode`'s checks; returns the window as an int."""
    b, _, d, _, hkv, n, _ = check_qkv(op, q, k, v, HEAD_MAJOR_LAYOUT, decode=True)
    check_int_array(f"{op}: q_positions", q_positions, (b,), "[B]")
    if pos is not None:
        check_int_array(f"{op}: pos", pos, (b, hkv, n), "[B, Hkv, N]")
    if (k_new is None) != (v_new is None):
        raise ArrayError(f"{op}: k_new and v_new go together, got only one of them")
    new = {} if k_new is None else {"k_new": k_new, "v_new": v_new}
    for name, x in new.items():
        if array_shape(op, name, x, 3, HEAD_MAJOR_LAYOUT) != (b, hkv, d):
            raise ArrayError(
                f"{op}: {name} must be [B, Hkv, D] = {[b, hkv, d]}, got shape {tuple(x.shape)}"
            )
    one_float_dtype(op, q=q, k=k, v=v, **new)
    checked(f"{op}: scores", scores, _SCORES, optional=True)
    if block_k is not None:
        bk = checked(f"{op}: block_k", block_k, POSITIVE)
        if n % bk:
            raise ConfigError(f"{op}: block_k {bk} does not divide the cache's {n} slots (N)")
        checked(f"{op}: block_k", bk, POWER_OF_TWO)
    _check_options(op, backend, interpret, scale, num_splits=num_splits, num_warps=num_warps)
    return checked(f"{op}: window", window, POSITIVE, optional=True)


def _head_major_triton(
    q, k, v, q_positions, *, pos, k_new, v_new, scores, scale, interpret, window, **kw
):
    n = k.shape[2]
    bk = heuristics.head_major_block(n, kw["block_k"], "gpu")
    nblocks = n // bk
    splits = kw["num_splits"] or heuristics.default_splits(q.shape[0], k.shape[1], nblocks)
    o, m, l, logits = head_major_triton.head_major_partials(
        q,
        k,
        v,
        q_positions,
        pos,
        bk=bk,
        num_splits=int(max(1, min(splits, nblocks))),
        scale=scale,
        write_logits=scores is not None,
        interpret=bool(interpret),
        num_warps=kw["num_warps"],
        window=window,
    )
    return head_major_triton.merge_partials(
        q, o, m, l, logits, q_positions, pos, k_new, v_new, scale, scores, window
    )


def _head_major_tpu(
    q, k, v, q_positions, *, pos, k_new, v_new, scores, scale, interpret, window, **kw
):
    bk = heuristics.head_major_block(k.shape[2], kw["block_k"], "tpu")
    o, m, l, logits = head_major_tpu.tpu_partials(
        q,
        k,
        v,
        q_positions,
        pos,
        bk=bk,
        scale=scale,
        write_logits=scores is not None,
        interpret=interpret,
        window=window,
    )
    return head_major_triton.merge_partials(
        q, o, m, l, logits, q_positions, pos, k_new, v_new, scale, scores, window
    )


def _head_major_reference(q, k, v, q_positions, *, pos, k_new, v_new, scores, scale, window, **kw):
    return reference.head_major_decode_reference(
        q,
        k,
        v,
        q_positions,
        pos=pos,
        k_new=k_new,
        v_new=v_new,
        scores=scores,
        scale=scale,
        window=window,
    )


HEAD_MAJOR_DECODE_IMPLEMENTATIONS: dict[str, Implementation] = {
    "gpu": Implementation("gpu", "gpu", _head_major_triton),
    "tpu": Implementation("tpu", "tpu", _head_major_tpu),
    "reference": Implementation("reference", None, _head_major_reference),
}


def _head_major_decode(
    op,
    q,
    k,
    v,
    q_positions,
    *,
    pos,
    k_new,
    v_new,
    scores,
    backend,
    interpret,
    num_splits,
    block_k,
    scale,
    num_warps,
    window,
):
    window = _check_head_major_args(
        op,
        q,
        k,
        v,
        q_positions,
        pos,
        k_new,
        v_new,
        scores,
        backend,
        interpret,
        num_splits,
        block_k,
        scale,
        num_warps,
        window,
    )
    case = Case(platform(), q.dtype, q.shape[-1], interpret, block_k)
    impl = select("head-major decode", HEAD_MAJOR_DECODE_IMPLEMENTATIONS, backend, case)
    return impl.run(
        q,
        k,
        v,
        q_positions.astype(jnp.int32),
        pos=None if pos is None else pos.astype(jnp.int32),
        k_new=k_new,
        v_new=v_new,
        scores=scores,
        scale=float(q.shape[-1] ** -0.5 if scale is None else scale),
        interpret=resolve_interpret(impl.platform, interpret),
        num_splits=num_splits,
        block_k=block_k,
        num_warps=num_warps,
        window=window,
    )


def full_step_decode(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    *,
    scores: str | None = "max",
    backend: str = "auto",
    interpret: bool | None = None,
    num_splits: int | None = None,
    block_k: int | None = None,
    scale: float | None = None,
    num_warps: int = heuristics.DECODE_NUM_WARPS,
    window: int | None = None,
):
    """A full decode step over the full cache, with the selection scores from the same pass.

    Args:
      q: [B, H, D] queries (after RoPE) at q_positions int [B].
      k, v: [B, Hkv, N, D]; slot j holds position j (the current token already written).
      scores: 'max' (default: max over the query heads of a KV group of the fp32 softmax
        probabilities), 'sum', or None (attention only).
      backend: 'auto', 'mgpu', 'gpu', 'tpu' or 'reference' (module docstring: 'mgpu' has no
        decode kernel and runs Triton).
      num_splits: GPU split-K factor (default: enough programs to fill the GPU).
      block_k: slots per block (must divide N; default gcd(N, 64) on GPU, gcd(N, 512) on TPU).
      window: static; the model's own sliding window: only slots j with
        q_position - window < j <= q_position are visible, and the kernels skip the blocks
        before it (None, the default: every slot up to q_position).
    Returns:
      out [B, H, D] in q's dtype, or (out, scores float32 [B, Hkv, N]); invisible slots score 0.
    Raises:
      ArrayError / ConfigError naming the argument, as `sparse_attention` (q, k, v floats of one
      dtype, q_positions int [B]; window an int >= 1; block_k a power of two dividing N).
    """
    res = _head_major_decode(
        "full_step_decode",
        q,
        k,
        v,
        q_positions,
        pos=None,
        k_new=None,
        v_new=None,
        scores=scores,
        backend=backend,
        interpret=interpret,
        num_splits=num_splits,
        block_k=block_k,
        scale=scale,
        num_warps=num_warps,
        window=window,
    )
    return res if scores is None else res[:2]


def recycled_decode(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    pos: jax.Array,
    q_positions: jax.Array,
    k_new: jax.Array | None = None,
    v_new: jax.Array | None = None,
    *,
    scores: str | None = None,
    backend: str = "auto",
    interpret: bool | None = None,
    num_splits: int | None = None,
    block_k: int | None = None,
    scale: float | None = None,
    num_warps: int = heuristics.DECODE_NUM_WARPS,
    window: int | None = None,
):
    """Decode attention over a gathered K-slot buffer plus the current token.

    Args:
      q: [B, H, D] at q_positions int [B].
      k, v: [B, Hkv, N, D] gathered keys (after RoPE, any slot order) and values.
      pos: int [B, Hkv, N], each slot's position, -1 for an empty slot.
      k_new, v_new: optional [B, Hkv, D], the current token, attended as one more key.
      scores: None (default), 'max' or 'sum' over the group of the probabilities.
      backend, interpret, num_splits, block_k, scale: as in `full_step_decode`.
      window: static; only slots with q_position - window < pos are visible (the current token
        always is); None (the default): no limit.
    Returns:
      out [B, H, D], or (out, slot scores [B, Hkv, N], new-token score [B, Hkv] or None).
    Raises:
      ArrayError / ConfigError naming the argument, as `full_step_decode` (pos int [B, Hkv, N];
      k_new, v_new together, of q's dtype).
    """
    if pos is None:
        raise ArrayError("recycled_decode: pos is required (int [B, Hkv, N], -1 for an empty slot)")
    return _head_major_decode(
        "recycled_decode",
        q,
        k,
        v,
        q_positions,
        pos=pos,
        k_new=k_new,
        v_new=v_new,
        scores=scores,
        backend=backend,
        interpret=interpret,
        num_splits=num_splits,
        block_k=block_k,
        scale=scale,
        num_warps=num_warps,
        window=window,
    )
