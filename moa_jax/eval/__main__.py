"""`python -m moa_jax.eval`: does a sparse attention configuration keep the model's quality?

Runs the chosen tasks at the chosen context lengths with every chosen method on the same items,
prints a table (method x task x length), and writes `results.json`, `results.md` and PNG plots
(`accuracy_vs_length.png`, `needle_heatmap.png`) into `--out`.

    python -m moa_jax.eval --model smollm2-135m --tasks retrieval,needle,perplexity \\
        --methods dense,uniform,moa --plan plan.json --lengths 2048,4096 --num-items 5
    python -m moa_jax.eval --config configs/eval/smollm2_cpu.yaml
    python -m moa_jax.eval --model tiny-random --fast --methods dense     # CI smoke run
    python -m moa_jax.eval --merge runs/dense_uniform runs/moa --out runs/all  # combine runs

`--fast` shrinks every unset size (lengths 512,1024, 2 items, 2 depths, 16-token perplexity
tail); explicit flags and YAML keys still win.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from moa_jax.cli import atomic_write_text

DEFAULTS: dict[str, Any] = {
    "tasks": "retrieval,needle,ruler,perplexity",
    "methods": "dense,uniform,moa,recycled",
    "lengths": "2048,4096",
    "num_items": 5,
    "depths": "0,0.25,0.5,0.75,1",
    "ppl_tail": 128,
}
FAST: dict[str, Any] = {
    "lengths": "512,1024",
    "num_items": 2,
    "depths": "0.25,0.75",
    "ppl_tail": 16,
}


def _csv(x: Any) -> list[str]:
    if isinstance(x, (list, tuple)):
        return [str(v).strip() for v in x if str(v).strip()]
    return [v.strip() for v in str(x).split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m moa_jax.eval",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="smollm2-135m", help="preset, HF directory or .gguf file")
    p.add_argument("--dtype", default="float32", help="compute dtype (float32 | bfloat16)")
    p.add_argument(
        "--tasks",
        default=None,
        help=f"comma list of tasks / groups (all, ruler); default {DEFAULTS['tasks']}",
    )
    p.add_argument(
        "--methods",
        default=None,
        help="comma list of dense, uniform, moa, recycled, streaming, h2o; default "
        f"{DEFAULTS['methods']} (unavailable ones are listed and skipped)",
    )
    p.add_argument(
        "--lengths",
        default=None,
        help=f"comma list of context lengths in tokens; default {DEFAULTS['lengths']}",
    )
    p.add_argument(
        "--plan",
        default=None,
        help="MoA plan JSON (moa-jax format or the reference moa_alpha_beta.json)",
    )
    p.add_argument(
        "--density",
        type=float,
        default=0.5,
        help="KV density of 'uniform' when no --plan is given to match",
    )
    p.add_argument("--sink", type=int, default=64, help="sink tokens of 'uniform'")
    p.add_argument(
        "--num-items",
        type=int,
        default=None,
        help=f"items per (task, length) cell; default {DEFAULTS['num_items']}",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--depths",
        default=None,
        help="needle / queried-line depths in [0, 1], cycled over items; default "
        f"{DEFAULTS['depths']}",
    )
    p.add_argument(
        "--corpus",
        default="austen",
        help="book text for haystacks and perplexity: austen, shakespeare or a "
        "local file / directory",
    )
    p.add_argument(
        "--ppl-tail",
        type=int,
        default=None,
        help=f"tokens scored at the end of each perplexity window; default {DEFAULTS['ppl_tail']}",
    )
    p.add_argument(
        "--nll",
        choices=("auto", "all", "none"),
        default="auto",
        help="teacher-forced answer NLL: each task's default (retrieval), all "
        "generation tasks, or none",
    )
    p.add_argument(
        "--no-chat",
        action="store_true",
        help="raw prompts even if the tokenizer has a chat template",
    )
    p.add_argument(
        "--attention-impl",
        choices=("auto", "masked", "native"),
        default="auto",
        help="masked = exact jnp masks in query chunks (CPU default); native = the "
        "library's backends and Pallas kernels (GPU/TPU default)",
    )
    p.add_argument("--q-chunk", type=int, default=512, help="query chunk of the masked impl")
    p.add_argument(
        "--method-opt",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="a method-specific setting (repeatable), e.g. recycled.k=2048",
    )
    p.add_argument("--fast", action="store_true", help="small sizes for CI (see above)")
    p.add_argument("--out", type=Path, default=Path("eval_results"), help="output directory")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG files")
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="RUN[:OLD=NEW,...]",
        help="run nothing: merge earlier runs' results.json (directories or files) "
        "into --out, e.g. methods evaluated at different times on the same "
        "items; ':moa=moa-token' renames a run's methods (two plans' 'moa')",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def resolve_settings(args: argparse.Namespace) -> argparse.Namespace:
    """Fills unset sizes from FAST (with --fast) or DEFAULTS and parses the list flags."""
    for key, default in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, FAST.get(key, default) if args.fast else default)
    args.tasks = _csv(args.tasks)
    args.methods = _csv(args.methods)
    args.lengths = [int(v) for v in _csv(args.lengths)]
    args.depths = [float(v) for v in _csv(args.depths)]
    if not args.lengths or min(args.lengths) < 64:
        raise SystemExit(f"--lengths must be >= 64 tokens, got {args.lengths}")
    if args.num_items < 1:
        raise SystemExit("--num-items must be >= 1")
    opts = {}
    for kv in _csv(args.method_opt) if isinstance(args.method_opt, str) else args.method_opt:
        key, sep, value = str(kv).partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"--method-opt wants METHOD.KEY=VALUE, got {kv!r}")
        opts[key.strip()] = value.strip()
    args.method_opt = opts
    return args


def _device() -> str:
    import jax

    d = jax.devices()[0]
    kind = getattr(d, "device_kind", d.platform)
    if d.platform == "cpu":
        import os

        return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return f"{kind} x{jax.device_count()}"


def _payload(settings, env, result, plan, plan_path, t0, partial):
    from moa_jax.eval.report import depth_table, paired_deltas, summarize

    rows = summarize(result["records"], result["methods"])
    payload = {
        "settings": settings,
        "partial": partial,
        "environment": {**env, "wall_seconds": time.perf_counter() - t0},
        "methods": result["methods"],
        "summary": rows,
        "paired_vs_dense": paired_deltas(result["records"]),
        "depth_tables": {t: depth_table(result["records"], t) for t in ("needle", "retrieval")},
        "records": result["records"],
        "items": result["items"],
    }
    if plan is not None:
        payload["plan"] = {
            "path": str(plan_path),
            "metadata": plan.metadata,
            "kv_density": {str(n): plan.kv_density(n) for n in settings["lengths"]},
        }
    return payload


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Loads the model, runs every cell (saving `results.json` after each) and returns the
    final payload."""
    import jax

    from moa_jax.eval import Runner, TaskContext, resolve_methods, resolve_tasks
    from moa_jax.methods import AttentionConfig, load_plan
    from moa_jax.eval.report import write_json
    from moa_jax.models.registry import load_config, load_model

    try:
        tasks = resolve_tasks(args.tasks)
        methods = resolve_methods(args.methods)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    # cheap checks first: the plan against the model's config, before the weights are read
    cfg = load_config(args.model)
    plan = None
    if args.plan:
        plan = load_plan(args.plan)
        try:
            plan.validate(cfg)
        except ValueError as e:
            raise SystemExit(f"--plan {args.plan}: {e}") from None
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype, param_dtype=args.dtype)
    if tokenizer is None:
        raise SystemExit(f"model {args.model!r} has no tokenizer; the tasks need one")
    print(
        f"loaded {args.model} in {time.perf_counter() - t0:.1f}s "
        f"({cfg.num_layers} layers, {cfg.num_heads} heads)",
        file=sys.stderr,
    )
    too_long = [n for n in args.lengths if n > cfg.max_position_embeddings]
    if too_long:
        print(
            f"warning: lengths {too_long} exceed the model's context "
            f"({cfg.max_position_embeddings})",
            file=sys.stderr,
        )
    mctx = AttentionConfig(
        config=cfg,
        plan=plan,
        density=args.density,
        sink=args.sink,
        impl=args.attention_impl,
        q_chunk=args.q_chunk,
        options=args.method_opt,
    )
    tctx = TaskContext(
        tokenizer,
        chat=not args.no_chat,
        corpus=args.corpus,
        depths=args.depths,
        max_length=max(args.lengths),
        ppl_tail=args.ppl_tail,
    )
    runner = Runner(
        model,
        tokenizer,
        tctx,
        mctx,
        nll=args.nll,
        progress=not args.no_progress,
        log=lambda s: print(s, file=sys.stderr),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    env = {
        "date": datetime.date.today().isoformat(),
        "device": _device(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "attention_impl": mctx.resolved_impl,
        "python": platform.python_version(),
    }
    t0 = time.perf_counter()
    result = runner.run(
        tasks,
        methods,
        args.lengths,
        args.num_items,
        args.seed,
        on_cell=lambda r: write_json(
            args.out / "results.json", _payload(settings, env, r, plan, args.plan, t0, True)
        ),
    )
    return _payload(settings, env, result, plan, args.plan, t0, False)


def _merge_spec(spec: str | Path) -> tuple[Path, dict[str, str]]:
    """'RUN' or 'RUN:old=new,old2=new2' -> (path, {old: new})."""
    text = str(spec)
    path, sep, ren = text.rpartition(":")
    if not sep or "=" not in ren:  # no renames ('runs/a=b' is a plain path)
        path, ren = text, ""
    names = {}
    for pair in filter(None, ren.split(",")):
        old, _, new = pair.partition("=")
        if not old or not new:
            raise SystemExit(f"--merge: bad rename {pair!r} in {text!r} (want OLD=NEW)")
        names[old] = new
    return Path(path), names


def _renamed(payload: dict[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    if not names:
        return payload
    out = dict(payload)
    out["records"] = [
        {**r, "method": names.get(r["method"], r["method"])} for r in payload["records"]
    ]
    out["methods"] = {names.get(m, m): v for m, v in payload["methods"].items()}
    out["settings"] = {
        **payload["settings"],
        "methods": [names.get(m, m) for m in payload["settings"]["methods"]],
    }
    return out


def merge_results(paths: Sequence[str | Path]) -> dict[str, Any]:
    """One payload from several runs' `results.json` (e.g. methods run at different times):
    records are concatenated (a later run's record of the same task, length, method and item
    replaces an earlier one); the runs must have produced identical items for the cells they
    share, which is checked. A path may carry renames, `RUN:moa=moa-token`, so that two runs of
    one method (two plans) stay apart."""
    from moa_jax.eval.report import depth_table, paired_deltas, summarize

    payloads = []
    specs = [_merge_spec(p) for p in paths]
    paths = [p for p, _ in specs]
    for p, names in specs:
        f = Path(p) / "results.json" if Path(p).is_dir() else Path(p)
        if not f.is_file():
            raise SystemExit(f"--merge: no results.json at {p}")
        payloads.append(_renamed(json.loads(f.read_text()), names))
    items: dict[tuple, dict] = {}
    records: dict[tuple, dict] = {}
    methods: dict[str, Any] = {}
    for p, d in zip(paths, payloads):
        if d.get("partial"):
            print(f"warning: {p} holds a partial run", file=sys.stderr)
        for it in d["items"]:
            key = (it["task"], it["length"], it["index"])
            old = items.setdefault(key, it)
            if (old["answer"], old["targets"]) != (it["answer"], it["targets"]):
                raise SystemExit(
                    f"--merge: runs disagree on item {key} (different seed, "
                    "corpus, tokenizer or lengths?)"
                )
        for r in d["records"]:
            records[(r["task"], r["length"], r["method"], r["index"])] = r
        for m, info in d["methods"].items():
            if info.get("available") or m not in methods:
                methods[m] = info
    first = payloads[0]
    settings = dict(first["settings"])
    for key in ("tasks", "methods", "lengths"):
        settings[key] = list(dict.fromkeys(v for d in payloads for v in d["settings"][key]))
    settings["merged_from"] = [str(p) for p in paths]
    recs = list(records.values())
    out = {
        "settings": settings,
        "partial": any(d.get("partial") for d in payloads),
        "environment": {
            **first["environment"],
            "wall_seconds": sum(d["environment"].get("wall_seconds", 0.0) for d in payloads),
        },
        "methods": methods,
        "summary": summarize(recs, methods),
        "paired_vs_dense": paired_deltas(recs),
        "depth_tables": {t: depth_table(recs, t) for t in ("needle", "retrieval")},
        "records": recs,
        "items": list(items.values()),
    }
    plans = [d["plan"] for d in payloads if "plan" in d]
    if plans:
        out["plan"] = plans[-1]
    return out


def write_report(payload: dict[str, Any], out: Path, plots: bool = True) -> str:
    """Writes results.json, results.md and the plots into `out`; returns the markdown."""
    from moa_jax.eval.report import (
        detail_table,
        paired_deltas,
        paired_table,
        pivot_table,
        plot_depth_heatmaps,
        plot_vs_length,
        write_json,
    )

    out.mkdir(parents=True, exist_ok=True)
    # MoA's claim is against one uniform window at the same memory: those differences too
    payload = {**payload, "paired_vs_uniform": paired_deltas(payload["records"], "uniform")}
    write_json(out / "results.json", payload)
    s, env, rows = payload["settings"], payload["environment"], payload["summary"]
    deltas = [d for d in payload["paired_vs_dense"]]
    vs_uniform = [d for d in payload["paired_vs_uniform"] if d["method"] != "dense"]
    skipped = [
        f"- {m}: {info['reason']}"
        for m, info in payload["methods"].items()
        if not info["available"]
    ]
    info = (
        f"{env['date']}, {env['device']}, jax {env['jax']} ({env['attention_impl']} "
        f"attention), {s['num_items']} items per cell, seed {s['seed']}, corpus "
        f"{s['corpus']}, {env['wall_seconds'] / 60:.1f} min."
    )
    md = [
        f"# moa_jax.eval: {s['model']}",
        "",
        info,
        "",
        pivot_table(rows),
        "",
        detail_table(rows),
        "",
    ]
    if deltas:
        md += [
            "Paired differences to dense on the same items (mean +- standard error):",
            "",
            paired_table(deltas),
            "",
        ]
    if vs_uniform:
        md += [
            "Paired differences to the uniform window on the same items:",
            "",
            paired_table(vs_uniform),
            "",
        ]
    if skipped:
        md += ["Methods not run:", *skipped, ""]
    text = "\n".join(md)
    atomic_write_text(out / "results.md", text)
    if plots:
        plot_vs_length(rows, out / "accuracy_vs_length.png")
        plot_depth_heatmaps(payload["records"], out / "needle_heatmap.png")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    from moa_jax.cli import enable_compilation_cache, parse_args

    args = resolve_settings(parse_args(build_parser(), argv))
    enable_compilation_cache()
    if args.merge:
        payload = merge_results(args.merge)
    else:
        payload = run_eval(args)
    text = write_report(payload, args.out, plots=not args.no_plots)
    print(text.split("\n", 3)[3])
    print(
        f"wrote {args.out}/results.json, results.md and plots "
        f"({payload['environment']['wall_seconds']:.0f}s)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    from moa_jax.cli import run as _run

    raise SystemExit(_run(main))
