"""What a run reports: model FLOPs and peak FLOP/s (for MFU), the `metrics.jsonl` file and the
summary read back from it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from moa_jax.config import ModelConfig
from moa_jax.files import atomic_write_text
from moa_jax.models.attention import Attention
from moa_jax.train.config import TrainConfig

# Peak dense bf16 matmul throughput by device kind, for MFU (FLOP/s).
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "TPU v5p": 459e12,
    "TPU v5e": 197e12,
    "TPU v4": 275e12,
    "TPU v6": 918e12,
}


def matmul_params(mc: ModelConfig) -> int:
    """Parameters used in matrix products per token (projections, MLP, LM head)."""
    e, h, kv, d, f = (
        mc.hidden_size,
        mc.num_heads,
        mc.num_kv_heads,
        mc.head_dim,
        mc.intermediate_size,
    )
    per_layer = e * h * d * 2 + e * kv * d * 2 + 3 * e * f
    return mc.num_layers * per_layer + e * mc.vocab_size


def train_flops_per_sequence(mc: ModelConfig, seq_len: int, attention_entries: int) -> float:
    """Model FLOPs of one training sequence (forward + backward = 3x forward): 6 per matmul
    parameter per token, and 4 * head_dim per kept (query, key) pair per head per layer, x3."""
    return (
        6.0 * matmul_params(mc) * seq_len
        + 12.0 * mc.num_layers * mc.num_heads * mc.head_dim * attention_entries
    )


def attention_entries(attention: Attention, seq_len: int, num_heads: int) -> int:
    """Kept (query, key) pairs per head of one sequence (mean over heads for MoA plans)."""
    fn = getattr(attention, "attention_entries", None)
    if fn is not None:
        return int(fn(seq_len))
    plan = getattr(attention, "plan", None)
    if plan is not None:
        return int(np.mean(plan.kept_entries(seq_len)))
    return seq_len * (seq_len + 1) // 2


def peak_flops(cfg: TrainConfig) -> float | None:
    """Peak FLOP/s of one device: `peak_tflops` when set, else by device kind (None: unknown)."""
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops * 1e12
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return None


class MetricsFile:
    """metrics.jsonl, written by the lead process only (the others run the same steps).

    `resume_from`: the checkpoint step a run continues from. Records of later steps (written
    after that checkpoint by the run that was interrupted, and about to be written again) and a
    half-written last line are dropped first, so every step has one record.
    """

    def __init__(self, path: Path, write: bool = True, resume_from: int | None = None):
        self.path = path
        if write and resume_from is not None and path.is_file():
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and rec.get("step", 0) <= resume_from:
                    kept.append(line)
            atomic_write_text(path, "".join(x + "\n" for x in kept))
        self.f = open(path, "a", encoding="utf-8") if write else None

    def write(self, record: dict[str, Any]) -> None:
        if self.f is not None:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def summarize(out: Path, cfg: TrainConfig) -> dict[str, Any]:
    """Before / after evaluation and throughput from the run's metrics.jsonl."""
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    evals = [r for r in records if r.get("event") == "eval"]
    train_recs = [r for r in records if r.get("event") == "train"]
    # The first step of each process compiles; leave it out of the throughput.
    starts = {r["step"] + 1 for r in records if r.get("event") == "start"}
    timed = [r for r in train_recs if r["step"] not in starts]
    s: dict[str, Any] = {
        "steps": max((r["step"] for r in train_recs), default=0),
        "final_loss": train_recs[-1]["loss"] if train_recs else None,
    }
    if evals:
        s["eval_before"] = next((e["eval"] for e in evals if e["step"] == 0), None)
        s["eval_after"] = evals[-1]["eval"] if evals[-1]["step"] == cfg.steps else None
    if timed:
        s["tokens_per_s_median"] = float(np.median([r["tokens_per_s"] for r in timed]))
        s["step_time_s_median"] = float(np.median([r["step_time_s"] for r in timed]))
        if "mfu" in timed[0]:
            s["mfu_median"] = float(np.median([r["mfu"] for r in timed]))
    return s
