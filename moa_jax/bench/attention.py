"""Prefill attention benchmark: our MoA kernels beside cuDNN and tokamax, forward and fwd+bwd.

    python -m moa_jax.bench.attention --seq-lens 16384 --configs dense mix1024-7168 --out r.json
    python -m moa_jax.bench.attention --plan llama3-8b-262k.moa.json --plan-layers 0 8 16 31
    python -m moa_jax.bench.attention --tiny     # CPU smoke run (interpret mode, S = 256)

It times GPU or TPU kernels: on a machine without one, only `--tiny` runs (elsewhere the
command stops with one line before any work).

Configurations (per sequence length S, B x H query heads over Hkv KV heads, head_dim D):
  dense          every head causal (windows = S), no sinks
  window<W>      every head a W-token window, no sinks
  mix<A>-<B>     the first half of the heads an A-token window, the rest B (no sinks);
                 mix<A>-<B>+sinks the same with 64 sinks on every head
  het50, het25   KV density 50% / 25%: a quarter / an eighth of the heads dense, the rest one
                 short window, 64 sinks
  plan-L<l>      layer l of --plan resolved at S (its windows and sinks), for each --plan-layers
(the short window of het* is rounded to 64 tokens; dense heads are spread over the KV groups).

Implementations (--impls): `moa-mgpu` our Mosaic GPU kernel (Hopper+), `moa-triton` our Triton
kernel, `cudnn` `jax.nn.dot_product_attention(implementation='cudnn')` with one call per distinct
window (`local_window_size=(w - 1, 0)`), `tokamax` tokamax's Mosaic GPU flash attention with a
per-head `k_start` (when importable). The peers have no sinks: their rows drop them, so they do
slightly less work. Each implementation runs in its own try block; a failure is a row with an
error.

Reported: median ms over --iters timed calls after --warmup calls (each call blocked until
ready), TFLOP/s counted on kept entries (forward 4 * D * kept, forward+backward 3.5x that; each
kernel on its own mask), and each implementation's time relative to the fastest peer's.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import platform
import re
import sys

from moa_jax.bench.attention_impls import (
    cudnn_impl,
    fwd_bwd,
    median_ms,
    mgpu_breakdown,
    moa_impl,
    tokamax_impl,
)
from moa_jax.bench.head_configs import case_windows, kept_entries, kv_density
from moa_jax.bench.preflight import check_out, cpu_only
from moa_jax.cli import help_from_doc, option, parse_config, run, setup_logging
from moa_jax.domains import NON_NEGATIVE, POSITIVE, TEXT, Choice, Domain, Int, Options, Relation
from moa_jax.errors import ConfigError, UserError

logger = logging.getLogger("moa_jax.bench.attention")  # not __name__: '__main__' under python -m
PROG = "python -m moa_jax.bench.attention"
IMPLS = ("moa-mgpu", "moa-triton", "cudnn", "tokamax")
_KERNEL_CHOICE = " (default: the kernel's choice)"
Heads = tuple[int, ...]


BLOCK = Int(1, power_of_two=True)
CONFIG_NAME = re.compile(
    r"dense|het50|het25|window[1-9]\d*|mix[1-9]\d*-[1-9]\d*(\+sinks)?|plan-L\d+"
)
CONFIG_NAMES = "dense, window<W>, mix<A>-<B>[+sinks], het50, het25, plan-L<l>"


@dataclasses.dataclass
class AttentionBenchConfig(Options):
    """The shapes, head configurations and implementations to time, and the kernels' blocks;
    None entries take their `--tiny`-dependent default in `resolved()` (a value given is kept
    as given)."""

    seq_lens: list[int] | None = option(
        None,
        "sequence lengths S, one row set each (default 4096 16384 32768; --tiny: 256)",
        Int(1, distinct=True, min_items=1),
        nargs="+",
    )
    configs: list[str] = option(
        ["dense", "mix1024-7168", "mix1024-7168+sinks", "het50"],
        "head configurations: dense, window<W>, mix<A>-<B>[+sinks], het50, "
        "het25 (below); plan-L<l> are added for each --plan-layers",
        Domain(str, nonempty=True, distinct=True, min_items=1),
        nargs="+",
        metavar="CONFIG",
    )
    plan: str | None = option(
        None, "a plan file (ours or the MoA reference's JSON) for plan-L<l> configs", TEXT
    )
    plan_layers: list[int] = option(
        [0, 8, 16, 31], "layers of --plan to benchmark", Int(0, distinct=True)
    )
    impls: list[str] | None = option(
        None,
        "implementations to time, each in its own try block: "
        + ", ".join(IMPLS)
        + " (default: all; --tiny: moa-triton)",
        Domain(str, choices=IMPLS, distinct=True, min_items=1),
        nargs="+",
    )
    mgpu_block_k: int | None = option(
        None, "Mosaic GPU forward key block (64 or 128; default: the kernel's)", Choice(64, 128)
    )
    batch: int = option(1, "batch size B", POSITIVE)
    heads: int = option(32, "query heads H", POSITIVE)
    kv_heads: int = option(8, "KV heads Hkv (GQA when < H)", POSITIVE)
    head_dim: int = option(128, "head dimension D", POSITIVE)
    dtype: str = option("bf16", "q/k/v dtype", Choice("bf16", "f32"))
    iters: int | None = option(
        None, "timed calls, the median is reported (default 10; --tiny: 1)", POSITIVE
    )
    warmup: int | None = option(
        None, "untimed calls first, compilation (default 3; --tiny: 0)", NON_NEGATIVE
    )
    block_q: int = option(128, "Triton forward query block", BLOCK)
    block_k: int = option(64, "Triton forward key block", BLOCK)
    block_q_dq: int | None = option(None, "backward dq pass: query block" + _KERNEL_CHOICE, BLOCK)
    block_k_dq: int | None = option(None, "backward dq pass: key block" + _KERNEL_CHOICE, BLOCK)
    block_q_dkv: int | None = option(
        None, "backward dk/dv pass: query block" + _KERNEL_CHOICE, BLOCK
    )
    block_k_dkv: int | None = option(None, "backward dk/dv pass: key block" + _KERNEL_CHOICE, BLOCK)
    num_warps: int | None = option(None, "Triton warps, forward" + _KERNEL_CHOICE, BLOCK)
    num_stages: int | None = option(
        None, "Triton pipeline stages, forward" + _KERNEL_CHOICE, POSITIVE
    )
    num_warps_bwd: int | None = option(None, "Triton warps, backward" + _KERNEL_CHOICE, BLOCK)
    num_stages_bwd: int | None = option(
        None, "Triton pipeline stages, backward" + _KERNEL_CHOICE, POSITIVE
    )
    no_bwd: bool = option(False, "forward only", action="store_true")
    breakdown: bool = option(False, "also time each Mosaic GPU kernel (fwd, dq, dk/dv) alone")
    profile_dir: str | None = option(
        None,
        "with --breakdown: also trace each Mosaic GPU kernel once with its "
        "in-kernel profiler, traces here, summaries in the JSON",
        TEXT,
    )
    interpret: bool = option(False, "Pallas interpret mode")
    tiny: bool = option(
        False,
        "CPU smoke run: interpret mode, S = 256, our Triton kernel only, one timed call",
    )
    out: str | None = option(None, "write the JSON here", TEXT)

    relations = (
        Relation(
            ("heads", "kv_heads"),
            lambda c: c.heads % c.kv_heads == 0,
            "--heads must be a multiple of --kv-heads",
        ),
        Relation(
            ("profile_dir", "breakdown"),
            lambda c: c.profile_dir is None or c.breakdown,
            "--profile-dir traces the kernels that --breakdown times: pass --breakdown too",
        ),
        Relation(
            ("breakdown", "impls"),
            lambda c: not c.breakdown or c.impls is None or "moa-mgpu" in c.impls,
            "--breakdown times the Mosaic GPU kernels: it needs moa-mgpu in --impls",
        ),
        Relation(
            ("configs", "plan"),
            lambda c: c.plan is not None or not any(k.startswith("plan-L") for k in c.configs),
            "--configs plan-L<l> needs --plan",
        ),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for kind in self.configs:
            if not CONFIG_NAME.fullmatch(kind):
                raise ConfigError(
                    f"--configs {kind!r} is not a head configuration ({CONFIG_NAMES}; W, A, B >= 1)"
                )

    def resolved(self) -> AttentionBenchConfig:
        """This config with every None default filled in (smaller ones with `tiny`, which
        also forces interpret mode). A value given is kept as given."""
        t = self.tiny

        def pick(value, default, tiny_default):
            return value if value is not None else tiny_default if t else default

        return dataclasses.replace(
            self,
            seq_lens=pick(self.seq_lens, [4096, 16384, 32768], [256]),
            impls=pick(self.impls, list(IMPLS), ["moa-triton"]),
            iters=pick(self.iters, 10, 1),
            warmup=pick(self.warmup, 3, 0),
            interpret=self.interpret or t,
        )


def bench_one(
    kind: str, s: int, windows: Heads, sinks: Heads, args: AttentionBenchConfig, rows: list[dict]
) -> None:
    """Appends the rows of one head configuration (per query head `windows` and `sinks`) at
    sequence length `s`: every implementation of `args.impls`, forward and (unless `no_bwd`)
    forward + backward."""
    # jax loads here and in `main`, after the flags: `--help` does not wait for it
    import jax
    import jax.numpy as jnp

    b, h, hkv, d = args.batch, args.heads, args.kv_heads, args.head_dim
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    ks = jax.random.split(jax.random.PRNGKey(s), 4)
    q = jax.random.normal(ks[0], (b, s, h, d), dtype)
    k = jax.random.normal(ks[1], (b, s, hkv, d), dtype)
    v = jax.random.normal(ks[2], (b, s, hkv, d), dtype)
    do = jax.random.normal(ks[3], (b, s, h, d), dtype)
    kept = kept_entries(windows, sinks, s)
    base = dict(
        config=kind,
        seq_len=s,
        batch=b,
        heads=h,
        kv_heads=hkv,
        head_dim=d,
        dtype=args.dtype,
        kv_density=kv_density(windows, sinks, s),
        attention_density=kept / (h * s * (s + 1) / 2),
        windows=sorted(set(windows)),
        sinks=sorted(set(sinks)),
    )
    case_rows = []
    for impl in args.impls:
        try:
            if impl in ("moa-mgpu", "moa-triton"):
                fn = moa_impl("mgpu" if impl == "moa-mgpu" else "gpu", windows, sinks, args)
                n_kept, name = kept, impl
            elif impl == "cudnn":
                fn, n_kept, name = cudnn_impl(windows, s, hkv)
            elif impl == "tokamax":
                fn, n_kept, name = tokamax_impl(windows, s)
            else:
                raise ValueError(f"unknown implementation {impl!r}")
            passes = [("fwd", jax.jit(fn), (q, k, v), 1.0)]
            if not args.no_bwd:
                passes.append(("fwdbwd", fwd_bwd(fn), (q, k, v, do), 3.5))
            for pass_, f, xs, mult in passes:
                ms = median_ms(lambda: f(*xs), args.warmup, args.iters)
                flops = mult * 4.0 * d * b * n_kept
                case_rows.append(
                    dict(
                        base,
                        impl=name,
                        pass_=pass_,
                        ms=ms,
                        tflops=flops / ms / 1e9,
                        kept_entries=int(b * n_kept),
                    )
                )
            if impl == "moa-mgpu" and args.breakdown:
                case_rows[-1]["kernels"] = mgpu_breakdown(q, k, v, do, windows, sinks, kept, args)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - an implementation that fails is a row
            msg = f"{type(e).__name__}: {str(e)[:400]}"
            logger.warning("FAILED %s %s S=%d: %s", impl, kind, s, msg)
            case_rows.append(dict(base, impl=impl, error=msg))
    for pass_ in ("fwd", "fwdbwd"):
        done = [r for r in case_rows if r.get("pass_") == pass_]
        peers = [r["ms"] for r in done if not r["impl"].startswith("moa")]
        for r in done:
            if peers:
                r["time_vs_fastest_peer"] = r["ms"] / min(peers)
    for r in case_rows:
        logger.info(json.dumps({k: v for k, v in r.items() if k not in ("windows", "sinks")}))
    rows.extend(case_rows)


def head_cases(args: AttentionBenchConfig) -> dict[tuple[int, str], tuple[Heads, Heads]]:
    """{(S, configuration): (windows, sinks) per query head} of every case to time: --plan
    loaded and every configuration resolved at every length before any run, so that a
    configuration or plan that does not fit the shapes is a `ConfigError`, not an error row."""
    # moa_jax.plan loads jax: after the flags, so that `--help` does not wait for it
    from moa_jax.plan import Plan

    plan = None
    configs = list(args.configs)
    if args.plan:
        plan = Plan.load(args.plan)
        given = {int(k[len("plan-L") :]): f"--configs {k}" for k in configs if k[:6] == "plan-L"}
        given.update({i: f"--plan-layers {i}" for i in args.plan_layers})
        for layer, flag in given.items():
            if layer >= plan.num_layers:
                raise ConfigError(
                    f"{flag}: {args.plan} has {plan.num_layers} layers (0 to {plan.num_layers - 1})"
                )
        configs += [f"plan-L{i}" for i in args.plan_layers if f"plan-L{i}" not in configs]
    cases = {}
    for s in args.seq_lens:
        for kind in configs:
            try:
                cases[s, kind] = case_windows(kind, s, args.heads, args.kv_heads, plan)
            except ValueError as e:
                name = kind if kind.startswith("plan-L") else f"--configs {kind}"
                raise ConfigError(f"{name} at S={s}: {e}") from None
    return cases


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_config(AttentionBenchConfig, argv, prog=PROG, **help_from_doc(__doc__))
    args = args.resolved()
    if not args.tiny and cpu_only():
        raise ConfigError(
            "bench.attention times GPU/TPU kernels; on a CPU pass --tiny for a smoke run"
        )
    check_out("--out", args.out)
    cases = head_cases(args)

    # jax only after the flags: `--help` does not wait for it
    import jax

    rows: list[dict] = []
    for (s, kind), (windows, sinks) in cases.items():
        try:
            bench_one(kind, s, windows, sinks, args, rows)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - a case that fails at run time is a row
            logger.warning("FAILED %s S=%d: %s: %s", kind, s, type(e).__name__, e)
            rows.append(dict(config=kind, seq_len=s, error=f"{type(e).__name__}: {e}"))
    dev = jax.devices()[0]
    report = dict(
        date=datetime.date.today().isoformat(),
        device=str(dev.device_kind),
        platform=dev.platform,
        jax=jax.__version__,
        python=platform.python_version(),
        args=dataclasses.asdict(args),
        rows=rows,
    )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)
    print(format_table(rows))
    return 0


def format_table(rows: list[dict]) -> str:
    """The rows as a Markdown table (the command's printed answer)."""
    lines = [
        "| S | config | Hkv | kv dens. | pass | impl | ms | TFLOP/s | time vs fastest peer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['seq_len']} | {r['config']} | {r.get('kv_heads', '')} | | | "
                f"{r.get('impl', '')} | error: {r['error'][:60]} | | |"
            )
            continue
        lines.append(
            f"| {r['seq_len']} | {r['config']} | {r['kv_heads']} | {r['kv_density']:.2f} | "
            f"{r['pass_']} | {r['impl']} | {r['ms']:.2f} | {r['tflops']:.0f} | "
            f"{r.get('time_vs_fastest_peer', float('nan')):.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run(main))
