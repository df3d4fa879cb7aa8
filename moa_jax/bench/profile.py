"""Influence-profiling throughput: the profile stage of `python -m moa_jax.profile` at scale.

    python -m moa_jax.bench.profile                          # Llama-3-8B shapes, 50 items at 8k
    python -m moa_jax.bench.profile --shape smollm2-135m --length 2048 4096 8192 \
        --batch-size 4 --q-chunk 256 --remat --dtype float32 --estimator answer   # gpu.yaml's stage
    python -m moa_jax.bench.profile --shape tiny --length 512 --items 4     # CPU smoke run

A model of the given shapes with random bf16 weights (made on the device), `--items` synthetic
calibration items of `--length` tokens whose last `--answer-tokens` are the answer, profiled by
`moa_jax.search.profile.profile_items` exactly as the CLI does (one jitted forward + backward per
batch of `--batch-size` items, every layer's and head's influence from it). Reported: the first
batch's time (compilation included), the time of all items after it, seconds per item, the
whole stage (their sum), peak device memory; one row per length and their total. With
`--estimator window` the profile also scores the rule grid's windows, with `--estimator answer`
it also sums the answer rows' influence, as the CLI does with those estimators (`scaled_grid`
over the given lengths). JSON to `--out`, a line per length to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from moa_jax.bench.decode import GIB, LLAMA3_8B, TINY, _memory_stats
from moa_jax.search.estimators import ESTIMATORS, ROWS_ONLY_ESTIMATORS

# SmolLM2-135M-Instruct (the default preset's GGUF metadata)
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    rope_theta=100000.0,
    max_position_embeddings=8192,
)
SHAPES = {"llama3-8b": LLAMA3_8B, "smollm2-135m": SMOLLM2_135M, "tiny": TINY}


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
    st = _memory_stats(devices)
    per_item = dt / max(prof.count, 1)
    return dict(
        first_batch_s=round(first_s, 2),
        steady_s=round(dt, 2),
        steady_items=prof.count,
        seconds_per_item=round(per_item, 3),
        peak_gib=round(st.get("peak_bytes_in_use", 0) / GIB, 2) or None,
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m moa_jax.bench.profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="llama3-8b",
        help="model shapes (random bf16 weights)",
    )
    p.add_argument("--layers", type=int, default=None, help="override the layer count")
    p.add_argument(
        "--length",
        type=int,
        nargs="+",
        default=[8192],
        help="profile length(s) N, each with --items items",
    )
    p.add_argument("--items", type=int, default=50, help="calibration items profiled")
    p.add_argument("--batch-size", type=int, default=1, help="items per forward + backward")
    p.add_argument("--answer-tokens", type=int, default=128, help="answer tokens per item")
    p.add_argument("--q-chunk", type=int, default=None, help="influence rows per step (auto)")
    p.add_argument("--remat", action="store_true", help="recompute activations per layer")
    p.add_argument("--dtype", default="bfloat16", help="weights and compute dtype")
    p.add_argument(
        "--estimator",
        choices=tuple(ESTIMATORS),
        default="block",
        help="'window' also scores the rule grid's windows; "
        + ", ".join(f"'{e}'" for e in ROWS_ONLY_ESTIMATORS)
        + " profile the answer rows alone on the fastest exact attention kernel "
        "(as the CLI does)",
    )
    p.add_argument("--sink", type=int, default=64, help="sink tokens of the rule grid")
    p.add_argument("--out", default=None, help="JSON file for the result row")
    args = p.parse_args(argv)

    import datetime

    import jax
    from flax import nnx

    from moa_jax.bench.decode import make_weights
    from moa_jax.config import ModelConfig

    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["num_layers"] = args.layers
    cfg = ModelConfig(**shape)
    graphdef, state = make_weights(cfg, param_dtype=args.dtype, dtype=args.dtype)
    model = nnx.merge(graphdef, state)
    rows = []
    for length in args.length:
        windows: list[int] = []
        if args.estimator == "window":
            from moa_jax.search.rules import scaled_grid

            windows = sorted(
                {int(w) for w in scaled_grid(args.length, sink=args.sink).windows(length)}
            )
        items = synthetic_items(cfg.vocab_size, length, args.items, args.answer_tokens)
        row = dict(
            bench="profile",
            shape=args.shape,
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
        row.update(
            time_profile(
                model,
                items,
                length,
                args.batch_size,
                remat=args.remat,
                q_chunk=args.q_chunk,
                windows=windows,
                answer=rows_only,
                token=not rows_only,
            )
        )
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
    raise SystemExit(main())
