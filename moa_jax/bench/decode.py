"""Decode throughput benchmark: dense, MoA plans, StreamingLLM, H2O and Recycled Attention in
JAX, and HF transformers' `LlamaForCausalLM` (sdpa), on the same shapes and device.

    python -m moa_jax.bench.decode --method dense recycled streaming --contexts 32768 65536 \\
        --recycle-k 4096 --recycle-stride 10 50 --out decode.json
    python -m moa_jax.bench.decode --tiny          # CPU smoke run (Pallas interpret mode)

A timed run needs a GPU or TPU: on a machine without one, only `--tiny` and `--trace-only` run
(elsewhere the command stops with one line before any work).

On several devices, `--mesh DATA,FSDP,TENSOR` shards rows over data x fsdp and heads over tensor
(weights, caches and the decode loop; `python -m moa_jax.bench.scaling` runs it over device
counts).

Model: Llama-3-8B shapes by default (32 layers, 32 heads over 8 KV heads, head_dim 128, hidden
4096, FFN 14336, vocab 128256), random bf16 weights made on the device (`--layers` shrinks it).
`--shape` picks another preset of `moa_jax.bench.random_model`: llama3.1-8b, mistral-7b,
qwen2.5-7b (28 heads over 4 KV heads, q/k/v biases), qwen3-8b (36 layers, q/k norms), with
their published configs' switches. MoA at KV density 0.5 against the dense kernel at 32k, each
at the largest batch that fits, for one preset:

    python -m moa_jax.bench.decode --shape qwen2.5-7b --method dense-kernel moa \
        --moa-densities 0.5 --contexts 32768 --batches max --steps 50 --out qwen.json

`--tiny --shape NAME --narrow` runs a preset's structure (its family switches, layers, heads
and KV heads) at CPU-sized widths: the presets' smoke run (`tests/test_bench_presets.py`).
`--trace-only` traces each run's programs on the abstract model instead (no weights, caches
or compilation): a check, on a CPU, that a full-size preset, plan and method go through, with
the cache sizes and the largest batch an 80 GB GPU would take.

What one measurement is: for a method, a context length C and a batch B, the KV caches are made
as a prompt of C tokens would leave them (random keys and values; MoA span caches hold each
head's sinks and last span, StreamingLLM its sinks and recent tokens, H2O and Recycled
Attention a valid selection of K prompt tokens; Recycled Attention's decode-step counter starts
at 0 as after a prefill), without running a prefill. Then a jitted `fori_loop` of `--steps`
greedy decode steps (whole model, one token per row per step, cache donated) runs `--warmup`
times and `--iters` timed times; ms/step is the median call time over the steps. `--steps`
should be a multiple of every stride so each call holds the same number of full steps.

Methods (`--method`, several allowed):
  dense        `DenseAttention` (the library's default decode: jnp attention over the cache)
  dense-kernel dense decoding through the recycled full-step Pallas kernel (head-major cache)
  moa          `MoAAttention` with a synthetic heterogeneous plan per `--moa-densities` (0.5:
               a quarter of the heads dense, as whole KV groups, the rest one window with 64
               sinks; 0.25: an eighth dense), and one run per `--plan` (plan files, e.g. the
               MoA reference plans, or 'streaming:W[:S]')
  streaming    StreamingLLM, 4 sinks + K - 4 recent tokens (K = --recycle-k)
  recycled     Recycled Attention, one run per `--recycle-stride` S (fixed schedule), plus the
               dynamic schedule per `--recycle-threshold` (check every `--recycle-check` steps)
  h2o          H2O, K/2 heavy hitters + K/2 recent
  (others)     any other registered method (`moa_jax.methods`, e.g. uniform), with its
               options from `--method-opt METHOD.KEY=VALUE`
  hf           HF transformers `LlamaForCausalLM` (sdpa, `generate`, greedy): ms/step = time
               from the first to the last of `--steps`+1 new tokens / `--steps` (a logits
               processor stamps each step, so the prefill is left out); needs torch
               with CUDA (on CPU only with --tiny); runs before JAX touches the device

Batches: `--batches` are tried in order for each (method, variant, context) until one runs out
of memory; `--refine` then bisects between the last that fit and the first that did not. The
entry `max` is the largest batch whose caches fit in the device memory left after the weights
(from the caches' shapes and the allocator's limit); on running out of memory it retries 5%
smaller. `max` needs a device that reports its memory (GPU, TPU) and is not for `hf`.

With `--out F.json` the report is also plotted: `F.png`, tokens/s per method at batch 1 and at
its best batch, one panel per context.

Reported per run: ms/step, tokens/s (batch / step time), KV-cache GiB (all layers, every
buffer of the method's cache), weights GiB, device memory in use after setup and the process
peak (where the platform reports them), XLA's temporary buffer size of the compiled loop, and
the memory-bandwidth floor: (weight bytes read per step + KV bytes read per step) / measured
copy bandwidth (`x + 1` over a large bf16 array, 2 bytes moved per byte; the fastest of 10
calls). KV read per step
counts the live K/V each method must read: dense C, MoA the valid slots of its span caches,
StreamingLLM and H2O K + 1, Recycled Attention (C + (S - 1)(K + 1)) / S (dynamic: K + 1, a
lower bound), all at the mean position of the timed steps; the step time over that floor is
`floor_ratio`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from moa_jax.bench.batch_search import batch_multiple, guard, largest_batch, sweep
from moa_jax.bench.decode_cache import kv_read_bytes, make_caches
from moa_jax.bench.decode_config import DecodeConfig
from moa_jax.bench.decode_report import format_table, plot_throughput, summarize
from moa_jax.bench.decode_variants import HF_LABEL, Variant, check_plans, make_backend, variants
from moa_jax.bench.device_memory import GIB, copy_bandwidth, memory_stats
from moa_jax.bench.hf_baseline import bench_hf, hf_setup
from moa_jax.bench.kernel_times import format_kernel_times, kernel_times
from moa_jax.bench.preflight import check_out, cpu_only
from moa_jax.bench.random_model import make_weights, model_config
from moa_jax.cli import help_from_doc, parse_config, run, setup_logging
from moa_jax.errors import ConfigError, UserError
from moa_jax.models import registry
from moa_jax.parallel import MeshConfig, batch_sharding, make_mesh, mesh_context

logger = logging.getLogger("moa_jax.bench.decode")  # not __name__: '__main__' under python -m
PROG = "python -m moa_jax.bench.decode"


def decode_loop(graphdef, attention, steps: int) -> Callable:
    """(state, tok, pos, caches) -> (tok, pos, caches) after `steps` greedy decode steps of the
    whole model (one token per row per step): the program one measurement times."""

    def run(state, tok, pos, caches):
        model = nnx.merge(graphdef, state)

        def body(_, carry):
            tok, pos, caches = carry
            logits, caches = model.decode_token(tok, pos, caches, attention)
            return jnp.argmax(logits, -1).astype(jnp.int32), pos + 1, caches

        return jax.lax.fori_loop(0, steps, body, (tok, pos, caches))

    return run


def trace_jax(variant: Variant, cfg, context: int, batch: int, config: DecodeConfig) -> dict:
    """One measurement's programs traced, not run: the caches' fill and the decode loop on the
    abstract model (`jax.eval_shape`: nothing allocated or compiled, so a full-size shape traces
    on a CPU). The row has the caches' and weights' sizes and, for an 80 GB GPU at a memory
    fraction of 0.92, the largest batch that `--batches max` would estimate."""
    abstract_model = registry.abstract_model

    t0 = time.perf_counter()
    cache_len = config.cache_len(context)
    attention = make_backend(variant, cfg, config, cache_len)
    graphdef, state = nnx.split(abstract_model(cfg, dtype="bfloat16", param_dtype="bfloat16"))

    def filled(key):
        made = attention.init_cache(cfg, batch, cache_len, jnp.bfloat16)
        return tuple(c.filled(context, k) for c, k in zip(made, jax.random.split(key, len(made))))

    caches = jax.eval_shape(filled, jax.random.key(0))
    tok = pos = jax.ShapeDtypeStruct((batch,), jnp.int32)
    out = jax.eval_shape(decode_loop(graphdef, attention, config.steps), state, tok, pos, caches)
    if jax.tree_util.tree_structure(out[2]) != jax.tree_util.tree_structure(caches):
        raise RuntimeError("the decode loop returned caches of another structure")

    def nbytes(tree):
        return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))

    kv_bytes, w_bytes = nbytes(caches), nbytes(state)
    h100 = dict(bytes_limit=int(0.92 * 79.2 * GIB), bytes_in_use=w_bytes)
    return dict(
        method=variant.method,
        variant=variant.label,
        context=context,
        batch=batch,
        steps=config.steps,
        **variant.params,
        status="traced",
        trace_s=time.perf_counter() - t0,
        kv_cache_gib=kv_bytes / GIB,
        weights_gib=w_bytes / GIB,
        max_batch_80gb=largest_batch(variant, cfg, context, config, stats=h100),
    )


def bench_jax(
    variant: Variant,
    cfg,
    graphdef,
    state,
    context: int,
    batch: int,
    config: DecodeConfig,
    bandwidth: float,
    mesh=None,
) -> dict:
    """One measurement (see the module docstring); on `mesh` the weights (`state`) must
    already be sharded, and the caches and the loop are sharded by the library's rules."""
    n = config.steps
    cache_len = config.cache_len(context)
    attention = make_backend(variant, cfg, config, cache_len)
    if mesh is not None:
        attention = attention.on_mesh(mesh)
    row = dict(
        method=variant.method,
        variant=variant.label,
        context=context,
        batch=batch,
        steps=n,
        **variant.params,
    )
    caches = make_caches(attention, cfg, batch, cache_len, context, context + batch, mesh)
    kv_bytes = sum(c.nbytes for c in caches)
    w_leaves = jax.tree_util.tree_leaves(state)
    w_bytes = sum(x.nbytes for x in w_leaves)
    embed = cfg.vocab_size * cfg.hidden_size * 2
    w_read = w_bytes - (0 if cfg.tie_word_embeddings else embed)

    run = decode_loop(graphdef, attention, n)
    tok = jnp.zeros((batch,), jnp.int32)
    pos = jnp.full((batch,), context, jnp.int32)
    jit_kw: dict[str, Any] = dict(donate_argnums=(3,))
    if mesh is not None:
        b_sh = batch_sharding(mesh, (batch,))
        tok, pos = jax.device_put(tok, b_sh), jax.device_put(pos, b_sh)
        # The weights and caches were made in their shardings: keep them.
        s_sh, c_sh = jax.tree_util.tree_map(lambda x: x.sharding, (state, caches))
        jit_kw.update(in_shardings=(s_sh, b_sh, b_sh, c_sh), out_shardings=(b_sh, b_sh, c_sh))
    t0 = time.perf_counter()
    with mesh_context(mesh):
        compiled = jax.jit(run, **jit_kw).lower(state, tok, pos, caches).compile()
    row["compile_s"] = time.perf_counter() - t0
    try:
        temp = compiled.memory_analysis().temp_size_in_bytes
        row["temp_gib"] = temp / GIB
    except Exception:  # noqa: BLE001
        temp = 0
    devices = None if mesh is None else list(mesh.devices.flat)
    st = memory_stats(devices)
    row["in_use_gib"] = st.get("bytes_in_use", 0) / GIB or None
    if st.get("bytes_limit") and temp > st["bytes_limit"] - st.get("bytes_in_use", 0):
        # Fail now rather than through the allocator, which retries for seconds first.
        raise RuntimeError(
            f"RESOURCE_EXHAUSTED: the loop's {temp / GIB:.2f} GiB of temporaries "
            f"exceed the {(st['bytes_limit'] - st['bytes_in_use']) / GIB:.2f} GiB "
            "left after weights and caches"
        )
    times = []
    for i in range(config.warmup + config.iters):
        t0 = time.perf_counter()
        tok, pos, caches = compiled(state, tok, pos, caches)
        jax.block_until_ready(tok)
        if i >= config.warmup:
            times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3 / n
    if config.kernel_profile:
        out = []

        def call(fn=compiled, args=(state, tok, pos, caches)):
            out.append(fn(*args))  # keeps the outputs: the input caches were donated
            return out[-1][0]

        row["kernel_profile"] = kernel_times(call, per=n)
        tok, pos, caches = out[-1]
        logger.info(
            "%s C=%d B=%d: device time per step\n%s",
            variant.label,
            context,
            batch,
            format_kernel_times(row["kernel_profile"]),
        )
    live = context + n * (config.warmup + config.iters / 2)
    kv_read = kv_read_bytes(attention, caches, cfg, batch, live, 2)
    st = memory_stats(devices)
    floor_ms = (w_read + kv_read) / bandwidth * 1e3
    row.update(
        status="ok",
        ms_per_step=ms,
        tokens_per_s=batch * 1e3 / ms,
        kv_cache_gib=kv_bytes / GIB,
        weights_gib=w_bytes / GIB,
        peak_gib_process=st.get("peak_bytes_in_use", 0) / GIB or None,
        weights_read_gib=w_read / GIB,
        kv_read_gib=kv_read / GIB,
        floor_ms=floor_ms,
        floor_ratio=ms / floor_ms,
    )
    del caches, compiled
    return row


def run_hf(
    config: DecodeConfig,
    cfg,
    nbytes: int,
    report: dict,
    rows: list[dict],
    log: Callable[[dict], None],
) -> None:
    """The HF rows of every context (run before JAX allocates device memory); without torch
    or transformers one error row."""
    try:
        fields, bandwidth = hf_setup(nbytes)
    except ImportError as e:
        err = dict(method="hf", variant=HF_LABEL, context=None, batch=None, status="error")
        rows.append(dict(err, error=f"ImportError: {e}"))
        return
    report.update(fields)
    for c in config.contexts:
        sweep(
            lambda b: guard(
                lambda: bench_hf(cfg, c, b, config, bandwidth),
                dict(method="hf", variant=HF_LABEL, context=c, batch=b),
            ),
            config.batches,
            config.refine,
            log,
        )


def run_jax(
    jax_variants: list[Variant],
    config: DecodeConfig,
    cfg,
    nbytes: int,
    report: dict,
    log: Callable[[dict], None],
) -> None:
    """The rows of every JAX variant and context, on one set of random weights."""
    if config.compile_cache:
        jax.config.update("jax_compilation_cache_dir", config.compile_cache)
    mesh = make_mesh(MeshConfig.parse(config.mesh)) if config.mesh else None
    dev = jax.devices()[0]
    report.update(
        device=str(dev.device_kind),
        platform=dev.platform,
        jax=jax.__version__,
        mesh=None if mesh is None else dict(mesh.shape),
    )
    bw = copy_bandwidth(nbytes)
    report["copy_bandwidth_gbs"] = bw / 1e9
    t0 = time.perf_counter()
    graphdef, state = make_weights(cfg, mesh=mesh)
    jax.block_until_ready(state)
    report["weights_init_s"] = time.perf_counter() - t0
    for var in jax_variants:
        for c in config.contexts:
            base = dict(method=var.method, variant=var.label, context=c, **var.params)
            sweep(
                lambda b: guard(
                    lambda: bench_jax(var, cfg, graphdef, state, c, b, config, bw, mesh),
                    dict(base, batch=b),
                ),
                config.batches,
                config.refine,
                log,
                largest=lambda: largest_batch(var, cfg, c, config, mesh=mesh),
                multiple=batch_multiple(mesh),
            )


def check_device(config: DecodeConfig) -> None:
    """A timed run (not `--tiny`, not `--trace-only`) needs a GPU or TPU: on a CPU it is a
    `ConfigError` before any work. With `--method hf` torch says whether there is a GPU: JAX
    must not take the device's memory before HF's rows."""
    if config.tiny or config.trace_only:
        return
    accelerated = None
    if "hf" in config.method:
        try:
            import torch  # imported here: only --method hf needs torch
        except ImportError:  # hf's row records the missing torch; JAX may start now
            pass
        else:
            accelerated = torch.cuda.is_available()
    if accelerated is None:
        accelerated = not cpu_only()
    if not accelerated:
        raise ConfigError(
            "bench.decode times GPU/TPU programs; on a CPU pass --tiny for a smoke run "
            "(or --trace-only to trace the programs)"
        )


def check_backends(jax_variants: list[Variant], cfg, config: DecodeConfig) -> None:
    """Every JAX variant's backend built once per context (no arrays made), so that options
    that cannot work stop the command before any run, not as an error row."""
    for var in jax_variants:
        for c in config.contexts:
            try:
                make_backend(var, cfg, config, config.cache_len(c))
            except UserError:
                raise
            except ValueError as e:
                raise ConfigError(f"--method {var.method} ({var.label}, C={c}): {e}") from None


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    config = parse_config(DecodeConfig, argv, prog=PROG, **help_from_doc(__doc__)).resolved()
    check_device(config)
    check_out("--out", config.out)
    rows: list[dict] = []
    cfg = model_config(config.shape, config.layers, narrow=config.narrow)
    if "hf" in config.method and cfg.family != "llama" and not config.trace_only:
        raise ConfigError(
            f"--method hf times LlamaForCausalLM; --shape {config.shape} is a {cfg.family} model"
        )
    check_plans(config, cfg)  # a plan for another model fails before any weights are made
    jax_variants = [v for v in variants(config) if v.method != "hf"]
    check_backends(jax_variants, cfg, config)
    nbytes = int(config.bandwidth_gib * GIB)
    report: dict[str, Any] = dict(
        date=datetime.date.today().isoformat(),
        python=platform.python_version(),
        argv=sys.argv[1:],
        args=dataclasses.asdict(config),
        model=dataclasses.asdict(cfg),
        rows=rows,
    )

    def save():
        if config.out:
            report["summary"] = summarize(rows)
            with open(config.out, "w") as fh:
                json.dump(report, fh, indent=1, default=str)

    def log(row):
        rows.append(row)
        logger.info(json.dumps({k: v for k, v in row.items() if k != "error"}))
        if "error" in row:
            logger.warning("  %s: %s", row["status"], row["error"])
        save()  # after every run, so a run cut short still leaves its results

    if config.trace_only:
        batch = next((b for b in config.batches if b != "max"), 1)
        report.update(jax=jax.__version__, platform=jax.devices()[0].platform)
        for var in jax_variants:
            for c in config.contexts:
                log(trace_jax(var, cfg, c, batch, config))
        save()
        for r in rows:
            print(
                f"traced {config.shape} {r['variant']} C={r['context']} B={r['batch']}: KV "
                f"{r['kv_cache_gib']:.2f} GiB, weights {r['weights_gib']:.2f} GiB, largest "
                f"batch on an 80 GB GPU {r['max_batch_80gb']} ({r['trace_s']:.1f} s)"
            )
        return 0
    if "hf" in config.method:
        run_hf(config, cfg, nbytes, report, rows, log)
    if jax_variants:
        run_jax(jax_variants, config, cfg, nbytes, report, log)
    save()
    if config.out and any(r.get("status") == "ok" for r in rows):
        title = f"{report.get('device') or report.get('hf_device') or ''} {report['date']}"
        plot_throughput(rows, Path(config.out).with_suffix(".png"), title)
    print(format_table([r for r in rows if r.get("context") is not None]))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
