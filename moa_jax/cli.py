"""Shared CLI plumbing: one typed config per command (a dataclass whose fields are the flags and
the YAML keys: `option`, `parse_config`), YAML config files whose keys are the command's own
flags, logging set up once (`setup_logging`), and one error path for every command (`run`): a
user's mistake (`moa_jax.errors.UserError` and the standard errors a user causes) is one line on
stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
import types
import typing
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from moa_jax.domains import Domain, field_domain
from moa_jax.errors import ConfigError, UserError


def parse_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """Parses argv; `--config FILE.yaml` supplies defaults that explicit flags override.

    Unknown keys in the YAML file are an error naming the key and the valid ones.
    """
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML file of flag values (keys as the flags, with underscores)",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="on an error, show the full traceback instead of one line",
    )
    pre, _ = parser.parse_known_args(argv)
    if pre.config is not None:
        if not pre.config.is_file():
            parser.error(f"config file {pre.config} does not exist")
        try:
            values = yaml.safe_load(pre.config.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError) as e:
            parser.error(f"config file {pre.config} is not valid YAML: {one_line(e)}")
        if values is None:  # an empty file
            values = {}
        if not isinstance(values, dict):
            parser.error(f"config file {pre.config} must hold a mapping of flag: value")
        valid = {a.dest for a in parser._actions} - {"help", "config", "debug"}
        unknown = sorted(set(values) - valid)
        if unknown:
            parser.error(f"unknown key(s) {unknown} in {pre.config}; valid keys: {sorted(valid)}")
        parser.set_defaults(**_typed(parser, pre.config, values))
    return parser.parse_args(argv)


ConfigT = TypeVar("ConfigT")

MODEL_HELP = (
    "a preset (smollm2-135m, tiny-random), an HF checkpoint directory of a supported family "
    "(llama, mistral, qwen2, qwen3: config.json, safetensors and the tokenizer files) or a "
    ".gguf file"
)
"""The help of every command's --model (`moa_jax.models.registry.load_model` takes these;
the families are `moa_jax.config.FAMILIES`)."""


def option(default: Any, help: str, domain: Domain | None = None, **argparse_kw: Any) -> Any:
    """A config dataclass field that is also a flag: `help` for `--help`; `domain` the values
    it takes (`moa_jax.domains`: checked for the flag, the YAML key and the dataclass alike;
    default: any value of the field's type, `choices=` as a `Choice`); `argparse_kw` (e.g.
    `nargs=`, `type=`, `metavar=`) go to `add_argument`. Tuples and lists are copied per
    instance."""
    meta = {"help": help, **argparse_kw}
    if domain is not None:
        meta["domain"] = domain
    if isinstance(default, (list, tuple)):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class _DomainType:
    """argparse's `type` for a field with a domain: the flag's text through `Domain.parse`."""

    def __init__(self, domain: Domain):
        self.domain = domain
        self.__name__ = domain.kind.__name__

    def __call__(self, text: str) -> Any:
        try:
            return self.domain.parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its usage errors as one `ConfigError` line (`run` prints it, exit 2)
    instead of the usage text and a second line."""

    def error(self, message: str) -> typing.NoReturn:  # type: ignore[override]
        raise ConfigError(f"{message} (see {self.prog} --help)")


def _field_type(hint: Any) -> tuple[Any, bool]:
    """(scalar type, is_list) of a field's resolved type hint; `X | None` is X."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _field_type(args[0]) if len(args) == 1 else (str, False)
    if origin in (list, tuple, Sequence):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return (args[0] if args else str), True
    return hint, False


def config_parser(
    cls: type, prog: str, description: str, epilog: str | None = None
) -> argparse.ArgumentParser:
    """An argparse parser with one `--kebab-case` flag per field of the dataclass `cls`.

    bool fields get `--flag/--no-flag`; list fields take several values; a field's metadata
    may set `choices`, `nargs`, `type`, `metavar`, `action` (then the field type is not used).
    A description or epilog with line breaks (a module docstring) keeps its layout.
    """
    raw = epilog is not None or "\n" in description
    parser = ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter if raw else argparse.HelpFormatter,
    )
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        kw = dict(f.metadata)
        help_ = kw.pop("help", "")
        flags = kw.pop("flags", ("--" + f.name.replace("_", "-"),))
        default = (
            f.default_factory()  # type: ignore[misc]
            if f.default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING
            else f.default
        )
        typ, many = _field_type(hints[f.name])
        domain, _, _ = field_domain(f, hints[f.name])
        kw.pop("domain", None)
        if "action" in kw:
            parser.add_argument(*flags, dest=f.name, default=default, help=help_, **kw)
        elif typ is bool:
            parser.add_argument(
                *flags,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=help_,
            )
        else:
            if domain is not None:
                kw.setdefault("type", _DomainType(domain))
            kw.setdefault("type", typ if typ in (int, float) else str)
            if many:
                kw.setdefault("nargs", "*")
            shown = f" (default: {default})" if default not in (None, "", [], ()) else ""
            parser.add_argument(*flags, dest=f.name, default=default, help=help_ + shown, **kw)
    return parser


def parse_config(
    cls: type[ConfigT],
    argv: Sequence[str] | None = None,
    *,
    prog: str,
    description: str,
    epilog: str | None = None,
) -> ConfigT:
    """A `cls` instance from argv: `--config FILE.yaml` supplies values, flags override them.

    Unknown YAML keys, values of the wrong type and choices not offered are usage errors that
    name the key. `--help` shows `description`, the flags and `epilog`
    (`help_from_doc(__doc__)` gives both from a module docstring).
    """
    parser = config_parser(cls, prog, description, epilog)
    ns = vars(parse_args(parser, argv))
    ns.pop("config", None)
    ns.pop("debug", None)  # read by `run`
    return cls(**ns)


def help_from_doc(doc: str) -> dict[str, str]:
    """`description` (the first paragraph) and `epilog` (the rest) of a module docstring, as
    keyword arguments of `parse_config`."""
    head, _, rest = doc.strip().partition("\n\n")
    return {"description": head, "epilog": rest}


def setup_logging(verbose: bool = False) -> None:
    """Logs of `moa_jax.*` to stderr as `message` lines (INFO; DEBUG with `verbose`); the
    library itself only creates loggers, a command calls this once in its `main`."""
    root = logging.getLogger("moa_jax")
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # Importing orbax (absl) puts a handler on the root logger: propagating would print twice.
    root.propagate = False


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (pytest's capture swaps it per test)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _typed(parser: argparse.ArgumentParser, source: Path, values: dict) -> dict:
    """YAML values converted as the flag would convert them (argparse applies `type` to command
    line strings only): a list where the flag takes one value, a value `type` rejects, a choice
    not offered or a non-boolean switch is a usage error naming the key."""
    actions = {a.dest: a for a in parser._actions}
    out = {}
    for key, val in values.items():
        a = actions[key]
        where = f"{source}: {key}"
        if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(val, bool):
                parser.error(f"{where} must be true or false, got {val!r}")
        elif isinstance(a, argparse._AppendAction) and not isinstance(val, list):
            val = [val]  # a repeatable flag given once (`prompt: text`)
        elif a.type is not None and val is not None:
            many = a.nargs in ("+", "*") or isinstance(a.nargs, int)
            if isinstance(val, dict) or (isinstance(val, list) and not many):
                parser.error(f"{where} takes one value, got {val!r}")
            items = val if isinstance(val, list) else [val]
            try:
                items = [_yaml_value(a.type, v) for v in items]
            except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
                parser.error(
                    f"{where}: {e}"
                    if isinstance(a.type, _DomainType)
                    else f"{where}: {val!r} is not a valid value ({e})"
                )
            val = items if many else items[0]
        if a.choices is not None and val is not None:
            for v in val if isinstance(val, list) else [val]:
                if v not in a.choices:
                    parser.error(f"{where}: {v!r} is not one of {sorted(a.choices)}")
        out[key] = val
    return out


def _yaml_value(convert: Callable[[str], Any], value: Any) -> Any:
    """A YAML value as the flag would take it: text through the flag's `type`; a YAML number
    or boolean checked against the field's domain as is (never through `str`, so `true` is not
    the number 1 and 2.5 is not the integer 2)."""
    if isinstance(value, str):
        return convert(value)
    if isinstance(convert, _DomainType):
        return convert.domain.check(value)
    if isinstance(value, (dict, list)):
        raise ValueError(f"takes one value, got {value!r}")
    return convert(value)


# ValueError covers bad values, mismatches and limits (WeightsError, json.JSONDecodeError are
# ValueErrors); OSError bad, missing or unwritable paths.
_USER_ERRORS = (UserError, ValueError, OSError, yaml.YAMLError)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or `kill`'s stop), raised where SIGINT raises `KeyboardInterrupt`,
    so a command stops the same way for both: a training run writes its checkpoint first."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises `Terminated` in the main thread (elsewhere: unchanged)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def one_line(e: BaseException) -> str:
    """An exception as one line: its message with newlines folded (the type if it has none)."""
    return " ".join(str(e).split()) or type(e).__name__


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Runs a command's `main(argv)` with the one error path of every moa-jax CLI.

    A user error (a `moa_jax.errors.UserError`, and the standard ones a user causes: a bad value,
    mismatch or limit (ValueError), a bad, missing or unwritable path (OSError), a YAML error, a
    `SystemExit` with a message) prints `error: <one line>` on stderr and returns 2, or the
    error's `exit_code` (1 for a failed download); an out-of-memory on the device returns 1.
    SIGINT prints `interrupted` and returns 130, SIGTERM `terminated` and 143 (both reach the
    command as a `KeyboardInterrupt`, so it stops the same way for either). Warnings print as
    `warning: <message>`. `--debug` (or `MOA_JAX_DEBUG=1`) re-raises instead, with the
    traceback, and leaves warnings as Python formats them. Python API callers get the
    exceptions themselves; only the command line goes through here.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or bool(os.environ.get("MOA_JAX_DEBUG"))
    if not debug:  # warnings as one line too, without the source line Python adds
        warnings.formatwarning = lambda message, *_a, **_k: f"warning: {message}\n"
    try:
        with sigterm_as_interrupt():
            return main(argv)
    except SystemExit as e:
        if debug or e.code is None or isinstance(e.code, int):
            raise
        print(f"error: {one_line(Exception(e.code))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if debug:
            raise
        terminated = isinstance(e, Terminated)
        print("terminated" if terminated else "interrupted", file=sys.stderr)
        return 143 if terminated else 130
    except Exception as e:  # noqa: BLE001 - sorted below; anything else keeps its traceback
        if debug:
            raise
        if isinstance(e, _USER_ERRORS):
            print(f"error: {one_line(e)}", file=sys.stderr)
            return e.exit_code if isinstance(e, UserError) else 2
        if "RESOURCE_EXHAUSTED" in str(e):
            first = next((ln for ln in str(e).splitlines() if "RESOURCE_EXHAUSTED" in ln), "")
            print(
                f"error: out of device memory ({first.strip()[:200]}); use a smaller batch "
                f"or length",
                file=sys.stderr,
            )
            return 1
        raise
