"""Influence-profiling throughput: the profile stage of `python -m moa_jax.profile` at scale.

    python -m moa_jax.bench.influence_profiling      # Llama-3-8B shapes, 50 items at 8k
    python -m moa_jax.bench.influence_profiling --shape smollm2-135m --length 2048 4096 \
        8192 --batch-size 4 --q-chunk 256 --remat --dtype float32 --estimator answer
                                                     # gpu.yaml's stage
    python -m moa_jax.bench.influence_profiling --shape tiny --length 512 --items 4  # CPU smoke
    python -m moa_jax.bench.influence_profiling --shape qwen3-8b --estimator answer-copy \
        --remat-on-oom                               # another family's 8B model, 50 x 8k
    python -m moa_jax.bench.influence_profiling --shape qwen3-8b --narrow --length 128 \
        --items 2 --answer-tokens 16 --dtype float32 # its CPU smoke run (36 layers, narrow)

`--shape` names any preset of `moa_jax.bench.random_model` (llama3-8b, llama3.1-8b, mistral-7b,
qwen2.5-7b, qwen3-8b, smollm2-135m, tiny), each with its family's switches (Qwen2's q/k/v
biases, Qwen3's q/k norms, Llama 3.1's rope scaling). A model of the given shapes with random
bf16 weights (made on the device), `--items` synthetic
calibration items of `--length` tokens whose last `--answer-tokens` are the answer, profiled
by `moa_jax.search.sensitivity.profile_items` exactly as the CLI does (one jitted forward +
backward per batch of `--batch-size` items, every layer's and head's influence from it).
Reported: the first batch's time (compilation included), the time of all items after it,
seconds per item, the whole stage (their sum), peak device memory; one row per length and their
total. With `--estimator window` the profile also scores the rule grid's windows, with
`--estimator answer` it also sums the answer rows' influence, as the CLI does with those
estimators (`scaled_grid` over the given lengths). JSON to `--out`, a line per length to stdout.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moa_jax.bench.device_memory import GIB, memory_stats
from moa_jax.bench.random_model import SHAPE_NAMES, make_weights, model_config, model_shape
from moa_jax.cli import option, parse_config, run, setup_logging
from moa_jax.domains import NON_NEGATIVE, POSITIVE, TEXT, Choice, Int, Options, Relation
from moa_jax.search.estimators import ESTIMATORS, ROWS_ONLY_ESTIMATORS
from moa_jax.search.influence_profile import BLOCK

PROG = "python -m moa_jax.bench.influence_profiling"


@dataclasses.dataclass
class _Item:
    tokens: np.ndarray
    answer_start: int


def synthetic_items(
    vocab: int, length: int, count: int, answer_tokens: int, seed: int = 0
) -> list[_Item]:
    """`count` items of `length` random tokens whose last `answer_tokens` are the answer."""
    rng = np.random.default_rng(seed)
    return [
        _Item(rng.integers(0, vocab, length).astype(np.int32), length - answer_tokens)
        for _ in range(count)
    ]


def time_profile(
    model: Any,
    items: Sequence[Any],
    length: int,
    batch_size: int,
    *,
    mesh=None,
    remat: bool = False,
    q_chunk: int | None = None,
    windows: Sequence[int] = (),
    answer: bool = False,
    token: bool = True,
) -> dict[str, Any]:
    """Profiles the first batch (compiles) then the rest; returns timings and peak memory."""
    # moa_jax.search.sensitivity loads jax: imported on call, so that `--help` does not wait
    from moa_jax.search.sensitivity import profile_items

    kw = dict(
        batch_size=batch_size,
        mesh=mesh,
        remat=remat,
        q_chunk=q_chunk,
        windows=windows,
        answer=answer,
        token=token,
        progress=False,
    )
    first = list(items[:batch_size])
    t0 = time.perf_counter()
    profile_items(model, first, length, **kw)
    first_s = time.perf_counter() - t0
    rest = list(items[batch_size:])
    t0 = time.perf_counter()
    prof = profile_items(model, rest, length, **kw)
    dt = time.perf_counter() - t0
    if not np.isfinite(prof.diag if prof.token else prof.answer).all():
        raise FloatingPointError("non-finite influence")
    devices = list(mesh.devices.flat) if mesh is not None else None
    st = memory_stats(devices)
    per_item = dt / max(prof.count, 1)
    return dict(
        first_batch_s=round(first_s, 2),
        steady_s=round(dt, 2),
        steady_items=prof.count,
        seconds_per_item=round(per_item, 3),
        peak_gib=round(st.get("peak_bytes_in_use", 0) / GIB, 2) or None,
    )


PROFILE_LENGTH = Int(BLOCK, multiple_of=BLOCK, distinct=True, min_items=1)
"""Profile lengths: whole blocks of the influence."""
DTYPES = Choice("bfloat16", "float32", "float16")
"""The weights and compute dtypes (names of `moa_jax.config.DTYPE_NAMES`, which loads jax)."""


@dataclasses.dataclass
class InfluenceBenchConfig(Options):
    """The model shape, the calibration items and the profile's settings."""

    shape: str = option(
        "llama3-8b",
        "model shapes, random weights (moa_jax.bench.random_model: Llama 3 / 3.1, Mistral, "
        "Qwen2.5, Qwen3 presets)",
        Choice(*SHAPE_NAMES),
    )
    layers: int | None = option(None, "override the layer count", POSITIVE)
    narrow: bool = option(
        False,
        "the shape at CPU-sized widths, its structure kept (family switches, layers, heads, KV "
        "heads; head_dim 16, FFN 128, vocab 256): a smoke run of a full-size preset",
    )
    length: list[int] = option(
        [8192],
        f"profile length(s) N, multiples of {BLOCK}, each with --items items",
        PROFILE_LENGTH,
        nargs="+",
    )
    items: int = option(
        50,
        "calibration items profiled, more than --batch-size (the first batch compiles)",
        POSITIVE,
    )
    batch_size: int = option(1, "items per forward + backward", POSITIVE)
    answer_tokens: int = option(128, "answer tokens per item, fewer than each --length", POSITIVE)
    q_chunk: int | None = option(
        None,
        f"influence rows per step, a multiple of {BLOCK} (the largest such multiple that "
        "divides N runs; default: automatic)",
        Int(BLOCK, multiple_of=BLOCK),
    )
    remat: bool = option(False, "recompute activations per layer")
    remat_on_oom: bool = option(
        False,
        "if a length's first batch runs out of device memory without --remat, profile that "
        "length again with it (the row says so: remat_after_oom)",
    )
    dtype: str = option("bfloat16", "weights and compute dtype", DTYPES)
    estimator: str = option(
        "block",
        "'window' also scores the rule grid's windows; "
        + ", ".join(f"'{e}'" for e in ROWS_ONLY_ESTIMATORS)
        + " profile the answer rows alone on the fastest exact attention kernel "
        "(as the CLI does)",
        Choice(*ESTIMATORS),
    )
    sink: int = option(64, "sink tokens of the rule grid", NON_NEGATIVE)
    out: str | None = option(None, "JSON file for the result row", TEXT)

    relations = (
        Relation(
            ("items", "batch_size"),
            lambda c: c.items > c.batch_size,
            "--items must be more than --batch-size (the first batch compiles, the rest is timed)",
        ),
        Relation(
            ("answer_tokens", "length"),
            lambda c: c.answer_tokens < min(c.length),
            "--answer-tokens must be fewer than every --length",
        ),
    )


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = parse_config(InfluenceBenchConfig, argv, prog=PROG, description=__doc__)

    # jax (and the modules that load it) only after the flags: `--help` does not wait for it
    import jax
    from flax import nnx

    from moa_jax.bench.batch_search import is_oom
    from moa_jax.search.rules import scaled_grid

    shape = model_shape(args.shape, args.layers, narrow=args.narrow)
    cfg = model_config(args.shape, args.layers, narrow=args.narrow)
    graphdef, state = make_weights(cfg, param_dtype=args.dtype, dtype=args.dtype)
    model = nnx.merge(graphdef, state)
    rows = []
    for length in args.length:
        windows: list[int] = []
        if args.estimator == "window":
            windows = sorted(
                {int(w) for w in scaled_grid(args.length, sink=args.sink).windows(length)}
            )
        items = synthetic_items(cfg.vocab_size, length, args.items, args.answer_tokens)
        row = dict(
            bench="profile",
            shape=args.shape,
            family=cfg.family,
            narrow=args.narrow,
            config=shape,
            length=length,
            items=args.items,
            batch_size=args.batch_size,
            answer_tokens=args.answer_tokens,
            remat=args.remat,
            dtype=args.dtype,
            estimator=args.estimator,
            windows=len(windows),
            device=jax.devices()[0].device_kind,
            jax=jax.__version__,
            date=datetime.date.today().isoformat(),
        )
        rows_only = args.estimator in ROWS_ONLY_ESTIMATORS  # the answer-rows pass

        def timed(remat, items=items, length=length, windows=windows, rows_only=rows_only):
            return time_profile(
                model,
                items,
                length,
                args.batch_size,
                remat=remat,
                q_chunk=args.q_chunk,
                windows=windows,
                answer=rows_only,
                token=not rows_only,
            )

        t0 = time.perf_counter()
        try:
            row.update(timed(args.remat))
        except Exception as e:  # noqa: BLE001
            if args.remat or not args.remat_on_oom or not is_oom(e):
                raise
            gc.collect()
            oom_s = round(time.perf_counter() - t0, 2)
            print(
                f"profile {args.shape} N={length}: out of memory without --remat after "
                f"{oom_s} s; again with it",
                flush=True,
            )
            row.update(timed(True), remat=True, remat_after_oom=oom_s)
        row["profile_stage_s"] = round(row["first_batch_s"] + row["steady_s"], 2)
        print(
            f"profile {args.shape} N={length}: {args.items} items in "
            f"{row['profile_stage_s']} s ({row['seconds_per_item']} s/item steady, first "
            f"batch {row['first_batch_s']} s), peak {row['peak_gib']} GiB on {row['device']}",
            flush=True,
        )
        rows.append(row)
    total = round(sum(r["profile_stage_s"] for r in rows), 2)
    if len(rows) > 1:
        print(f"profile stage, all lengths: {total} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        result = rows[0] if len(rows) == 1 else dict(rows=rows, profile_stage_s=total)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
