"""Decode throughput benchmark: dense, MoA plans, StreamingLLM, H2O and Recycled Attention in
JAX, and HF transformers' `LlamaForCausalLM` (sdpa), on the same shapes and device.

    python -m moa_jax.bench.decode --method dense recycled streaming --contexts 32768 65536 \\
        --recycle-k 4096 --recycle-stride 10 50 --out decode.json
    python -m moa_jax.bench.decode --tiny          # CPU smoke run (Pallas interpret mode)

On several devices, `--mesh DATA,FSDP,TENSOR` shards rows over data x fsdp and heads over tensor
(weights, caches and the decode loop; `python -m moa_jax.bench.scaling` runs it over device
counts).

Model: Llama-3-8B shapes by default (32 layers, 32 heads over 8 KV heads, head_dim 128, hidden
4096, FFN 14336, vocab 128256), random bf16 weights made on the device (`--layers` shrinks it).

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

import argparse
import dataclasses
import datetime
import functools
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

GIB = float(1 << 30)

LLAMA3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    rope_theta=500000.0,
    max_position_embeddings=131072,
)
TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rope_theta=10000.0,
    max_position_embeddings=4096,
)
JAX_METHODS = ("dense", "dense-kernel", "moa", "streaming", "recycled", "h2o")
METHODS = JAX_METHODS + ("hf",)


def model_config(args):
    from moa_jax.config import ModelConfig

    d = dict(TINY if args.tiny else LLAMA3_8B)
    if args.layers:
        d["num_layers"] = args.layers
    return ModelConfig(**d)


def _is_oom(e: BaseException) -> bool:
    s = f"{type(e).__name__}: {e}"
    return any(
        x in s
        for x in (
            "RESOURCE_EXHAUSTED",
            "Out of memory",
            "out of memory",
            "OutOfMemory",
            "Failed to allocate",
            "OOM",
        )
    )


# ------------------------------------------------------------------------------ variants
@dataclasses.dataclass
class Variant:
    method: str
    label: str
    make: Any = None  # f(context, cache_len) -> AttentionBackend
    params: dict = dataclasses.field(default_factory=dict)


def variants(args, cfg) -> list[Variant]:
    from moa_jax.models.attention import DenseAttention
    from moa_jax.models.recycled import (
        FullCacheAttention,
        H2OAttention,
        RecycleConfig,
        RecycledAttention,
        StreamingAttention,
    )

    kw = dict(
        kernel_backend=args.kernel_backend,
        interpret=args.interpret or None,
        block=args.block,
        num_splits=args.num_splits,
    )
    k = args.recycle_k
    out: list[Variant] = []
    for m in args.method:
        if m == "dense":
            out.append(Variant(m, "dense", lambda c, n: DenseAttention()))
        elif m == "dense-kernel":
            out.append(Variant(m, "dense-kernel", lambda c, n: FullCacheAttention(**kw)))
        elif m == "moa":
            specs = [f"het:{d}" for d in args.moa_densities] + list(args.plan or ())
            for spec in specs:
                name = spec if spec.startswith(("het:", "streaming:")) else Path(spec).stem
                out.append(Variant(m, f"moa {name}", _moa_maker(spec, cfg, args), dict(plan=spec)))
        elif m == "streaming":
            out.append(
                Variant(m, f"streaming K={k}", lambda c, n: StreamingAttention(k, **kw), dict(k=k))
            )
        elif m == "h2o":
            out.append(Variant(m, f"h2o K={k}", lambda c, n: H2OAttention(k, **kw), dict(k=k)))
        elif m == "recycled":
            for s in args.recycle_stride:
                rc = RecycleConfig(k, s or None)
                out.append(
                    Variant(
                        m,
                        f"recycled K={k} S={s or 'never'}",
                        (lambda rc_: lambda c, n: RecycledAttention(rc_, **kw))(rc),
                        dict(k=k, stride=s or None),
                    )
                )
            for thr in args.recycle_threshold or ():
                rc = RecycleConfig(k, args.recycle_check, thr)
                out.append(
                    Variant(
                        m,
                        f"recycled K={k} dyn={thr} QC={args.recycle_check}",
                        (lambda rc_: lambda c, n: RecycledAttention(rc_, **kw))(rc),
                        dict(k=k, threshold=thr, check=args.recycle_check),
                    )
                )
        elif m == "hf":
            out.append(Variant(m, "hf transformers sdpa"))
    return out


def _moa_maker(spec, cfg, args):
    from moa_jax.models.moa_attention import MoAAttention
    from moa_jax.plan import Plan

    def make(context, cache_len):
        if spec.startswith("het:"):
            from moa_jax.bench.attention import plan_windows

            density = float(spec[4:])
            kind = {0.5: "het50", 0.25: "het25"}.get(density)
            if kind is None:
                raise ValueError(f"--moa-densities takes 0.5 or 0.25, got {density}")
            w, s = plan_windows(kind, cache_len, cfg.num_heads, cfg.num_kv_heads, dense_groups=True)
            plan = Plan.from_windows([list(w)] * cfg.num_layers, [list(s)] * cfg.num_layers)
        elif Path(spec).is_file():
            plan = Plan.load(spec)
        else:
            plan = Plan.from_spec(spec, cfg.num_layers, cfg.num_heads)
        return MoAAttention(
            plan.validate(cfg), kernel_backend=args.kernel_backend, interpret=args.interpret or None
        )

    return make


# ------------------------------------------------------------------------------ caches
def fill_cache(cache, context: int, key):
    """A layer cache as a prompt of `context` tokens leaves it (random K/V, valid state)."""
    import jax
    import jax.numpy as jnp

    from moa_jax.models.kv_cache import DenseKVCache
    from moa_jax.pallas_kernels.moa_cache import SpanKVCache
    from moa_jax.models.recycled import (
        HeadMajorKVCache,
        RecycledKVCache,
        SelectedKVCache,
        streaming_positions,
    )

    k1, k2, k3, k4 = jax.random.split(key, 4)

    def rnd(kk, x):
        return jax.random.normal(kk, x.shape, jnp.float32).astype(x.dtype)

    def random_selection(kk, b, hkv, slots, top_k):
        sc = jax.random.uniform(kk, (b, hkv, context))
        kk_ = min(top_k, context)
        idx = jax.lax.top_k(sc, kk_)[1].astype(jnp.int32)
        return jnp.pad(idx, ((0, 0), (0, 0), (0, slots - kk_)), constant_values=-1)

    if isinstance(cache, (DenseKVCache, HeadMajorKVCache)):
        return dataclasses.replace(cache, k=rnd(k1, cache.k), v=rnd(k2, cache.v))
    if isinstance(cache, SpanKVCache):
        b, _, d = cache.k.shape
        one = jnp.zeros((b, 1, cache.num_kv_heads, d), cache.k.dtype)
        c = cache.write(one, one, jnp.zeros((b,), jnp.int32), jnp.full((b,), context, jnp.int32))
        return dataclasses.replace(c, k=rnd(k1, c.k), v=rnd(k2, c.v))
    if isinstance(cache, RecycledKVCache):
        b, hkv, slots, _ = cache.kp.shape
        ck, cv = rnd(k1, cache.k), rnd(k2, cache.v)
        idx = random_selection(k3, b, hkv, slots, cache.top_k)
        take = jnp.maximum(idx, 0)[..., None]
        return dataclasses.replace(
            cache,
            k=ck,
            v=cv,
            idx=idx,
            kp=jnp.take_along_axis(ck, take, axis=2),
            vp=jnp.take_along_axis(cv, take, axis=2),
            ref_q=jax.random.normal(k4, cache.ref_q.shape, jnp.float32),
        )
    if isinstance(cache, SelectedKVCache):
        b, hkv, slots, _ = cache.kp.shape
        if cache.acc is None:
            idx = streaming_positions(jnp.full((b,), context - 1, jnp.int32), cache.top_k, 4, slots)
            idx = jnp.broadcast_to(idx[:, None], (b, hkv, slots))
            acc = None
        else:
            idx = random_selection(k3, b, hkv, slots, cache.top_k)
            acc = jnp.where(idx >= 0, jax.random.uniform(k4, idx.shape), -jnp.inf)
        return dataclasses.replace(
            cache, kp=rnd(k1, cache.kp), vp=rnd(k2, cache.vp), idx=idx, acc=acc
        )
    raise TypeError(f"no filler for cache type {type(cache).__name__}")


def kv_read_bytes(variant: Variant, caches, cfg, batch: int, live: float, itemsize: int) -> float:
    """K/V bytes (all layers and rows) that a decode step of the method must read."""
    per_token = 2 * cfg.num_kv_heads * cfg.head_dim * itemsize * cfg.num_layers * batch
    m = variant.method
    if m in ("dense", "dense-kernel", "hf"):
        return per_token * live
    if m == "moa":
        slots = sum(float(np.asarray(c.pos >= 0).sum()) for c in caches)  # all rows, layers
        return 2 * cfg.head_dim * itemsize * slots
    k = variant.params["k"]
    if m in ("streaming", "h2o"):
        return per_token * (k + 1)
    if m == "recycled":
        s = variant.params.get("stride")
        if s is None or "threshold" in variant.params:
            return per_token * (k + 1)
        return per_token * (live + (s - 1) * (k + 1)) / s
    raise ValueError(m)


# ------------------------------------------------------------------------------ measurements
def copy_bandwidth(nbytes: int, iters: int = 10, warmup: int = 3) -> float:
    """Bytes per second of `x + 1` over a bf16 array of nbytes (read + write counted), from the
    fastest of `iters` calls after `warmup`: single calls vary by up to 30% on a GPU whose
    clocks are still rising, and the floor should use what the memory can do."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda a: a + jnp.bfloat16(1))
    for _ in range(warmup):
        jax.block_until_ready(f(x))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x))
        times.append(time.perf_counter() - t0)
    del x
    return 2 * (nbytes // 2) * 2 / min(times)


def _memory_stats(devices=None) -> dict:
    """The allocator's statistics; over several devices the largest use and peak and the
    smallest limit (what bounds a program sharded over all of them)."""
    import jax

    out: dict = {}
    for d in devices if devices is not None else jax.devices()[:1]:
        try:
            st = d.memory_stats() or {}
        except Exception:  # noqa: BLE001
            st = {}
        for k in ("bytes_in_use", "peak_bytes_in_use"):
            if k in st:
                out[k] = max(out.get(k, 0), st[k])
        if st.get("bytes_limit"):
            out["bytes_limit"] = min(out.get("bytes_limit", st["bytes_limit"]), st["bytes_limit"])
    return out


def make_weights(
    cfg, seed: int = 0, *, param_dtype: str = "bfloat16", dtype: str = "bfloat16", mesh=None
):
    """(graphdef, state) of a random model made on the device(s), sharded over `mesh` by the
    library's parameter rules if given.

    Leaf by leaf, one small jitted generator per distinct (shape, dtype, sharding): jitting the
    whole model's initialiser compiles for minutes at 8B shapes, while the values do not matter
    here.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from moa_jax.models.llama import abstract_model

    graphdef, abstract = nnx.split(abstract_model(cfg, dtype=dtype, param_dtype=param_dtype))
    leaves, treedef = jax.tree_util.tree_flatten(abstract)
    if mesh is not None:
        from moa_jax.parallel import param_shardings

        shardings = jax.tree_util.tree_leaves(param_shardings(abstract, mesh))
    else:
        shardings = [None] * len(leaves)
    fns: dict[Any, Any] = {}

    def gen(key, shape, dt):
        if len(shape) == 1:  # norm scales
            return jnp.ones(shape, dt)
        return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dt)

    keys = jax.random.split(jax.random.key(seed), len(leaves))
    made = []
    for k, x, sh in zip(keys, leaves, shardings):
        fk = (tuple(x.shape), jnp.dtype(x.dtype), sh)
        if fk not in fns:
            fns[fk] = jax.jit(functools.partial(gen, shape=fk[0], dt=fk[1]), out_shardings=sh)
        made.append(fns[fk](k))
    return graphdef, jax.tree_util.tree_unflatten(treedef, made)


def make_caches(
    attention, cfg, batch: int, cache_len: int, context: int, seed: int, mesh=None
) -> tuple:
    """Per-layer caches as a prompt of `context` tokens leaves them (`fill_cache`), each made
    by its own jitted call straight into its sharding on `mesh`, so that no zero copy of the
    caches is ever allocated."""
    import jax
    import jax.numpy as jnp

    abstract = jax.eval_shape(lambda: attention.init_cache(cfg, batch, cache_len, jnp.bfloat16))
    if mesh is not None:
        from moa_jax.parallel import cache_shardings

        shardings = cache_shardings(abstract, mesh)
    else:
        shardings = (None,) * len(abstract)
    keys = jax.random.split(jax.random.key(seed), len(abstract))
    caches = []
    for i, (kk, sh) in enumerate(zip(keys, shardings)):

        def one(key, i=i):
            return fill_cache(
                attention.init_cache(cfg, batch, cache_len, jnp.bfloat16)[i], context, key
            )

        caches.append(jax.jit(one, out_shardings=sh)(kk))
    return tuple(caches)


def _cache_len(context: int, args) -> int:
    """Cache slots for a prompt of `context` tokens and every decode step of the timed calls."""
    return context + args.steps * (args.warmup + args.iters) + 1


def bench_jax(
    variant: Variant,
    cfg,
    graphdef,
    state,
    context: int,
    batch: int,
    args,
    bandwidth: float,
    mesh=None,
) -> dict:
    """One measurement (see the module docstring); on `mesh` the weights (`state`) must
    already be sharded, and the caches and the loop are sharded by the library's rules."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from moa_jax.parallel import batch_sharding, mesh_context

    n = args.steps
    cache_len = _cache_len(context, args)
    attention = variant.make(context, cache_len)
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
    kv_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(caches))
    w_leaves = jax.tree_util.tree_leaves(state)
    w_bytes = sum(x.nbytes for x in w_leaves)
    embed = cfg.vocab_size * cfg.hidden_size * 2
    w_read = w_bytes - (0 if cfg.tie_word_embeddings else embed)

    def run(state, tok, pos, caches):
        model = nnx.merge(graphdef, state)

        def body(_, carry):
            tok, pos, caches = carry
            logits, caches = model(
                tok[:, None], pos[:, None], caches, attention, logits_at=jnp.zeros_like(pos)
            )
            return jnp.argmax(logits, -1).astype(jnp.int32), pos + 1, caches

        return jax.lax.fori_loop(0, n, body, (tok, pos, caches))

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
    st = _memory_stats(devices)
    row["in_use_gib"] = st.get("bytes_in_use", 0) / GIB or None
    if st.get("bytes_limit") and temp > st["bytes_limit"] - st.get("bytes_in_use", 0):
        # Fail now rather than through the allocator, which retries for seconds first.
        raise RuntimeError(
            f"RESOURCE_EXHAUSTED: the loop's {temp / GIB:.2f} GiB of temporaries "
            f"exceed the {(st['bytes_limit'] - st['bytes_in_use']) / GIB:.2f} GiB "
            "left after weights and caches"
        )
    times = []
    for i in range(args.warmup + args.iters):
        t0 = time.perf_counter()
        tok, pos, caches = compiled(state, tok, pos, caches)
        jax.block_until_ready(tok)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3 / n
    if args.kernel_profile:
        from moa_jax.bench.kernel_times import format_kernel_times, kernel_times

        out = []

        def call(fn=compiled, args=(state, tok, pos, caches)):
            out.append(fn(*args))  # keeps the outputs: the input caches were donated
            return out[-1][0]

        row["kernel_profile"] = kernel_times(call, per=n)
        tok, pos, caches = out[-1]
        print(
            f"{variant.label} C={context} B={batch}: device time per step\n"
            + format_kernel_times(row["kernel_profile"]),
            file=sys.stderr,
            flush=True,
        )
    live = context + n * (args.warmup + args.iters / 2)
    kv_read = kv_read_bytes(variant, caches, cfg, batch, live, 2)
    st = _memory_stats(devices)
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


def bench_hf(cfg, context: int, batch: int, args, bandwidth: float) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and not args.tiny:
        raise RuntimeError("the hf method needs torch with CUDA (or --tiny)")
    n = args.steps
    row = dict(method="hf", variant="hf transformers sdpa", context=context, batch=batch, steps=n)
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
    if args.hf_static_cache:
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
        for _ in range(args.warmup):
            timed()
        runs = [timed() for _ in range(args.iters)]
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
            static_cache=bool(args.hf_static_cache),
        )
    finally:
        model = None
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()
    return row


def _torch_copy_bandwidth(nbytes: int, iters: int = 10, warmup: int = 3) -> float:
    """`copy_bandwidth` measured through torch (for the HF rows)."""
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


# ------------------------------------------------------------------------------ sweep
def sweep(run_one, batches: list, refine: bool, log, largest=None, multiple: int = 1) -> list[dict]:
    """Runs batches in order until one runs out of memory; optionally bisects the boundary.

    An entry "max" runs `largest()` (the estimated largest batch; skipped when not above the
    last batch that fit) and, while that runs out of memory, up to 4 batches 5% smaller each
    (rounded down to a `multiple`).
    """
    rows, fit, oom = [], None, None

    def go(b):
        row = run_one(b)
        rows.append(row)
        log(row)
        return row["status"]

    for b in batches:
        if b == "max":
            if largest is None:
                raise ValueError("batch 'max' needs a memory estimate (a GPU or TPU, not hf)")
            b = largest()
            if fit is not None and b <= fit:
                continue
            status = go(b)
            for _ in range(4):
                if status != "oom" or b <= 1 or (fit is not None and b <= fit + 1):
                    break
                smaller = max(1, min(b - 1, int(b * 0.95)))
                smaller = max(multiple, smaller - smaller % multiple)
                if smaller >= b:
                    break
                oom, b = b, smaller
                status = go(b)
        else:
            status = go(b)
        if status == "ok":
            fit = b
        else:
            if status == "oom":
                oom = b
            break
    if refine and fit is not None and oom is not None:
        lo, hi = fit, oom
        while hi - lo > 1:
            mid = (lo + hi) // 2
            status = go(mid)
            if status == "ok":
                lo = mid
            elif status == "oom":
                hi = mid
            else:
                break
    return rows


def largest_batch(
    variant: Variant, cfg, context: int, args, stats: dict | None = None, mesh=None
) -> int:
    """Largest batch whose caches (plus one layer's copy while they are filled, and 1 GiB for
    the loop's temporaries) fit in the device memory not yet in use; on `mesh` the caches
    spread over every device and the batch is a multiple of the data x fsdp size."""
    import jax
    import jax.numpy as jnp

    devices = None if mesh is None else list(mesh.devices.flat)
    st = _memory_stats(devices) if stats is None else stats
    if not st.get("bytes_limit"):
        raise RuntimeError("batch 'max' needs a device that reports its memory limit")
    cache_len = _cache_len(context, args)
    attention = variant.make(context, cache_len)

    def nbytes(b):
        shapes = jax.eval_shape(lambda: attention.init_cache(cfg, b, cache_len, jnp.bfloat16))
        return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(shapes))

    per_row = (nbytes(2) - nbytes(1)) * (1 + 1 / cfg.num_layers)
    free = st["bytes_limit"] - st.get("bytes_in_use", 0) - GIB
    if mesh is None:
        return max(1, int(free // per_row))
    rows = batch_multiple(mesh)
    b = int(free * mesh.devices.size // per_row)
    return max(rows, b - b % rows)


def batch_multiple(mesh) -> int:
    """Batches on `mesh` are multiples of this (rows split over data x fsdp)."""
    return 1 if mesh is None else int(mesh.shape["data"] * mesh.shape["fsdp"])


def _guard(fn, base: dict) -> dict:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        status = "oom" if _is_oom(e) else "error"
        return dict(base, status=status, error=f"{type(e).__name__}: {str(e)[:400]}")
    finally:
        gc.collect()


def summarize(rows: list[dict]) -> dict:
    """Per (variant, context) the largest batch that ran and the batch of highest tokens/s (they
    differ where throughput falls at large batches, as HF transformers' does), and throughput
    ratios against dense, dense-kernel, StreamingLLM and HF: at equal batch, at each one's
    largest batch and at each one's best."""
    ok = [r for r in rows if r.get("status") == "ok"]
    largest: dict[tuple[str, int], dict] = {}
    fastest: dict[tuple[str, int], dict] = {}
    for r in ok:
        key = (r["variant"], r["context"])
        if key not in largest or r["batch"] > largest[key]["batch"]:
            largest[key] = r
        if key not in fastest or r["tokens_per_s"] > fastest[key]["tokens_per_s"]:
            fastest[key] = r

    def listing(by):
        return [
            dict(
                variant=v,
                context=c,
                batch=r["batch"],
                tokens_per_s=r["tokens_per_s"],
                ms_per_step=r["ms_per_step"],
            )
            for (v, c), r in sorted(by.items(), key=lambda x: (x[0][1], x[0][0]))
        ]

    out = dict(largest_batch=listing(largest), best_throughput=listing(fastest))
    ratios = []
    for r in ok:
        for base in ("dense", "dense-kernel", "streaming", "hf"):
            if r["method"] == base:
                continue
            same = [
                b
                for b in ok
                if b["method"] == base and b["context"] == r["context"] and b["batch"] == r["batch"]
            ]
            if same:
                ratios.append(
                    dict(
                        variant=r["variant"],
                        context=r["context"],
                        batch=r["batch"],
                        baseline=same[0]["variant"],
                        step_time_ratio=r["ms_per_step"] / same[0]["ms_per_step"],
                        throughput_ratio=r["tokens_per_s"] / same[0]["tokens_per_s"],
                    )
                )
    for at, by in (("largest batches", largest), ("best throughput", fastest)):
        for (v, c), r in by.items():
            for (bv, bc), b in by.items():
                if (
                    bc == c
                    and bv != v
                    and b["method"] in ("dense", "dense-kernel", "hf", "streaming")
                ):
                    ratios.append(
                        dict(
                            variant=v,
                            context=c,
                            batch=r["batch"],
                            baseline=bv,
                            baseline_batch=b["batch"],
                            at=at,
                            throughput_ratio=r["tokens_per_s"] / b["tokens_per_s"],
                        )
                    )
    out["ratios"] = ratios
    return out


def plot_throughput(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Bar chart of tokens/s per method at batch 1 and at its best batch (highest tokens/s),
    one panel per context (the figure beside the JSON report)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok" and r.get("context") is not None]
    contexts = sorted({r["context"] for r in ok})
    if not contexts:
        raise ValueError("no successful rows to plot")
    fastest = {(r["variant"], r["context"]): r for r in summarize(ok)["best_throughput"]}
    fig, axes = plt.subplots(1, len(contexts), figsize=(5.5 * len(contexts), 4.2), squeeze=False)
    for ax, c in zip(axes[0], contexts):
        here = [r for r in ok if r["context"] == c]
        names = list(dict.fromkeys(r["variant"] for r in here))
        one = [
            max(
                (r["tokens_per_s"] for r in here if r["variant"] == n and r["batch"] == 1),
                default=0.0,
            )
            for n in names
        ]
        best = [fastest[(n, c)] for n in names]
        x = np.arange(len(names))
        ax.bar(x - 0.2, one, 0.4, label="batch 1")
        bars = ax.bar(x + 0.2, [r["tokens_per_s"] for r in best], 0.4, label="best batch")
        for bar, r in zip(bars, best):
            ax.annotate(
                f"b={r['batch']}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("tokens / s")
        ax.set_title(f"context {c}")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_table(rows: list[dict]) -> str:
    head = (
        "| method | context | batch | ms/step | tok/s | KV GiB | peak GiB | floor ms | "
        "step/floor | status |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]

    def f(x, fmt):
        return "" if x is None else format(x, fmt)

    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['context']} | {r['batch']} | {f(r.get('ms_per_step'), '.2f')}"
            f" | {f(r.get('tokens_per_s'), '.1f')} | {f(r.get('kv_cache_gib'), '.2f')} | "
            f"{f(r.get('peak_gib_process'), '.1f')} | {f(r.get('floor_ms'), '.2f')} | "
            f"{f(r.get('floor_ratio'), '.2f')} | {r['status']} |"
        )
    return "\n".join(lines)


def _batch(s: str):
    if s == "max":
        return s
    try:
        b = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"batch must be a positive integer or 'max', got {s!r}"
        ) from None
    if b < 1:
        raise argparse.ArgumentTypeError(f"batch must be positive, got {b}")
    return b


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m moa_jax.bench.decode",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "--method",
        nargs="+",
        choices=METHODS,
        default=None,
        help="methods to run (default: dense dense-kernel moa streaming recycled)",
    )
    p.add_argument(
        "--contexts",
        type=int,
        nargs="+",
        default=None,
        help="prompt lengths C (default 32768 65536; --tiny: 40)",
    )
    p.add_argument(
        "--batches",
        type=_batch,
        nargs="+",
        default=None,
        help="batch sizes tried in order until OOM; 'max' = the estimated largest "
        "that fits (default 1 2 4 ... 256)",
    )
    p.add_argument(
        "--refine",
        action="store_true",
        help="bisect between the largest batch that fit and the first OOM",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="decode steps per timed call (default 100; --tiny: 4)",
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--layers", type=int, default=None, help="override the layer count")
    p.add_argument(
        "--recycle-k",
        type=int,
        default=None,
        help="K of streaming / h2o / recycled (default 4096; --tiny: 16)",
    )
    p.add_argument(
        "--recycle-stride",
        type=int,
        nargs="+",
        default=None,
        help="fixed strides S of the recycled runs, 0 = never refresh (SnapKV) "
        "(default 10 50; --tiny: 2)",
    )
    p.add_argument(
        "--recycle-threshold",
        type=float,
        nargs="*",
        default=None,
        help="dynamic-schedule thresholds (one recycled run each)",
    )
    p.add_argument(
        "--recycle-check",
        type=int,
        default=10,
        help="query check interval QC of the dynamic schedule",
    )
    p.add_argument(
        "--moa-densities",
        type=float,
        nargs="*",
        default=[0.5, 0.25],
        help="synthetic MoA plans by KV density (0.5, 0.25)",
    )
    p.add_argument(
        "--plan",
        nargs="+",
        default=None,
        help="MoA plan files or specs, run besides the synthetic --moa-densities "
        "(pass --moa-densities with no value for none)",
    )
    p.add_argument("--kernel-backend", default="auto", choices=["auto", "gpu", "tpu", "reference"])
    p.add_argument("--interpret", action="store_true", help="Pallas interpret mode")
    p.add_argument(
        "--block",
        type=int,
        default=None,
        help="cache block of the recycled caches (default 64; 128 on TPU)",
    )
    p.add_argument("--num-splits", type=int, default=None, help="GPU split-K of the decode")
    p.add_argument(
        "--kernel-profile",
        action="store_true",
        help="after timing, run one call under jax.profiler and report the device "
        "time per kernel and step (row field kernel_profile)",
    )
    p.add_argument(
        "--hf-static-cache",
        action="store_true",
        help="hf: generate with cache_implementation='static'",
    )
    p.add_argument(
        "--bandwidth-gib",
        type=float,
        default=None,
        help="size of the copy-bandwidth probe (default 2 GiB; --tiny 0.01)",
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="CPU smoke run: a 2-layer tiny model, small shapes, interpret mode",
    )
    p.add_argument(
        "--mesh",
        default=None,
        metavar="DATA,FSDP,TENSOR",
        help="decode on a device mesh (moa_jax.parallel): rows over data x fsdp, "
        "heads over tensor (weights by the library's rules, caches by their "
        "logical axes), e.g. 8,1,1 (data parallel) or 1,1,8 (tensor parallel); "
        "default: one device",
    )
    p.add_argument("--compile-cache", default=None, help="persistent XLA compilation cache dir")
    p.add_argument("--out", default=None, help="write the JSON report here")
    return p


def _defaults(args):
    t = args.tiny
    if args.method is None:
        args.method = ["dense", "dense-kernel", "moa", "streaming", "recycled"]
    args.contexts = args.contexts or ([40] if t else [32768, 65536])
    args.batches = args.batches or ([1, 2] if t else [1, 2, 4, 8, 16, 32, 64, 128, 256])
    args.steps = args.steps or (4 if t else 100)
    args.recycle_k = args.recycle_k or (16 if t else 4096)
    args.recycle_stride = args.recycle_stride or ([2] if t else [10, 50])
    args.bandwidth_gib = args.bandwidth_gib or (0.01 if t else 2.0)
    if t:
        args.interpret = True
        args.block = args.block or 16
        args.warmup = min(args.warmup, 1)
        args.iters = min(args.iters, 1)
    return args


def main(argv=None) -> int:
    parser = build_parser()
    args = _defaults(parser.parse_args(argv))
    if "hf" in args.method and "max" in args.batches:
        parser.error("--batches max is not available for --method hf: give batch sizes")
    if "hf" in args.method and args.mesh:
        parser.error("--mesh is for the JAX methods; run hf without it")
    rows: list[dict] = []
    cfg = model_config(args)
    nbytes = int(args.bandwidth_gib * GIB)
    report: dict[str, Any] = dict(
        date=datetime.date.today().isoformat(),
        python=platform.python_version(),
        argv=sys.argv[1:],
        args=vars(args),
        model=dataclasses.asdict(cfg),
        rows=rows,
    )

    def save():
        if args.out:
            report["summary"] = summarize(rows)
            with open(args.out, "w") as fh:
                json.dump(report, fh, indent=1, default=str)

    def log(row):
        rows.append(row)
        keep = {k: v for k, v in row.items() if k not in ("error",)}
        print(json.dumps(keep), flush=True)
        if "error" in row:
            print(f"  {row['status']}: {row['error']}", file=sys.stderr, flush=True)
        save()  # after every run, so a run cut short still leaves its results

    # HF first, before JAX allocates device memory.
    if "hf" in args.method:
        try:
            import torch
            import transformers

            report["torch"], report["transformers"] = torch.__version__, transformers.__version__
            bw_t = _torch_copy_bandwidth(nbytes)
            report["copy_bandwidth_torch_gbs"] = bw_t / 1e9
            if torch.cuda.is_available():
                report["hf_device"] = torch.cuda.get_device_name(0)
        except ImportError as e:
            bw_t = float("nan")
            rows.append(
                dict(
                    method="hf",
                    variant="hf transformers sdpa",
                    context=None,
                    batch=None,
                    status="error",
                    error=f"ImportError: {e}",
                )
            )
        else:
            for c in args.contexts:
                sweep(
                    lambda b: _guard(
                        lambda: bench_hf(cfg, c, b, args, bw_t),
                        dict(method="hf", variant="hf transformers sdpa", context=c, batch=b),
                    ),
                    args.batches,
                    args.refine,
                    log,
                )
    jax_vars = [v for v in variants(args, cfg) if v.method != "hf"]
    if jax_vars:
        import jax

        if args.compile_cache:
            jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        from moa_jax.parallel import MeshConfig, make_mesh

        mesh = make_mesh(MeshConfig.parse(args.mesh)) if args.mesh else None
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
        for var in jax_vars:
            for c in args.contexts:
                base = dict(method=var.method, variant=var.label, context=c, **var.params)
                sweep(
                    lambda b: _guard(
                        lambda: bench_jax(var, cfg, graphdef, state, c, b, args, bw, mesh),
                        dict(base, batch=b),
                    ),
                    args.batches,
                    args.refine,
                    log,
                    largest=lambda: largest_batch(var, cfg, c, args, mesh=mesh),
                    multiple=batch_multiple(mesh),
                )
    save()
    if args.out and any(r.get("status") == "ok" for r in rows):
        title = f"{report.get('device') or report.get('hf_device') or ''} {report['date']}"
        plot_throughput(rows, Path(args.out).with_suffix(".png"), title)
    print(format_table([r for r in rows if r.get("context") is not None]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
