"""What the boundary fuzz tests share: the commands and their config classes, hypothesis
strategies that draw values outside a declared domain (`moa_jax.domains`), generators of broken
files, and the check that a command refused its input properly.

A refusal is: exit 2, one `error:` line on stderr (the last), naming what to fix, no
traceback, and nothing written to the working directory.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from hypothesis import strategies as st

from moa_jax.cli import run
from moa_jax.domains import Domain, field_domain, flag_name

FUZZ_EXAMPLES = int(os.environ.get("MOA_JAX_FUZZ_EXAMPLES", "0")) or None
"""Examples per fuzz test: `MOA_JAX_FUZZ_EXAMPLES` (the slow run sets 1000), else each test's
own default."""


def examples(default: int) -> int:
    return FUZZ_EXAMPLES or default


@dataclasses.dataclass(frozen=True)
class Command:
    """A CLI: `module:main`, its config class `module:Class`, the argv every case starts from."""

    name: str
    main: str
    config: str
    base: tuple[str, ...] = ()

    def main_fn(self) -> Callable[[Sequence[str] | None], int]:
        mod, fn = self.main.split(":")
        return getattr(importlib.import_module(mod), fn)

    def config_cls(self) -> type:
        mod, cls = self.config.split(":")
        return getattr(importlib.import_module(mod), cls)


TINY = ("--model", "tiny-random")
COMMANDS = [
    Command(
        "generate",
        "moa_jax.generate.__main__:main",
        "moa_jax.generate.__main__:GenerateConfig",
        TINY,
    ),
    Command("profile", "moa_jax.profile.__main__:main", "moa_jax.profile:ProfileConfig", TINY),
    Command("eval", "moa_jax.eval.__main__:main", "moa_jax.eval.__main__:EvalConfig", TINY),
    Command("eval.heads", "moa_jax.eval.heads:main", "moa_jax.eval.heads:HeadsConfig", TINY),
    # train: a dense run needs its row length (--seq-len; recycled derives it)
    Command(
        "train",
        "moa_jax.train.loop:main",
        "moa_jax.train.config:TrainConfig",
        TINY + ("--seq-len", "16"),
    ),
    Command(
        "bench.attention",
        "moa_jax.bench.attention:main",
        "moa_jax.bench.attention:AttentionBenchConfig",
    ),
    Command(
        "bench.decode", "moa_jax.bench.decode:main", "moa_jax.bench.decode_config:DecodeConfig"
    ),
]


@dataclasses.dataclass(frozen=True)
class Declared:
    """One option of a command: its field name, flag, domain, whether it is a list, a switch."""

    name: str
    flag: str
    domain: Domain
    many: bool
    switch: bool


def declared_options(cls: type) -> list[Declared]:
    """The options of config class `cls` that have a domain (declared or implied by type)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("unchecked"):
            continue
        domain, many, _ = field_domain(f, hints[f.name])
        if domain is None:
            continue
        flags = f.metadata.get("flags", (flag_name(f.name),))
        switch = domain.kind is bool or f.metadata.get("action") in ("store_true", "store_false")
        out.append(Declared(f.name, flags[0], domain, many, switch))
    return out


# ---------------------------------------------------------------------------- bad values
def _outside_range(d: Domain) -> st.SearchStrategy:
    """Numbers below `lo` or above `hi` (the open end itself included)."""
    options = []
    integral = d.kind is int
    if d.lo is not None:
        lo = d.lo if not integral else int(math.ceil(d.lo))
        below = (
            st.integers(max_value=lo - 1, min_value=lo - 10**6)
            if integral
            else st.floats(max_value=d.lo, exclude_max=not d.lo_open, min_value=d.lo - 1e6)
        )
        options.append(below)
    if d.hi is not None:
        hi = d.hi if not integral else int(math.floor(d.hi))
        above = (
            st.integers(min_value=hi + 1, max_value=hi + 10**6)
            if integral
            else st.floats(min_value=d.hi, exclude_min=not d.hi_open, max_value=d.hi + 1e6)
        )
        options.append(above)
    return st.one_of(options) if options else st.nothing()


def bad_values(d: Domain) -> st.SearchStrategy:
    """Python values (as YAML would give them) outside `d`."""
    if d.choices is not None:
        return st.one_of(
            st.text(min_size=1, max_size=12).filter(lambda s: s not in d.choices),
            st.integers(),
            st.none().map(lambda _: [1, 2]),
        )
    wrong_kind = st.sampled_from(["abc", [1, 2], {"a": 1}])
    if d.kind is bool:
        return st.one_of(wrong_kind, st.integers(), st.floats(allow_nan=True))
    if d.kind is str:
        return st.one_of(st.sampled_from(["", "  "]) if d.nonempty else st.nothing(), st.integers())
    strategies = [wrong_kind, st.booleans(), _outside_range(d)]
    if d.kind is float:
        strategies.append(st.sampled_from([math.nan, math.inf, -math.inf]))
    else:
        strategies.append(
            st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: x != int(x))
        )
        strategies.append(st.sampled_from([math.nan, math.inf]))
    return st.one_of(strategies)


def bad_texts(d: Domain) -> st.SearchStrategy:
    """Command-line texts outside `d`."""
    if d.choices is not None:
        return st.text(min_size=1, max_size=12).filter(
            lambda s: s not in {str(c) for c in d.choices} and not s.startswith("-")
        )
    if d.kind is str:
        return st.sampled_from(["", "   "]) if d.nonempty else st.nothing()
    words = st.sampled_from(["abc", "1e", "0x10", "one", "[1]", "true"])
    numbers = _outside_range(d).map(repr)
    if d.kind is float:
        return st.one_of(words, numbers, st.sampled_from(["nan", "inf", "-inf", "NaN"]))
    return st.one_of(words, numbers, st.sampled_from(["2.5", "1e3", "nan", "inf"]))


def bad_lists(d: Domain) -> st.SearchStrategy:
    """List values (YAML) outside a list domain: a bad item, too few, repeated items."""
    good_item = _good_value(d)
    options = [st.lists(bad_values(d), min_size=1, max_size=3)]
    if good_item is not None and d.distinct:
        options.append(st.just([good_item, good_item]))
    if d.min_items > 0:
        options.append(st.just([]))
    return st.one_of(options)


def _good_value(d: Domain) -> Any:
    """One value inside `d`, or None where none is obvious."""
    if d.choices:
        return d.choices[0]
    if d.kind is int:
        v = int(d.lo) + (1 if d.lo_open else 0) if d.lo is not None else 1
        try:
            return d.check(v)
        except ValueError:
            return None
    if d.kind is float:
        v = (d.lo if d.lo is not None else 0.0) + (1e-3 if d.lo_open else 0.0)
        try:
            return d.check(v)
        except ValueError:
            return None
    return None


# ---------------------------------------------------------------------------- broken files
def broken_json() -> st.SearchStrategy[bytes]:
    """Bytes that are not a JSON object: random bytes, truncated JSON, other JSON values."""
    return st.one_of(
        st.binary(min_size=0, max_size=64),
        st.sampled_from([b"", b"{", b'{"a": ', b"null", b"[]", b"3", b'"text"', b"\xff\xfe{}"]),
        st.recursive(
            st.none() | st.booleans() | st.floats() | st.text(max_size=5),
            lambda c: st.lists(c, max_size=3),
            max_leaves=5,
        ).map(lambda v: json.dumps(v).encode()),
    )


def mutate(d: dict, draw, domains: dict[str, Domain | None], required: Sequence[str]) -> dict:
    """`d` with one change that makes it invalid: a required key removed, an unknown key added,
    or a declared key given a value outside its domain."""
    d = json.loads(json.dumps(d))
    kinds = ["unknown"]
    if required:
        kinds.append("remove")
    checked = [k for k, v in domains.items() if v is not None and k in d]
    if checked:
        kinds.append("value")
    kind = draw(st.sampled_from(kinds))
    if kind == "remove":
        d.pop(draw(st.sampled_from(sorted(required))))
    elif kind == "unknown":
        key = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=3, max_size=12))
        d[key + "_x"] = draw(st.integers() | st.text(max_size=4))
    else:
        key = draw(st.sampled_from(sorted(checked)))
        d[key] = draw(bad_values(domains[key]))
    return d


def json_bytes(d: Any) -> bytes:
    return json.dumps(d, allow_nan=True).encode()


def yaml_text(mapping: dict) -> str:
    return yaml.safe_dump(mapping, default_flow_style=True)


# ---------------------------------------------------------------------------- the check
def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def refuses(
    command: Command,
    argv: Sequence[str],
    capsys,
    root: Path,
    needles: Sequence[str] = (),
    keep: set[str] = frozenset(),
    base: Sequence[str] | None = None,
) -> str:
    """Runs `command` with `argv` in `root` (the working directory) and asserts a proper
    refusal: exit 2, one final `error:` line containing any of `needles` (case-insensitive),
    no traceback, and no file in `root` but those in `keep`. `base` replaces the command's
    base argv. Returns the error line."""
    capsys.readouterr()
    before = os.getcwd()
    os.chdir(root)
    try:
        code = run(command.main_fn(), [*(command.base if base is None else base), *argv])
    finally:
        os.chdir(before)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    where = f"{command.name} {list(argv)}"
    assert "Traceback" not in err, f"{where}: traceback\n{err}"
    assert code == 2, f"{where}: exit {code}\n{err}"
    assert lines and lines[-1].startswith("error:"), f"{where}: no error line\n{err}"
    assert sum(ln.startswith("error:") for ln in lines) == 1, f"{where}: several errors\n{err}"
    if needles:
        low = lines[-1].lower()
        assert any(n.lower() in low for n in needles), (
            f"{where}: {lines[-1]} names none of {needles}"
        )
    left = listing(root) - set(keep)
    assert not left, f"{where}: left {sorted(left)}"
    log = os.environ.get("MOA_JAX_BAD_INPUT_LOG")
    if log:  # the messages, for a report
        with open(log, "a") as f:
            f.write(f"{command.name}\t{json.dumps(list(argv))}\t{lines[-1]}\n")
    return lines[-1]
