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

import dataclasses
import datetime
import logging
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from moa_jax.cli import MODEL_HELP, option, parse_config, run, setup_logging
from moa_jax.errors import PlanError
from moa_jax.eval import Runner, TaskContext, resolve_tasks
from moa_jax.eval.merge import merge_results
from moa_jax.eval.report import depth_table, paired_deltas, summarize, write_json, write_report
from moa_jax.methods import AttentionConfig, MethodOptions, parse_method_options, resolve_methods
from moa_jax.models import registry
from moa_jax.plan import Plan
from moa_jax.runtime import enable_compilation_cache

logger = logging.getLogger(__package__)  # __name__ is '__main__' under `python -m`

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


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """The flags of `python -m moa_jax.eval` (and the keys of its YAML configs).

    tasks, methods, lengths and depths are comma lists on the command line, comma lists or YAML
    lists in a file; `resolved` fills the unset sizes (from FAST with --fast, else DEFAULTS)
    and makes those four lists.
    """

    model: str = option("smollm2-135m", MODEL_HELP)
    dtype: str = option("float32", "compute dtype (float32 | bfloat16)")
    tasks: str | list[str] | None = option(
        None, f"comma list of tasks / groups (all, ruler); default {DEFAULTS['tasks']}", type=None
    )
    methods: str | list[str] | None = option(
        None,
        "comma list of dense, uniform, moa, recycled, streaming, h2o (any registered "
        f"method); default {DEFAULTS['methods']} (unavailable ones are listed and skipped)",
        type=None,
    )
    method: list[str] | None = option(
        None,
        "a method to run (repeatable, or a comma list), added to --methods",
        action="append",
        metavar="NAME",
    )
    lengths: str | int | list[int] | None = option(
        None, f"comma list of context lengths in tokens; default {DEFAULTS['lengths']}", type=None
    )
    plan: str | None = option(
        None,
        "MoA plan: a JSON file (moa-jax format or the reference moa_alpha_beta.json), "
        "'dense' or 'streaming:WINDOW[:SINK]'",
    )
    density: float = option(
        0.5, "KV density of 'uniform' when no --plan is given to match (uniform.density)"
    )
    sink: int = option(64, "sink tokens of 'uniform' (uniform.sink)")
    num_items: int | None = option(
        None, f"items per (task, length) cell; default {DEFAULTS['num_items']}"
    )
    seed: int = option(0, "seed of the items")
    depths: str | float | list[float] | None = option(
        None,
        f"needle / queried-line depths in [0, 1], cycled over items; default {DEFAULTS['depths']}",
        type=None,
    )
    corpus: str = option(
        "austen",
        "book text for haystacks and perplexity: austen, shakespeare or a local file / directory",
    )
    ppl_tail: int | None = option(
        None,
        f"tokens scored at the end of each perplexity window; default {DEFAULTS['ppl_tail']}",
    )
    nll: str = option(
        "auto",
        "teacher-forced answer NLL: each task's default (retrieval), all generation tasks, or none",
        choices=("auto", "all", "none"),
    )
    no_chat: bool = option(
        False, "raw prompts even if the tokenizer has a chat template", action="store_true"
    )
    attention_impl: str = option(
        "auto",
        "masked = exact jnp masks in query chunks (CPU default); native = the "
        "library's backends and Pallas kernels (GPU/TPU default)",
        choices=("auto", "masked", "native"),
    )
    q_chunk: int = option(512, "query chunk of the masked impl")
    method_opt: list[str] = option(
        [],
        "a method's typed option (repeatable), e.g. recycled.k=2048, recycled.stride=none, "
        "uniform.match=heads (`moa_jax.methods`: each method's options type)",
        action="append",
        metavar="METHOD.KEY=VALUE",
    )
    fast: bool = option(False, f"small sizes for CI: unset ones from {FAST}", action="store_true")
    out: Path = option(Path("eval_results"), "output directory", type=Path)
    no_plots: bool = option(False, "skip the PNG files", action="store_true")
    merge: list[str] | None = option(
        None,
        "run nothing: merge earlier runs' results.json (directories or files) "
        "into --out, e.g. methods evaluated at different times on the same "
        "items; ':moa=moa-token' renames a run's methods (two plans' 'moa')",
        nargs="+",
        metavar="RUN[:OLD=NEW,...]",
    )
    no_progress: bool = option(False, "no progress bars", action="store_true")

    def resolved(self) -> EvalConfig:
        """Unset sizes from FAST (with --fast) or DEFAULTS; tasks, methods, lengths and depths
        as lists. Bad sizes and a malformed --method-opt are usage errors."""
        sizes = {
            k: FAST.get(k, default) if self.fast else default
            for k, default in DEFAULTS.items()
            if getattr(self, k) is None and not (k == "methods" and self.method)
        }
        c = dataclasses.replace(self, **sizes)
        c = dataclasses.replace(
            c,
            tasks=_csv(c.tasks),
            methods=list(dict.fromkeys(_csv(c.methods or []) + _csv(",".join(c.method or [])))),
            method=None,
            lengths=[int(v) for v in _csv(c.lengths)],
            depths=[float(v) for v in _csv(c.depths)],
        )
        if not c.lengths or min(c.lengths) < 64:
            raise SystemExit(f"--lengths must be >= 64 tokens, got {c.lengths}")
        if c.num_items < 1:
            raise SystemExit("--num-items must be >= 1")
        try:
            c.typed_method_options()
        except ValueError as e:
            raise SystemExit(str(e)) from None
        return c

    def typed_method_options(self) -> dict[str, MethodOptions]:
        """Every method's typed options: --density and --sink as `uniform`'s, then
        --method-opt (which wins); ValueError naming a bad option."""
        text = {"uniform.density": str(self.density), "uniform.sink": str(self.sink)}
        return parse_method_options({**text, **self.method_options()})

    def method_options(self) -> dict[str, str]:
        """--method-opt's METHOD.KEY=VALUE settings as {"METHOD.KEY": "VALUE"}."""
        opts = {}
        given = _csv(self.method_opt) if isinstance(self.method_opt, str) else self.method_opt
        for kv in given:
            key, sep, value = str(kv).partition("=")
            if not sep or "." not in key:
                raise SystemExit(f"--method-opt wants METHOD.KEY=VALUE, got {kv!r}")
            opts[key.strip()] = value.strip()
        return opts

    def settings(self) -> dict[str, Any]:
        """The config as results.json's "settings" (JSON values, --method-opt as a mapping)."""
        out = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "method"
        }
        out["out"] = str(self.out)
        out["method_opt"] = self.method_options()
        return out


def _device() -> str:
    d = jax.devices()[0]
    kind = getattr(d, "device_kind", d.platform)
    if d.platform == "cpu":
        return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return f"{kind} x{jax.device_count()}"


def _payload(settings, env, result, plan, plan_path, t0, partial):
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


def run_eval(config: EvalConfig) -> dict[str, Any]:
    """Runs a resolved config (`EvalConfig.resolved`): loads the model, runs every cell (saving
    `results.json` after each) and returns the final payload."""
    try:
        tasks = resolve_tasks(config.tasks)
        methods = resolve_methods(config.methods)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    # cheap checks first: the plan against the model's config, before the weights are read
    cfg = registry.load_config(config.model)
    plan = None
    if config.plan:
        try:
            plan = Plan.load(config.plan, cfg.num_layers, cfg.num_heads).validate(cfg)
        except ValueError as e:  # a PlanError names the plan (and the model) itself
            raise SystemExit(
                str(e) if isinstance(e, PlanError) else f"--plan {config.plan}: {e}"
            ) from None
    t0 = time.perf_counter()
    model, tokenizer = registry.load_model(
        config.model, dtype=config.dtype, param_dtype=config.dtype
    )
    if tokenizer is None:
        raise SystemExit(f"model {config.model!r} has no tokenizer; the tasks need one")
    logger.info(
        f"loaded {config.model} in {time.perf_counter() - t0:.1f}s "
        f"({cfg.num_layers} layers, {cfg.num_heads} heads)"
    )
    too_long = [n for n in config.lengths if n > cfg.max_position_embeddings]
    if too_long:
        logger.warning(
            f"lengths {too_long} exceed the model's context ({cfg.max_position_embeddings})"
        )
    mctx = AttentionConfig(
        config=cfg,
        plan=plan,
        impl=config.attention_impl,
        q_chunk=config.q_chunk,
        options=config.typed_method_options(),
    )
    tctx = TaskContext(
        tokenizer,
        chat=not config.no_chat,
        corpus=config.corpus,
        depths=config.depths,
        max_length=max(config.lengths),
        ppl_tail=config.ppl_tail,
    )
    runner = Runner(
        model,
        tokenizer,
        tctx,
        mctx,
        nll=config.nll,
        progress=not config.no_progress,
        log=logger.info,
    )
    config.out.mkdir(parents=True, exist_ok=True)
    settings = config.settings()
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
        config.lengths,
        config.num_items,
        config.seed,
        on_cell=lambda r: write_json(
            config.out / "results.json", _payload(settings, env, r, plan, config.plan, t0, True)
        ),
    )
    return _payload(settings, env, result, plan, config.plan, t0, False)


def main(argv: Sequence[str] | None = None) -> int:
    description = __doc__.split("\n\n")[0]
    config = parse_config(
        EvalConfig, argv, prog="python -m moa_jax.eval", description=description
    ).resolved()
    setup_logging()
    enable_compilation_cache()
    if config.merge:
        payload = merge_results(config.merge)
    else:
        payload = run_eval(config)
    text = write_report(payload, config.out, plots=not config.no_plots)
    print(text.split("\n", 3)[3])
    logger.info(
        f"wrote {config.out}/results.json, results.md and plots "
        f"({payload['environment']['wall_seconds']:.0f}s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
