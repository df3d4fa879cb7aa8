"""Fuzz the commands' boundary: every declared option of every command given values outside
its domain (as a flag and as a YAML key), and malformed plan, config, model and corpus files.

Each case must be refused properly (`boundary.refuses`): exit 2, one `error:` line naming the
option or file, no traceback, nothing written. The default run draws a few dozen examples per
test; `MOA_JAX_FUZZ_EXAMPLES=1000 python -m pytest -m slow tests/test_fuzz_cli.py` runs the
thousand-example version (the `slow` copies below).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moa_jax.domains import Domain
from moa_jax.models.hf_weights import save_hf
from moa_jax.models.registry import init_random
from moa_jax.plan import PLAN_KEYS, Plan

from boundary import (
    COMMANDS,
    FUZZ_EXAMPLES,
    bad_lists,
    bad_texts,
    bad_values,
    broken_json,
    declared_options,
    examples,
    json_bytes,
    mutate,
    refuses,
    yaml_text,
)
from conftest import tiny_config

BY_NAME = {c.name: c for c in COMMANDS}
SETTINGS = dict(
    deadline=None,
    suppress_health_check=list(HealthCheck),
    # the default run draws the same examples every time; a larger run draws fresh ones
    derandomize=FUZZ_EXAMPLES is None,
)


def _dirs():
    """(inputs, work): a folder for the files a case writes and the command's empty working
    directory."""
    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)
    (root / "in").mkdir()
    (root / "work").mkdir()
    return tmp, root / "in", root / "work"


def _needles(opt) -> list[str]:
    return [opt.flag, opt.name]


# ------------------------------------------------------------------------ every option declared
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_every_numeric_and_list_option_declares_its_domain(command):
    """A number or list option without a declared domain takes any value of its type: each
    one must say which values it takes (`option(..., domain)` or `choices=`)."""
    import dataclasses

    cls = command.config_cls()
    undeclared = []
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("unchecked"):
            continue
        declared = "domain" in f.metadata or f.metadata.get("choices") is not None
        typ = str(f.type)
        if (
            not declared
            and not typ.startswith("bool")
            and ("int" in typ or "float" in typ or "list" in typ)
        ):
            undeclared.append(f.name)
    assert not undeclared, f"{command.name}: options without a declared domain: {undeclared}"


# ------------------------------------------------------------------------ options out of domain
def _option_case(command_name: str, max_examples: int):
    command = BY_NAME[command_name]
    options = declared_options(command.config_cls())
    valued = [o for o in options if not o.switch]

    @st.composite
    def case(draw):
        via = draw(st.sampled_from(["flag", "yaml"]))
        if via == "flag":
            opt = draw(st.sampled_from(valued))
            text = draw(bad_texts(opt.domain))
            return opt, via, [opt.flag, text] if text != "" else [f"{opt.flag}="]
        opt = draw(st.sampled_from(options))
        if opt.switch:
            value = draw(st.sampled_from([3, "yes", [True], {"a": 1}]))
        elif opt.many:
            value = draw(bad_lists(opt.domain))
        else:
            value = draw(bad_values(opt.domain))
        return opt, via, value

    @settings(max_examples=max_examples, **SETTINGS)
    @given(case())
    def check(capsys, drawn):
        opt, via, value = drawn
        tmp, inputs, work = _dirs()
        with tmp:
            base = None
            if via == "flag":
                argv = list(value)
            else:
                path = inputs / "config.yaml"
                path.write_text(yaml_text({opt.name: value}))
                argv = ["--config", str(path)]
                if opt.flag in command.base:  # a flag would override the YAML key
                    i = command.base.index(opt.flag)
                    base = [*command.base[:i], *command.base[i + 2 :]]
            refuses(command, argv, capsys, work, _needles(opt), base=base)

    return check


def _has_options(name: str) -> bool:
    return any(not o.switch for o in declared_options(BY_NAME[name].config_cls()))


@pytest.mark.parametrize("name", [c.name for c in COMMANDS])
def test_options_outside_their_domain_are_refused(name, capsys):
    _option_case(name, examples(30))(capsys)


@pytest.mark.slow
@pytest.mark.parametrize("name", [c.name for c in COMMANDS])
def test_options_outside_their_domain_are_refused_many(name, capsys):
    _option_case(name, examples(1000))(capsys)


# ------------------------------------------------------------------------ broken files
@pytest.fixture(scope="module")
def good_plan() -> dict:
    cfg = tiny_config()
    return Plan.uniform(cfg.num_layers, cfg.num_heads, window=8, sink=2).to_dict()


@pytest.fixture(scope="module")
def good_hf(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hf")
    save_hf(init_random(tiny_config(), seed=0), d)
    return d


_PLAN_CELLS: dict[str, Domain | None] = dict(PLAN_KEYS)


@st.composite
def broken_plans(draw, good: dict) -> bytes:
    """A plan file that must be refused: not a JSON object, or our plan with one change."""
    if draw(st.booleans()):
        return draw(broken_json().filter(lambda b: not _is_object(b)))
    kind = draw(st.sampled_from(["key", "entry"]))
    if kind == "key":
        return json_bytes(
            mutate(good, draw, _PLAN_CELLS, ("alphas", "betas", "sinks", "schema_version"))
        )
    d = json.loads(json.dumps(good))
    key = draw(st.sampled_from(["alphas", "betas", "sinks"]))
    i = draw(st.integers(0, len(d[key]) - 1))
    j = draw(st.integers(0, len(d[key][i]) - 1))
    bad = st.sampled_from(["x", None, [1], {"a": 1}, True, float("nan"), float("inf")])
    if key == "sinks":
        bad = bad | st.sampled_from([-1, 2.5])
    d[key][i][j] = draw(bad)
    return json_bytes(d)


def _is_object(b: bytes) -> bool:
    try:
        return isinstance(json.loads(b), dict)
    except (ValueError, UnicodeDecodeError):
        return False


PLAN_COMMANDS = ["generate", "eval", "train"]


@pytest.mark.parametrize("name", PLAN_COMMANDS)
def test_broken_plan_files_are_refused(name, capsys, good_plan):
    command = BY_NAME[name]

    @settings(max_examples=examples(20), **SETTINGS)
    @given(broken_plans(good_plan))
    def check(content):
        tmp, inputs, work = _dirs()
        with tmp:
            plan = inputs / "plan.json"
            plan.write_bytes(content)
            argv = ["--plan", str(plan)] + (["--method", "moa"] if name == "train" else [])
            refuses(command, argv, capsys, work, ["plan"])

    check()


@st.composite
def broken_hf_configs(draw, good: dict) -> bytes:
    from moa_jax.models.families.schema import COMMON_KEYS

    if draw(st.booleans()):
        return draw(broken_json().filter(lambda b: not _is_object(b)))
    required = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    )
    domains = {k: v for k, v in COMMON_KEYS.items() if k != "model_type"}
    return json_bytes(mutate(good, draw, domains, required))


@pytest.mark.parametrize("name", ["generate", "profile", "eval", "train"])
def test_broken_model_configs_are_refused(name, capsys, good_hf):
    command = BY_NAME[name]
    good = json.loads((good_hf / "config.json").read_text())

    @settings(max_examples=examples(15), **SETTINGS)
    @given(broken_hf_configs(good))
    def check(content):
        tmp, inputs, work = _dirs()
        with tmp:
            model = inputs / "model"
            model.mkdir()
            for f in good_hf.iterdir():
                (model / f.name).write_bytes(f.read_bytes())
            (model / "config.json").write_bytes(content)
            refuses(command, ["--model", str(model)], capsys, work, ["config.json"])

    check()


@pytest.mark.parametrize("name", [c.name for c in COMMANDS])
def test_broken_yaml_configs_are_refused(name, capsys):
    command = BY_NAME[name]
    contents = st.one_of(
        st.binary(max_size=40),
        st.sampled_from([b"[1, 2]", b"3", b"a: [", b"{a: 1, a: 2", b": x", b"\xff\xfe"]),
        st.dictionaries(st.text("abcxyz_", min_size=1, max_size=8), st.integers(), min_size=1).map(
            lambda d: yaml_text({k + "_nope": v for k, v in d.items()}).encode()
        ),
    )

    @settings(max_examples=examples(15), **SETTINGS)
    @given(contents)
    def check(content):
        tmp, inputs, work = _dirs()
        with tmp:
            path = inputs / "c.yaml"
            path.write_bytes(content)
            try:
                import yaml

                loaded = yaml.safe_load(content)
            except Exception:  # noqa: BLE001 - unreadable is one of the cases
                loaded = "unreadable"
            if loaded is None:  # an empty YAML file is an empty mapping: nothing to refuse
                return
            refuses(command, ["--config", str(path)], capsys, work, ["c.yaml", "config"])

    check()
