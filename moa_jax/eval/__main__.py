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
tail); explicit flags and YAML keys still win. List options take values or comma lists.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import jax

from moa_jax.cli import MODEL_HELP, option, parse_config, run, setup_logging
from moa_jax.config import DTYPE_NAMES, ModelConfig
from moa_jax.corpora import load_corpus
from moa_jax.domains import (
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    TEXT,
    Choice,
    Domain,
    Float,
    Int,
    Options,
    Relation,
)
from moa_jax.errors import ConfigError, PlanError
from moa_jax.eval import Runner, Task, TaskContext, resolve_tasks
from moa_jax.eval.merge import merge_results
from moa_jax.eval.report import depth_table, paired_deltas, summarize, write_json, write_report
from moa_jax.methods import (
    AttentionConfig,
    Method,
    MethodOptions,
    parse_method_options,
    resolve_methods,
)
from moa_jax.models import registry
from moa_jax.plan import Plan
from moa_jax.runtime import enable_compilation_cache

logger = logging.getLogger(__package__)  # __name__ is '__main__' under `python -m`

DEFAULTS: dict[str, Any] = {
    "tasks": ["retrieval", "needle", "ruler", "perplexity"],
    "methods": ["dense", "uniform", "moa", "recycled"],
    "lengths": [2048, 4096],
    "num_items": 5,
    "depths": [0.0, 0.25, 0.5, 0.75, 1.0],
    "ppl_tail": 128,
}
"""The values of the options that are None until set (tasks, methods, sizes)."""
FAST: dict[str, Any] = {
    "lengths": [512, 1024],
    "num_items": 2,
    "depths": [0.25, 0.75],
    "ppl_tail": 16,
}
"""What --fast changes of DEFAULTS."""


class CommaList:
    """argparse `type` of a list option that also takes comma lists: '512,1024' is two items,
    each through the option's domain (`Domain.parse`); a YAML number is one item. Each value
    becomes a list, which the config flattens."""

    def __init__(self, domain: Domain):
        self.domain = domain
        self.__name__ = domain.kind.__name__

    def __call__(self, value: Any) -> list[Any]:
        try:
            if isinstance(value, str):
                return [self.domain.parse(v.strip()) for v in value.split(",")]
            return [self.domain.check(value)]
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None


def _comma_list(default: Any, help_: str, domain: Domain, **kw: Any) -> Any:
    """An `option` whose flag takes values (or comma lists of them) and whose YAML key takes a
    list, a comma list or one value."""
    kw.setdefault("nargs", "+")
    return option(default, help_, domain, type=CommaList(domain), **kw)


def _words(values: list[Any]) -> str:
    return ",".join(map(str, values))


_LISTS = ("tasks", "methods", "method", "lengths", "depths")


def _items(values: list[Any] | tuple[Any, ...]) -> list[Any]:
    """A list option's items: the lists a flag's comma lists became flattened, a comma text
    (--method's, whose YAML values reach the config as given) split."""
    out: list[Any] = []
    for v in values:
        if isinstance(v, (list, tuple)):
            out += _items(v)
        elif isinstance(v, str):
            out += [x.strip() for x in v.split(",")]
        else:
            out.append(v)
    return out


@dataclasses.dataclass(frozen=True)
class EvalConfig(Options):
    """The flags of `python -m moa_jax.eval` (and the keys of its YAML configs).

    tasks, methods, method, lengths and depths are lists: on the command line values or comma
    lists (`--lengths 2048,4096`, `--lengths 2048 4096`), in a file a YAML list, a comma list or
    one value. Unset (None) sizes, tasks and methods take FAST's values with --fast, else
    DEFAULTS's, when the config is made: a value given is never replaced.
    """

    model: str = option("smollm2-135m", MODEL_HELP, TEXT)
    dtype: str = option("float32", "compute dtype (float32 | bfloat16)", Choice(*DTYPE_NAMES))
    tasks: list[str] | None = _comma_list(
        None,
        f"tasks / groups (all, ruler); default {_words(DEFAULTS['tasks'])}",
        Domain(str, nonempty=True, min_items=1),
    )
    methods: list[str] | None = _comma_list(
        None,
        "dense, uniform, moa, recycled, streaming, h2o (any registered method); default "
        f"{_words(DEFAULTS['methods'])} (unavailable ones are listed and skipped)",
        Domain(str, nonempty=True, min_items=1),
    )
    # repeatable: argparse's append takes no YAML list through a `type`, so its comma texts
    # are split by the config (`_items`)
    method: list[str] | None = option(
        None,
        "a method to run (repeatable, or a comma list), added to --methods",
        TEXT,
        action="append",
        metavar="NAME",
    )
    lengths: list[int] | None = _comma_list(
        None,
        f"context lengths in tokens; default {_words(DEFAULTS['lengths'])} "
        f"(--fast: {_words(FAST['lengths'])})",
        Int(64, distinct=True, min_items=1),
    )
    plan: str | None = option(
        None,
        "MoA plan: a JSON file (moa-jax format or the reference moa_alpha_beta.json), "
        "'dense' or 'streaming:WINDOW[:SINK]'",
        TEXT,
    )
    density: float = option(
        0.5,
        "KV density of 'uniform' when no --plan is given to match (uniform.density)",
        FRACTION,
    )
    sink: int = option(64, "sink tokens of 'uniform' (uniform.sink)", NON_NEGATIVE)
    num_items: int | None = option(
        None,
        f"items per (task, length) cell; default {DEFAULTS['num_items']} "
        f"(--fast: {FAST['num_items']})",
        POSITIVE,
    )
    seed: int = option(0, "seed of the items", NON_NEGATIVE)
    depths: list[float] | None = _comma_list(
        None,
        "needle / queried-line depths in [0, 1], cycled over items; default "
        f"{_words(DEFAULTS['depths'])} (--fast: {_words(FAST['depths'])})",
        Float(0.0, 1.0, distinct=True, min_items=1),
    )
    corpus: str = option(
        "austen",
        "book text for haystacks and perplexity: austen, shakespeare or a local file / directory",
        TEXT,
    )
    ppl_tail: int | None = option(
        None,
        f"tokens scored at the end of each perplexity window (fewer than the shortest length); "
        f"default {DEFAULTS['ppl_tail']} (--fast: {FAST['ppl_tail']})",
        POSITIVE,
    )
    nll: str = option(
        "auto",
        "teacher-forced answer NLL: each task's default (retrieval), all generation tasks, or none",
        Choice("auto", "all", "none"),
    )
    no_chat: bool = option(
        False, "raw prompts even if the tokenizer has a chat template", action="store_true"
    )
    attention_impl: str = option(
        "auto",
        "masked = exact jnp masks in query chunks (CPU default); native = the "
        "library's backends and Pallas kernels (GPU/TPU default)",
        Choice("auto", "masked", "native"),
    )
    q_chunk: int = option(512, "query chunk of the masked impl", POSITIVE)
    method_opt: list[str] = option(
        [],
        "a method's typed option (repeatable), e.g. recycled.k=2048, recycled.stride=none, "
        "uniform.match=heads (`moa_jax.methods`: each method's options type)",
        TEXT,
        action="append",
        metavar="METHOD.KEY=VALUE",
    )
    fast: bool = option(False, f"small sizes for CI: unset ones from {FAST}", action="store_true")
    out: str = option("eval_results", "output directory", TEXT)
    no_plots: bool = option(False, "skip the PNG files", action="store_true")
    merge: list[str] | None = option(
        None,
        "run nothing: merge earlier runs' results.json (directories or files) "
        "into --out, e.g. methods evaluated at different times on the same "
        "items; ':moa=moa-token' renames a run's methods (two plans' 'moa')",
        Domain(str, nonempty=True, min_items=1),
        nargs="+",
        metavar="RUN[:OLD=NEW,...]",
    )
    no_progress: bool = option(False, "no progress bars", action="store_true")

    relations: ClassVar[tuple[Relation, ...]] = (
        Relation(
            ("ppl_tail", "lengths", "tasks"),
            lambda c: c.ppl_tail < min(c.lengths) or all(t.kind != "lm" for t in c.task_list()),
            "--ppl-tail must be smaller than the shortest --lengths value (perplexity scores "
            "the last --ppl-tail tokens of each window)",
        ),
    )

    def __post_init__(self) -> None:
        for key in _LISTS:
            value = getattr(self, key)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, key, _items(value))
        preset = {**DEFAULTS, **FAST} if self.fast else DEFAULTS
        for key, value in preset.items():
            if getattr(self, key) is None and not (key == "methods" and self.method):
                object.__setattr__(self, key, list(value) if isinstance(value, list) else value)
        if self.method:
            methods = [*(self.methods or []), *self.method]
            object.__setattr__(self, "methods", list(dict.fromkeys(methods)))
        super().__post_init__()
        self.method_list()
        for task in self.task_list():
            for n in self.lengths:
                try:
                    task.budget(n)
                except ValueError as e:
                    raise ConfigError(f"--lengths: {e}") from None
        self.typed_method_options()

    def task_list(self) -> list[Task]:
        """The tasks --tasks names (groups expanded); ConfigError naming an unknown one."""
        try:
            return resolve_tasks(self.tasks)
        except ValueError as e:
            raise ConfigError(f"--tasks: {e}") from None

    def method_list(self) -> list[Method]:
        """The methods of --methods and --method; ConfigError naming an unknown one."""
        try:
            return resolve_methods(self.methods)
        except ValueError as e:
            raise ConfigError(f"--methods: {e}") from None

    def typed_method_options(self) -> dict[str, MethodOptions]:
        """Every method's typed options: --density and --sink as `uniform`'s, then
        --method-opt (which wins); ConfigError naming a bad option."""
        text = {"uniform.density": str(self.density), "uniform.sink": str(self.sink)}
        return parse_method_options({**text, **self.method_options()})

    def method_options(self) -> dict[str, str]:
        """--method-opt's METHOD.KEY=VALUE settings as {"METHOD.KEY": "VALUE"}."""
        opts = {}
        for kv in self.method_opt:
            key, sep, value = kv.partition("=")
            if not sep or "." not in key:
                raise ConfigError(f"--method-opt wants METHOD.KEY=VALUE, got {kv!r}")
            opts[key.strip()] = value.strip()
        return opts

    def settings(self) -> dict[str, Any]:
        """The config as results.json's "settings" (JSON values, --method-opt as a mapping)."""
        out = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "method"
        }
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


def _load_plan(config: EvalConfig, cfg: ModelConfig) -> Plan | None:
    """--plan, checked against the model's config."""
    if not config.plan:
        return None
    try:
        return Plan.load(config.plan, cfg.num_layers, cfg.num_heads).validate(cfg)
    except ValueError as e:  # a PlanError names the plan (and the model) itself
        raise PlanError(
            str(e) if isinstance(e, PlanError) else f"--plan {config.plan}: {e}"
        ) from None


def run_eval(config: EvalConfig) -> dict[str, Any]:
    """Runs a config: checks what needs no model run (the plan against the model's config,
    every method's backend at every length, the corpus, every cell's items), then loads the
    model, creates --out and runs every cell (saving `results.json` after each); returns the
    final payload."""
    tasks, methods = config.task_list(), config.method_list()
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a directory")
    cfg = registry.load_config(config.model)
    plan = _load_plan(config, cfg)
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
    for m in methods:  # a method that cannot run is skipped; one that can must build
        if m.unavailable(mctx) is None:
            for n in config.lengths:
                m.build(mctx, n)
    docs = None
    if any(t.uses_corpus for t in tasks):
        docs = load_corpus(config.corpus)
    t0 = time.perf_counter()
    model, tokenizer = registry.load_model(
        config.model, dtype=config.dtype, param_dtype=config.dtype
    )
    if tokenizer is None:
        raise ConfigError(f"model {config.model!r} has no tokenizer; the tasks need one")
    logger.info(
        f"loaded {config.model} in {time.perf_counter() - t0:.1f}s "
        f"({cfg.num_layers} layers, {cfg.num_heads} heads)"
    )
    tctx = TaskContext(
        tokenizer,
        chat=not config.no_chat,
        corpus=config.corpus,
        depths=config.depths,
        max_length=max(config.lengths),
        ppl_tail=config.ppl_tail,
        docs=docs,
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
    items = runner.make_items(tasks, config.lengths, config.num_items, config.seed)
    out.mkdir(parents=True, exist_ok=True)
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
            out / "results.json", _payload(settings, env, r, plan, config.plan, t0, True)
        ),
        items=items,
    )
    return _payload(settings, env, result, plan, config.plan, t0, False)


def main(argv: Sequence[str] | None = None) -> int:
    description = __doc__.split("\n\n")[0]
    config = parse_config(EvalConfig, argv, prog="python -m moa_jax.eval", description=description)
    setup_logging()
    enable_compilation_cache()
    if config.merge:
        payload = merge_results(config.merge)
    else:
        payload = run_eval(config)
    text = write_report(payload, Path(config.out), plots=not config.no_plots)
    print(text.split("\n", 3)[3])
    logger.info(
        f"wrote {config.out}/results.json, results.md and plots "
        f"({payload['environment']['wall_seconds']:.0f}s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
