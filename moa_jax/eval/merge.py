"""`python -m moa_jax.eval --merge`: one report from several runs' results.json (methods run at
different times on the same items)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moa_jax.eval.report import depth_table, paired_deltas, summarize

logger = logging.getLogger(__name__)


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
            logger.warning(f"{p} holds a partial run")
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
