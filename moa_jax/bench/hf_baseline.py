"""The decode benchmark's baseline: HF transformers' `LlamaForCausalLM` (sdpa, greedy
`generate`) on the same shapes, timed per step by a logits processor."""

from __future__ import annotations

import gc
import statistics
import time

import numpy as np

from moa_jax.bench.decode_config import DecodeConfig
from moa_jax.bench.decode_variants import HF_LABEL
from moa_jax.bench.device_memory import GIB


def hf_setup(nbytes: int) -> tuple[dict, float]:
    """(report fields: torch and transformers versions, torch's copy bandwidth, the CUDA
    device; that bandwidth in bytes/s, NaN without CUDA). ImportError without them."""
    # torch and transformers on call: torch is optional (the test extra), and both are slow to load
    import torch
    import transformers

    fields: dict = dict(torch=torch.__version__, transformers=transformers.__version__)
    bandwidth = torch_copy_bandwidth(nbytes)
    fields["copy_bandwidth_torch_gbs"] = bandwidth / 1e9
    if torch.cuda.is_available():
        fields["hf_device"] = torch.cuda.get_device_name(0)
    return fields, bandwidth


def bench_hf(cfg, context: int, batch: int, config: DecodeConfig, bandwidth: float) -> dict:
    """One HF measurement (see `moa_jax.bench.decode`): ms/step from the first to the last
    generated token, the prefill left out."""
    # torch and transformers on call: torch is optional (the test extra), and both are slow to load
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and not config.tiny:
        raise RuntimeError("the hf method needs torch with CUDA (or --tiny)")
    n = config.steps
    row = dict(method="hf", variant=HF_LABEL, context=context, batch=batch, steps=n)
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        rope_theta=cfg.rope_theta,
        max_position_embeddings=max(cfg.max_position_embeddings, context + n + 8),
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        attn_implementation="sdpa",
    )
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(hf_cfg).eval()
    finally:
        torch.set_default_dtype(old)
    ids = torch.randint(0, cfg.vocab_size, (batch, context), device=dev)
    gen_kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    if config.hf_static_cache:
        gen_kw["cache_implementation"] = "static"

    stamps: list[float] = []

    class StepClock(LogitsProcessor):
        """Called once per generated token, after that step's forward: a timestamp per step."""

        def __call__(self, input_ids, scores):
            if dev == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            return scores

    gen_kw["logits_processor"] = LogitsProcessorList([StepClock()])

    def timed():
        """(prefill s, decode ms per step) of one `generate` of n + 1 new tokens."""
        stamps.clear()
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n + 1, min_new_tokens=n + 1, **gen_kw)
        if len(stamps) != n + 1:
            raise RuntimeError(f"generate made {len(stamps)} steps, expected {n + 1}")
        return stamps[0] - t0, (stamps[-1] - stamps[0]) * 1e3 / n

    try:
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(config.warmup):
            timed()
        runs = [timed() for _ in range(config.iters)]
        one = statistics.median(r[0] for r in runs)
        ms = statistics.median(r[1] for r in runs)
        w_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        embed = cfg.vocab_size * cfg.hidden_size * 2
        w_read = w_bytes - (0 if cfg.tie_word_embeddings else embed)
        per_token = 2 * cfg.num_kv_heads * cfg.head_dim * 2 * cfg.num_layers * batch
        kv_bytes = per_token * (context + n)
        kv_read = per_token * (context + n / 2)
        floor_ms = (w_read + kv_read) / bandwidth * 1e3 if np.isfinite(bandwidth) else None
        row.update(
            status="ok",
            ms_per_step=ms,
            tokens_per_s=batch * 1e3 / ms,
            prefill_s=one,
            kv_cache_gib=kv_bytes / GIB,
            weights_gib=w_bytes / GIB,
            peak_gib_process=(torch.cuda.max_memory_allocated() / GIB if dev == "cuda" else None),
            weights_read_gib=w_read / GIB,
            kv_read_gib=kv_read / GIB,
            floor_ms=floor_ms,
            floor_ratio=None if floor_ms is None else ms / floor_ms,
            static_cache=bool(config.hf_static_cache),
        )
    finally:
        model = None
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()
    return row


def torch_copy_bandwidth(nbytes: int, iters: int = 10, warmup: int = 3) -> float:
    """`device_memory.copy_bandwidth` measured through torch (for the HF rows)."""
    # torch and transformers on call: torch is optional (the test extra), and both are slow to load
    import torch

    if not torch.cuda.is_available():
        return float("nan")
    x = torch.ones(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    for _ in range(warmup):
        x + 1
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        x + 1
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    del x
    torch.cuda.empty_cache()
    return 2 * (nbytes // 2) * 2 / min(times)
