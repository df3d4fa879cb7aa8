# ruff: noqa: E501 - one case per line
"""A survey of malformed inputs across the commands and the Python API, sorted by outcome.

    python scripts/boundary_survey.py --out docs/results/boundary_survey.json

Each case runs in-process on the `tiny-random` preset (CPU, nothing downloaded), in an empty
working directory, and is sorted into:

  clear        exit 2 (or the error's own code), one `error:` line naming the expected word,
               no traceback, nothing written (API: an exception naming the argument)
  silent       the command or function went on and returned a result
  unclear      refused, but the line names none of the expected words
  traceback    a Python traceback reached the user (API: an exception of an unexpected type)
  left_behind  refused, but a file or folder was left in the working directory

The JSON holds every case with its outcome and message; a table of counts prints at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import math
import os
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

COMMANDS = {
    "generate": "moa_jax.generate.__main__:main",
    "profile": "moa_jax.profile.__main__:main",
    "eval": "moa_jax.eval.__main__:main",
    "eval.heads": "moa_jax.eval.heads:main",
    "train": "moa_jax.train.loop:main",
    "bench.attention": "moa_jax.bench.attention:main",
    "bench.decode": "moa_jax.bench.decode:main",
}
TINY = ["--model", "tiny-random"]
BASE = {"train": [*TINY, "--seq-len", "16"]}
"""The argv a command's cases start from, where it needs more than the model."""

# (flag, value, words the error must name) per command: values of the kinds users get wrong:
# out of range, NaN / inf, wrong type, zero where zero means nothing, repeats, bad choices
OPTION_CASES: dict[str, list[tuple[str, str, str]]] = {
    "generate": [
        ("--max-new-tokens", "-3", "--max-new-tokens"),
        ("--max-new-tokens", "1.5", "--max-new-tokens"),
        ("--temperature", "-0.5", "--temperature"),
        ("--temperature", "inf", "--temperature"),
        ("--temperature", "NaN", "--temperature"),
        ("--top-k", "-1", "--top-k"),
        ("--top-p", "1.5", "--top-p"),
        ("--top-p", "nan", "--top-p"),
        ("--top-p", "-0.1", "--top-p"),
        ("--seed", "-7", "--seed"),
        ("--dtype", "int8", "--dtype"),
        ("--param-dtype", "float64x", "--param-dtype"),
        ("--recycle-k", "0", "--recycle-k"),
        ("--recycle-k", "-16", "--recycle-k"),
        ("--recycle-stride", "-1", "--recycle-stride"),
        ("--recycle-threshold", "1.5", "--recycle-threshold"),
        ("--recycle-threshold", "nan", "--recycle-threshold"),
        ("--max-cache-len", "0", "--max-cache-len"),
        ("--plan", "streaming:0", "WINDOW"),
        ("--plan", "streaming:16:-2", "SINK"),
        ("--plan", "streaming:16:4:4", "streaming:WINDOW"),
        ("--plan", "nosuchplan.json", "nosuchplan.json"),
        ("--method", "sparse", "--method"),
        ("--method-opt", "k=abc", "k"),
        ("--mesh", "1,x,1", "mesh"),
        ("--model", "nosuch-model", "nosuch-model"),
    ],
    "profile": [
        ("--lengths", "0", "--lengths"),
        ("--lengths", "-512", "--lengths"),
        ("--lengths", "512 512", "--lengths"),
        ("--lengths", "5e2", "--lengths"),
        ("--items", "0", "--items"),
        ("--density", "0", "--density"),
        ("--density", "1.5", "--density"),
        ("--density", "nan", "--density"),
        ("--band", "2", "--band"),
        ("--band", "-0.1", "--band"),
        ("--batch-size", "0", "--batch-size"),
        ("--sink", "-1", "--sink"),
        ("--answer-tokens", "0", "--answer-tokens"),
        ("--recall-fraction", "1.5", "--recall-fraction"),
        ("--max-rules-per-layer", "0", "--max-rules-per-layer"),
        ("--eps-intervals", "-1", "--eps-intervals"),
        ("--milp-time-limit", "-5", "--milp-time-limit"),
        ("--milp-gap", "nan", "--milp-gap"),
        ("--validation-items", "0", "--validation-items"),
        ("--max-candidates", "0", "--max-candidates"),
        ("--q-chunk", "0", "--q-chunk"),
        ("--attn-chunk", "0", "--attn-chunk"),
        ("--estimator", "magic", "--estimator"),
        ("--budget-on", "everything", "--budget-on"),
        ("--validate-backend", "cuda", "--validate-backend"),
        ("--corpus", "nosuch.jsonl", "nosuch.jsonl"),
        ("--dtype", "fp8", "--dtype"),
    ],
    "eval": [
        ("--density", "0", "--density"),
        ("--density", "inf", "--density"),
        ("--sink", "-4", "--sink"),
        ("--num-items", "0", "--num-items"),
        ("--lengths", "0", "--lengths"),
        ("--lengths", "256 256", "--lengths"),
        ("--depths", "1.5", "--depths"),
        ("--depths", "nan", "--depths"),
        ("--ppl-tail", "0", "--ppl-tail"),
        ("--q-chunk", "0", "--q-chunk"),
        ("--nll", "sometimes", "--nll"),
        ("--attention-impl", "fast", "--attention-impl"),
        ("--tasks", "passkeys", "task"),
        ("--methods", "sparse", "method"),
        ("--seed", "1.5", "--seed"),
        ("--plan", "streaming:x", "WINDOW"),
        ("--corpus", "nosuch.txt", "nosuch.txt"),
        ("--dtype", "half-ish", "--dtype"),
    ],
    "eval.heads": [
        ("--lengths", "0", "--lengths"),
        ("--num-items", "0", "--num-items"),
        ("--density", "2", "--density"),
        ("--dense-fraction", "-0.5", "--dense-fraction"),
        ("--sink", "-1", "--sink"),
        ("--top", "0", "--top"),
    ],
    "train": [
        ("--lr", "inf", "--lr"),
        ("--lr", "-1e-3", "--lr"),
        ("--lr", "0", "--lr"),
        ("--b1", "2", "--b1"),
        ("--b2", "-1", "--b2"),
        ("--b2", "1", "--b2"),
        ("--eps", "0", "--eps"),
        ("--weight-decay", "-0.1", "--weight-decay"),
        ("--clip-norm", "nan", "--clip-norm"),
        ("--min-lr-ratio", "1.5", "--min-lr-ratio"),
        ("--steps", "0", "--steps"),
        ("--batch-size", "0", "--batch-size"),
        ("--grad-accum", "0", "--grad-accum"),
        ("--warmup-steps", "-1", "--warmup-steps"),
        ("--seq-len", "-8", "--seq-len"),
        ("--keep-checkpoints", "0", "--keep-checkpoints"),
        ("--log-every", "0", "--log-every"),
        ("--schedule", "zigzag", "--schedule"),
        ("--packing", "tight", "--packing"),
        ("--attention", "sparse", "--attention"),
        ("--mesh-data", "0", "--mesh-data"),
        ("--peak-tflops", "-1", "--peak-tflops"),
        ("--corpus", "nosuch.jsonl", "nosuch.jsonl"),
        ("--dtype", "int4", "--dtype"),
    ],
    "bench.attention": [
        ("--seq-lens", "0", "--seq-lens"),
        ("--seq-lens", "1024 1024", "--seq-lens"),
        ("--batch", "0", "--batch"),
        ("--heads", "0", "--heads"),
        ("--kv-heads", "3", "kv"),
        ("--head-dim", "0", "--head-dim"),
        ("--iters", "0", "--iters"),
        ("--warmup", "-1", "--warmup"),
        ("--block-q", "100", "--block-q"),
        ("--block-k", "0", "--block-k"),
        ("--dtype", "f16x", "--dtype"),
        ("--impls", "flashy", "--impls"),
        ("--plan-layers", "-1", "--plan-layers"),
    ],
    "bench.decode": [
        ("--contexts", "0", "--contexts"),
        ("--batches", "0", "batch"),
        ("--steps", "0", "--steps"),
        ("--iters", "0", "--iters"),
        ("--warmup", "-1", "--warmup"),
        ("--recycle-k", "0", "--recycle-k"),
        ("--recycle-stride", "-1", "--recycle-stride"),
        ("--recycle-threshold", "2", "--recycle-threshold"),
        ("--moa-densities", "0", "--moa-densities"),
        ("--moa-densities", "1.5", "--moa-densities"),
        ("--layers", "0", "--layers"),
        ("--method", "fastest", "--method"),
        ("--shape", "llama9", "--shape"),
        ("--bandwidth-gib", "-1", "--bandwidth-gib"),
    ],
}

# the same kinds as YAML values: (key, YAML text of the value, words)
YAML_CASES: dict[str, list[tuple[str, str, str]]] = {
    "generate": [
        ("temperature", ".nan", "temperature"),
        ("max_new_tokens", "2.5", "max_new_tokens"),
        ("top_k", "true", "top_k"),
        ("prompt", "{a: 1}", "prompt"),
        ("prompt", "[1, 2]", "prompt"),
        ("no_chat_template", "3", "no_chat_template"),
        ("seed", "[1]", "seed"),
    ],
    "profile": [
        ("lengths", "[512, 512]", "lengths"),
        ("density", ".inf", "density"),
        ("band", "2", "band"),
        ("batch_size", "0", "batch_size"),
        ("sink", "-1", "sink"),
        ("lengths", "512", "lengths"),
    ],
    "eval": [
        ("density", "0", "density"),
        ("depths", "[0.5, 2]", "depths"),
        ("num_items", "-1", "num_items"),
        ("lengths", "[0]", "lengths"),
    ],
    "train": [
        ("b1", "2", "b1"),
        ("lr", ".inf", "lr"),
        ("batch_size", "[8, 16]", "batch_size"),
        ("steps", "1.5", "steps"),
        ("resume", "maybe", "resume"),
    ],
    "bench.attention": [("seq_lens", "[0]", "seq_lens"), ("iters", "0", "iters")],
    "bench.decode": [("contexts", "[-1]", "contexts"), ("steps", "0", "steps")],
}


def _main(name: str) -> Callable:
    mod, fn = COMMANDS[name].split(":")
    return getattr(importlib.import_module(mod), fn)


def _files(root: Path) -> dict[str, Path]:
    """Broken plan, model, YAML and corpus files."""
    from moa_jax.models.hf_weights import save_hf
    from moa_jax.models.registry import TINY_RANDOM_CONFIG, init_random
    from moa_jax.plan import Plan

    cfg = TINY_RANDOM_CONFIG
    good = Plan.uniform(cfg.num_layers, cfg.num_heads, window=8, sink=2).to_dict()
    out: dict[str, Path] = {}

    def put(name: str, content: bytes | str) -> None:
        path = root / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        out[name] = path

    put("plan_sinks_inf.json", json.dumps({**good, "sinks": math.inf}))
    put("plan_typo.json", json.dumps({**good, "sinkz": 4}))
    put("plan_format.json", json.dumps({**good, "format": "moa-plan"}))
    put("plan_alpha_text.json", json.dumps({**good, "alphas": [["x"] * cfg.num_heads] * 2}))
    put("plan_truncated.json", json.dumps(good)[:40])
    put("plan_binary.json", b"\xff\xfe\x00plan")
    put("plan_list.json", "[1, 2, 3]")
    put("plan_shape.json", json.dumps({**good, "num_layers": 99}))
    put("plan_ref_extra.json", json.dumps({"alphas": [[1.0]], "betas": [[0.5]], "x": 1}))
    put("plan_other_model.json", json.dumps(Plan.uniform(3, 5, window=8).to_dict()))
    put("yaml_list.yaml", "- a\n- b\n")
    put("yaml_broken.yaml", "a: [1,\n")
    put("yaml_binary.yaml", b"\xff\xfe\x00")
    put("corpus_empty.jsonl", "")
    put("corpus_binary.jsonl", b"\xff\xfe\x00\x01" * 50)
    put("corpus_broken.jsonl", '{"text": "a"}\n{"text": \n')
    put("corpus_notobj.jsonl", '{"text": "a"}\n[1, 2]\n')
    put("corpus_nofield.jsonl", '{"body": "a long text"}\n')
    put("corpus_blank.jsonl", '{"text": ""}\n{"text": "   "}\n')
    put("corpus_empty.txt", "")
    hf = root / "hf"
    save_hf(init_random(cfg, seed=0), hf)
    good_cfg = json.loads((hf / "config.json").read_text())
    for name, cfg_d in {
        "cfg_gelu": {**good_cfg, "hidden_act": "gelu"},
        "cfg_typo": {**good_cfg, "num_hiden_layers": 2},
        "cfg_text": {**good_cfg, "hidden_size": "64"},
        "cfg_nan": {**good_cfg, "rms_norm_eps": math.nan},
        "cfg_list": [good_cfg],
        "cfg_null": None,
        "cfg_rope": {**good_cfg, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
        "cfg_quant": {**good_cfg, "quantization_config": {"bits": 4}},
        "cfg_gemma": {**good_cfg, "model_type": "gemma"},
    }.items():
        d = root / name
        d.mkdir()
        for f in hf.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        (d / "config.json").write_text(json.dumps(cfg_d))
        out[name] = d
    return out


def _file_cases(files: dict[str, Path]) -> list[tuple[str, list[str], str]]:
    def base(cmd: str, model: bool = True) -> list[str]:
        argv = BASE.get(cmd, TINY)
        return argv if model else [a for a in argv if a not in TINY]

    cases = []
    for name in [n for n in files if n.startswith("plan_")]:
        for cmd, extra in (("generate", []), ("eval", []), ("train", ["--method", "moa"])):
            cases.append((cmd, [*base(cmd), "--plan", str(files[name]), *extra], name))
    for name in [n for n in files if n.startswith("yaml_")]:
        for cmd in COMMANDS:
            cases.append((cmd, ["--config", str(files[name])], name))
    for name in [n for n in files if n.startswith("corpus_")]:
        for cmd in ("profile", "eval", "train"):
            extra = ["--tasks", "perplexity"] if cmd == "eval" else []
            cases.append((cmd, [*base(cmd), "--corpus", str(files[name]), *extra], name))
    for name in [n for n in files if n.startswith("cfg_")]:
        for cmd in ("generate", "profile", "eval", "train"):
            argv = [*base(cmd, model=False), "--model", str(files[name])]
            cases.append((cmd, argv, "config.json"))
    return cases


def _run_command(name: str, argv: list[str], words: str, work: Path) -> dict[str, Any]:
    from moa_jax.cli import run

    err = io.StringIO()
    before = os.getcwd()
    os.chdir(work)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = run(_main(name), argv)
            except BaseException as e:  # noqa: BLE001 - what escaped is the finding
                code = None
                err.write(f"Traceback (escaped): {type(e).__name__}: {e}\n")
    finally:
        os.chdir(before)
    text = err.getvalue()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    left = sorted(str(p.relative_to(work)) for p in work.rglob("*"))
    if "Traceback" in text:
        outcome = "traceback"
    elif code == 0:
        outcome = "silent"
    elif left:
        outcome = "left_behind"
    elif (
        last.startswith("error:")
        and sum(ln.startswith("error:") for ln in lines) == 1
        and words.lower() in last.lower()
    ):
        outcome = "clear"
    else:
        outcome = "unclear"
    return {"exit": code, "message": last, "left": left[:5], "outcome": outcome}


def _api_cases() -> list[tuple[str, Callable[[], Any], str]]:
    import jax.numpy as jnp

    from moa_jax.generate import generate
    from moa_jax.models.registry import TINY_RANDOM_CONFIG, init_random
    from moa_jax.pallas_kernels import sparse_attention
    from moa_jax.plan import Plan
    from moa_jax.sampling import SamplingConfig

    model = init_random(TINY_RANDOM_CONFIG, seed=0)
    vocab = TINY_RANDOM_CONFIG.vocab_size
    q = jnp.zeros((1, 8, 4, 16))
    kv = jnp.zeros((1, 8, 2, 16))
    w = (4, 4, 4, 4)
    cases = [
        (
            "generate pad_id outside vocab",
            lambda: generate(model, [[5]], max_new_tokens=2, pad_id=vocab + 88),
            "pad_id",
        ),
        (
            "generate id outside vocab",
            lambda: generate(model, [[5, vocab]], max_new_tokens=2),
            "token ids",
        ),
        ("generate negative id", lambda: generate(model, [[-1, 5]], max_new_tokens=2), "token ids"),
        (
            "generate float ids",
            lambda: generate(model, jnp.array([[1.5, 2.0]]), max_new_tokens=2),
            "ids",
        ),
        (
            "generate max_new_tokens -1",
            lambda: generate(model, [[5]], max_new_tokens=-1),
            "max_new_tokens",
        ),
        ("sampling temperature nan", lambda: SamplingConfig(temperature=math.nan), "temperature"),
        ("sampling top_p inf", lambda: SamplingConfig(top_p=math.inf), "top_p"),
        ("sampling top_k float", lambda: SamplingConfig(top_k=2.5), "top_k"),
        (
            "sparse_attention head_dim",
            lambda: sparse_attention(
                q, jnp.zeros((1, 8, 2, 32)), jnp.zeros((1, 8, 2, 32)), windows=w
            ),
            "head_dim",
        ),
        (
            "sparse_attention batch",
            lambda: sparse_attention(
                q, jnp.zeros((2, 8, 2, 16)), jnp.zeros((2, 8, 2, 16)), windows=w
            ),
            "batch",
        ),
        (
            "sparse_attention k/v lengths",
            lambda: sparse_attention(q, kv, jnp.zeros((1, 6, 2, 16)), windows=w),
            "v",
        ),
        (
            "sparse_attention window 0 (reference)",
            lambda: sparse_attention(q, kv, kv, windows=(0, 4, 4, 4), backend="reference"),
            "window",
        ),
        (
            "sparse_attention window -3",
            lambda: sparse_attention(q, kv, kv, windows=(-3, 4, 4, 4)),
            "window",
        ),
        (
            "sparse_attention sink -1",
            lambda: sparse_attention(q, kv, kv, windows=w, sink=-1),
            "sink",
        ),
        (
            "sparse_attention q_offset -2",
            lambda: sparse_attention(q, kv, kv, windows=w, q_offset=-2),
            "q_offset",
        ),
        ("sparse_attention rank", lambda: sparse_attention(q[0], kv, kv, windows=w), "q"),
        (
            "sparse_attention int q",
            lambda: sparse_attention(q.astype(jnp.int32), kv, kv, windows=w),
            "dtype",
        ),
        (
            "Plan.from_dict unknown key",
            lambda: Plan.from_dict({**Plan.dense(1, 1).to_dict(), "x": 1}),
            "x",
        ),
        (
            "Plan.from_dict sinks inf",
            lambda: Plan.from_dict({**Plan.dense(1, 1).to_dict(), "sinks": math.inf}),
            "sinks",
        ),
        ("Plan.uniform window 0", lambda: Plan.uniform(1, 1, window=0), "window"),
    ]
    return cases


def _run_api(fn: Callable[[], Any], words: str) -> dict[str, Any]:
    from moa_jax.errors import UserError

    try:
        fn()
    except (UserError, ValueError) as e:
        msg = " ".join(str(e).split())
        outcome = "clear" if words.lower() in msg.lower() else "unclear"
        return {"exception": type(e).__name__, "message": msg, "outcome": outcome}
    except Exception as e:  # noqa: BLE001 - an unexpected type is the finding
        return {"exception": type(e).__name__, "message": str(e)[:200], "outcome": "traceback"}
    return {"exception": None, "message": "", "outcome": "silent"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="write the cases here (JSON)")
    parser.add_argument("--only", default=None, help="only cases of this command")
    args = parser.parse_args()
    from moa_jax.cli import setup_logging

    setup_logging()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "files").mkdir()
        files = _files(root / "files")
        cases = []
        for cmd, rows in OPTION_CASES.items():
            base = [] if cmd.startswith("bench") else BASE.get(cmd, TINY)
            cases += [(cmd, [*base, flag, *value.split()], words) for flag, value, words in rows]
        for cmd, rows in YAML_CASES.items():
            for i, (key, text, words) in enumerate(rows):
                path = root / "files" / f"{cmd}_{i}.yaml"
                path.write_text(f"{key}: {text}\n")
                cases.append((cmd, ["--config", str(path)], words))
        cases += _file_cases(files)
        for n, (cmd, argv, words) in enumerate(cases):
            if args.only and cmd != args.only:
                continue
            work = root / f"work{n}"
            work.mkdir()
            r = _run_command(cmd, argv, words, work)
            results.append({"kind": "cli", "command": cmd, "argv": argv, "expects": words, **r})
            print(f"{r['outcome']:12s} {cmd} {' '.join(argv)[:70]} | {r['message'][:110]}")
        if not args.only:
            for label, fn, words in _api_cases():
                r = _run_api(fn, words)
                results.append({"kind": "api", "command": label, "expects": words, **r})
                print(f"{r['outcome']:12s} {label} | {r['message'][:110]}")
    counts = Counter(r["outcome"] for r in results)
    total = len(results)
    print(f"\n{total} malformed inputs")
    for outcome in ("clear", "silent", "unclear", "traceback", "left_behind"):
        print(
            f"  {outcome:12s} {counts.get(outcome, 0):4d}  ({counts.get(outcome, 0) / total:.1%})"
        )
    if args.out:
        for r in results:  # temporary paths are not worth keeping
            r["argv"] = [a.split("/files/")[-1] for a in r.get("argv", [])]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"counts": dict(counts), "cases": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
