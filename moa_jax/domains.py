"""Declared domains of option values: one declaration per option, checked at the boundary.

Every option of every command is a field of a config dataclass (`moa_jax.cli.option`). Its
`Domain` says which values it takes: the kind (int, float, str, bool), a range, a set of choices,
for list options whether the items must be distinct and how many there must be. The same
declaration serves the three ways a value arrives:

- a flag: `Domain.parse` turns the command-line text into a value (argparse's `type`);
- a YAML key: `Domain.parse` for text, `Domain.check` for a YAML number, list or boolean;
- the Python dataclass: `checked_fields(config)` (the `__post_init__` of `Options`) checks every
  field against its domain and then the class's `relations`.

A value outside its domain is a `ConfigError` naming the option (`--max-new-tokens`) and the
domain, never coerced into range or replaced by a default: `nan` is not a float option's value,
`3.0` is not an int option's, `true` is not a number. `None` is accepted where the field's type
allows it (the option's "automatic" value).

Relations between options (`sink <= span`, `batch_size % grad_accum == 0`) are `Relation`s in a
config class's `relations` tuple, checked after the fields.

The public Python functions check their arguments with the same domains: `checked(name, value,
domain)` for an option value (`ConfigError` naming the argument), `check_int_array` for an int
array argument's dtype and shape (`ArrayError`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from moa_jax.errors import ArrayError, ConfigError

_KINDS = (int, float, str, bool)


@dataclasses.dataclass(frozen=True)
class Domain:
    """The values an option takes.

    Attributes:
      kind: int, float, str or bool. A float option takes ints too (as floats), never a
        bool, never NaN or an infinity; an int option takes integers only.
      lo, hi: bounds (inclusive unless `lo_open` / `hi_open`); None for unbounded.
      choices: the only values allowed, or None.
      nonempty: a str option must not be empty (or only spaces).
      distinct: a list option's items must differ.
      min_items, max_items: how many items a list option takes (max None: any).
      multiple_of: an int option must be a multiple of this.
      power_of_two: an int option must be a power of two.
    """

    kind: type = str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[Any, ...] | None = None
    nonempty: bool = False
    distinct: bool = False
    min_items: int = 0
    max_items: int | None = None
    multiple_of: int | None = None
    power_of_two: bool = False

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise TypeError(f"Domain kind must be one of {_KINDS}, got {self.kind!r}")
        if self.choices is not None:
            object.__setattr__(self, "choices", tuple(self.choices))

    # ---------------------------------------------------------------- text
    def describe(self) -> str:
        """The domain in words: 'an integer >= 1', 'a finite number in (0, 1]', 'one of ...'."""
        if self.choices is not None:
            return "one of " + ", ".join(str(c) for c in self.choices)
        noun = {
            int: "an integer",
            float: "a finite number",
            str: "a non-empty text" if self.nonempty else "a text",
            bool: "true or false",
        }[self.kind]
        if self.lo is not None and self.hi is not None:
            left = "(" if self.lo_open else "["
            right = ")" if self.hi_open else "]"
            noun += f" in {left}{_num(self.lo)}, {_num(self.hi)}{right}"
        elif self.lo is not None:
            noun += f" {'>' if self.lo_open else '>='} {_num(self.lo)}"
        elif self.hi is not None:
            noun += f" {'<' if self.hi_open else '<='} {_num(self.hi)}"
        if self.multiple_of is not None:
            noun += f", a multiple of {self.multiple_of}"
        if self.power_of_two:
            noun += ", a power of two"
        return noun

    # ---------------------------------------------------------------- values
    def parse(self, text: str) -> Any:
        """A value from command-line text; `ValueError` (with `describe()`) when out of domain."""
        if self.kind is int:
            try:
                value: Any = int(text.strip(), 10)
            except ValueError:
                raise ValueError(f"must be {self.describe()}, got {text!r}") from None
        elif self.kind is float:
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"must be {self.describe()}, got {text!r}") from None
        elif self.kind is bool:
            low = text.strip().lower()
            if low not in ("true", "false"):
                raise ValueError(f"must be true or false, got {text!r}")
            value = low == "true"
        else:
            value = text
        return self.check(value)

    def check(self, value: Any) -> Any:
        """`value` (a Python value: from YAML, a dataclass argument or `parse`) normalised to the
        kind (an int as a float for a float option); `ValueError` when out of domain."""
        value = self._of_kind(value)
        want = self.describe()
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"must be {want}, got {value!r}")
        if self.nonempty and not str(value).strip():
            raise ValueError(f"must be {want}, got {value!r}")
        if self.kind in (int, float) and not self._in_range(value):
            raise ValueError(f"must be {want}, got {_num(value)}")
        if self.multiple_of is not None and value % self.multiple_of:
            raise ValueError(f"must be {want}, got {value}")
        if self.power_of_two and (value < 1 or value & (value - 1)):
            raise ValueError(f"must be {want}, got {value}")
        return value

    def _of_kind(self, value: Any) -> Any:
        bad = ValueError(f"must be {self.describe()}, got {value!r}")
        if self.kind is bool:
            if not isinstance(value, bool):
                raise bad
        elif self.kind is int:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise bad
            value = int(value)
        elif self.kind is float:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise bad
            value = float(value)
            if not math.isfinite(value):
                raise bad
        elif not isinstance(value, str):
            raise bad
        return value

    def _in_range(self, value: float) -> bool:
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def check_items(self, values: Any) -> list[Any]:
        """A list option's value: a list (or tuple) whose items are each in the domain, with the
        list-level rules (`distinct`, `min_items`, `max_items`)."""
        if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
            raise ValueError(f"must be a list of {self.describe()} values, got {values!r}")
        out = []
        for v in values:
            try:
                out.append(self.check(v))
            except ValueError as e:
                raise ValueError(f"item {v!r} {e}") from None
        if len(out) < self.min_items:
            raise ValueError(f"needs at least {self.min_items} value(s), got {len(out)}")
        if self.max_items is not None and len(out) > self.max_items:
            raise ValueError(f"takes at most {self.max_items} value(s), got {len(out)}")
        if self.distinct and len(set(out)) != len(out):
            dup = sorted({v for v in out if out.count(v) > 1}, key=str)
            raise ValueError(f"values must differ, got {', '.join(str(v) for v in dup)} twice")
        return out


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


# ------------------------------------------------------------------------ constructors
def Int(  # noqa: N802 - reads as a type in declarations
    lo: int | None = None, hi: int | None = None, **kw: Any
) -> Domain:
    """An integer domain, bounds inclusive."""
    return Domain(int, lo=lo, hi=hi, **kw)


def Float(  # noqa: N802
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    **kw: Any,
) -> Domain:
    """A finite float domain."""
    return Domain(float, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open, **kw)


def Choice(*values: Any) -> Domain:  # noqa: N802
    """One of `values` (their kind is the first value's)."""
    kind = type(values[0]) if values and type(values[0]) in _KINDS else str
    return Domain(kind, choices=values)


TEXT = Domain(str, nonempty=True)
"""A non-empty text (a path, a name, a spec checked further where it is used)."""
POSITIVE = Int(1)
NON_NEGATIVE = Int(0)
FRACTION = Float(0.0, 1.0, lo_open=True)
"""A fraction in (0, 1]: a density, a share of a budget."""
PROBABILITY = Float(0.0, 1.0)
FLAG = Domain(bool)
POWER_OF_TWO = Int(1, power_of_two=True)
"""A block size, a warp count."""


@dataclasses.dataclass(frozen=True)
class Relation:
    """A rule between options: `holds(config)` must be true; `says` is the error message (it
    names the options, e.g. '--sink must be smaller than --window')."""

    fields: tuple[str, ...]
    holds: Callable[[Any], bool]
    says: str


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def field_domain(f: dataclasses.Field, hint: Any) -> tuple[Domain | None, bool, bool]:
    """(domain, is_list, allows_none) of a config dataclass field: its declared `domain`
    metadata, else the one its type hint implies (int, float: any finite value; str; bool);
    `choices=` metadata becomes a `Choice` domain. No domain for other types."""
    allows_none = False
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        allows_none = len(args) < len(typing.get_args(hint))
        hint = args[0] if len(args) == 1 else None
        origin = typing.get_origin(hint)
    many = origin in (list, tuple, Sequence)
    if many:
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        hint = args[0] if len(args) == 1 else None
    meta = f.metadata
    domain = meta.get("domain")
    if domain is None and meta.get("choices") is not None:
        domain = Choice(*meta["choices"])
    if domain is None and hint in _KINDS:
        domain = Domain(hint)
    return domain, many, allows_none


def checked_fields(config: Any, relations: Sequence[Relation] = ()) -> None:
    """Checks every field of the dataclass `config` against its domain (normalising values in
    place: ints of float options become floats, tuples lists) and then `relations`. Raises
    `ConfigError` naming the field and its flag."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        if not f.init or f.metadata.get("unchecked"):
            continue
        domain, many, allows_none = field_domain(f, hints[f.name])
        value = getattr(config, f.name)
        if domain is None or (value is None and allows_none):
            continue
        try:
            new = domain.check_items(value) if many else domain.check(value)
        except ValueError as e:
            raise ConfigError(f"{_label(f.name)} {e}") from None
        if isinstance(value, tuple):
            new = tuple(new)
        if new is not value and new != value or type(new) is not type(value):
            object.__setattr__(config, f.name, new)
    for rel in relations:
        if not rel.holds(config):
            raise ConfigError(rel.says)


def _label(name: str) -> str:
    return f"{flag_name(name)} ({name})"


class Options:
    """Base of the config dataclasses of the commands: `__post_init__` checks every field
    against its declared domain and the class's `relations` (`checked_fields`). A subclass with
    its own `__post_init__` calls `super().__post_init__()` first."""

    relations: typing.ClassVar[tuple[Relation, ...]] = ()

    def __post_init__(self) -> None:
        checked_fields(self, self.relations)


# ------------------------------------------------------------------ public functions' arguments
def checked(name: str, value: Any, domain: Domain, *, optional: bool = False) -> Any:
    """A public function's argument `value` in `domain` (None passes when `optional`),
    normalised as `Domain.check` does; else `ConfigError` naming it (`name`, e.g.
    'sparse_attention: windows[2]'), in one line. A traced value (under `jit`) is not a number:
    these arguments are static."""
    if value is None and optional:
        return None
    try:
        return domain.check(value)
    except ValueError as e:
        raise ConfigError(f"{name} {' '.join(str(e).split())}") from None


def check_int_array(name: str, x: Any, shape: tuple[int | None, ...], doc: str) -> None:
    """`x` is an int array of `shape` (None: any size on that axis), `doc` its layout ('[B]');
    else `ArrayError` naming it. Reads the shape and dtype only, so a traced array passes and
    a jitted call pays nothing."""
    got_shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if (
        got_shape is not None
        and getattr(dtype, "kind", "") in ("i", "u")
        and len(got_shape) == len(shape)
        and all(w is None or w == g for g, w in zip(got_shape, shape))
    ):
        return
    want = doc if None in shape else f"{doc} = {list(shape)}"
    got = type(x).__name__ if got_shape is None else f"{dtype} {list(got_shape)}"
    raise ArrayError(f"{name} must be int {want}, got {got}")
