"""Influence-profiling throughput: the profile stage of `python -m moa_jax.profile` at scale.

    python -m moa_jax.bench.profile                          # Llama-3-8B shapes, 50 items at 8k
    python -m moa_jax.bench.profile --shape tiny --length 512 --items 4     # CPU smoke run

A model of the given shapes with random bf16 weights (made on the device), `--items` synthetic
calibration items of `--length` tokens whose last `--answer-tokens` are the answer, profiled by
`moa_jax.search.profile.profile_items` exactly as the CLI does (one jitted forward + backward per
batch of `--batch-size` items, every layer's and head's influence from it). Reported: the first
batch's time (compilation included), the time of all items after it, seconds per item, the
whole stage (their sum), peak device memory. JSON to `--out`, a line to stdout.
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

SHAPES = {"llama3-8b": LLAMA3_8B, "tiny": TINY}


@dataclasses.dataclass
class _Item:
    tokens: np.ndarray
    answer_start: int


def synthetic_items(vocab: int, length: int, count: int, answer_tokens: int,
                    seed: int = 0) -> list[_Item]:
    """`count` items of `length` random tokens whose last `answer_tokens` are the answer."""
    rng = np.random.default_rng(seed)
    return [_Item(rng.integers(0, vocab, length).astype(np.int32), length - answer_tokens)
            for _ in range(count)]


def time_profile(model: Any, items: Sequence[Any], length: int, batch_size: int, *,
                 mesh=None, remat: bool = False, q_chunk: int | None = None) -> dict[str, Any]:
    """Profiles the first batch (compiles) then the rest; returns timings and peak memory."""
    from moa_jax.search.profile import profile_items

    first = list(items[:batch_size])
    t0 = time.perf_counter()
    profile_items(model, first, length, batch_size=batch_size, mesh=mesh, remat=remat,
                  q_chunk=q_chunk, progress=False)
    first_s = time.perf_counter() - t0
    rest = list(items[batch_size:])
    t0 = time.perf_counter()
    prof = profile_items(model, rest, length, batch_size=batch_size, mesh=mesh, remat=remat,
                         q_chunk=q_chunk, progress=False)
    dt = time.perf_counter() - t0
    if not np.isfinite(prof.diag).all():
        raise FloatingPointError("non-finite influence")
    devices = list(mesh.devices.flat) if mesh is not None else None
    st = _memory_stats(devices)
    per_item = dt / max(prof.count, 1)
    return dict(first_batch_s=round(first_s, 2), steady_s=round(dt, 2), steady_items=prof.count,
                seconds_per_item=round(per_item, 3),
                peak_gib=round(st.get("peak_bytes_in_use", 0) / GIB, 2) or None)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moa_jax.bench.profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b",
                   help="model shapes (random bf16 weights)")
    p.add_argument("--layers", type=int, default=None, help="override the layer count")
    p.add_argument("--length", type=int, default=8192, help="profile length N")
    p.add_argument("--items", type=int, default=50, help="calibration items profiled")
    p.add_argument("--batch-size", type=int, default=1, help="items per forward + backward")
    p.add_argument("--answer-tokens", type=int, default=128, help="answer tokens per item")
    p.add_argument("--q-chunk", type=int, default=None, help="influence rows per step (auto)")
    p.add_argument("--remat", action="store_true", help="recompute activations per layer")
    p.add_argument("--dtype", default="bfloat16", help="weights and compute dtype")
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
    items = synthetic_items(cfg.vocab_size, args.length, args.items, args.answer_tokens)
    row = dict(bench="profile", shape=args.shape, config=shape, length=args.length,
               items=args.items, batch_size=args.batch_size, answer_tokens=args.answer_tokens,
               remat=args.remat, dtype=args.dtype, device=jax.devices()[0].device_kind,
               jax=jax.__version__, date=datetime.date.today().isoformat())
    row.update(time_profile(model, items, args.length, args.batch_size, remat=args.remat,
                            q_chunk=args.q_chunk))
    row["profile_stage_s"] = round(row["first_batch_s"] + row["steady_s"], 2)
    print(f"profile {args.shape} N={args.length}: {args.items} items in "
          f"{row['profile_stage_s']} s ({row['seconds_per_item']} s/item steady, first batch "
          f"{row['first_batch_s']} s), peak {row['peak_gib']} GiB on {row['device']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(row, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
