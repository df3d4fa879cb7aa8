"""The errors a user can cause and fix: a bad flag, config, plan, checkpoint or download.

Every such error derives from `UserError`; `moa_jax.cli.run` prints it as one `error:` line and
exits with its `exit_code` (2, or 1 for a failed download, which may succeed when retried).
Python API callers catch them as usual; the subclasses that are bad values are also
`ValueError`s, so `except ValueError` keeps catching them.

The public functions check their scalar options with `check_int`, `check_float`,
`check_power_of_two`, `check_flag` and `check_choice`, and int array arguments with
`check_int_array` (below): one line naming the argument.
"""

from __future__ import annotations

import math
from collections.abc import Collection


class UserError(Exception):
    """A mistake in what the user asked for (a file, a flag, a value), told in one line."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A command's configuration (flags, YAML keys, option values) is invalid or inconsistent."""


class PlanError(UserError, ValueError):
    """A plan file or spec cannot be read, or does not fit the model it is used with."""


class ArrayError(UserError, ValueError):
    """An array argument of a public function (token ids, q/k/v, a cache, positions) has the wrong
    shape, dtype or values; the message names the argument."""


class ModelConfigError(UserError, ValueError):
    """A model's configuration (an HF `config.json`, GGUF metadata, a `ModelConfig`) is malformed
    or asks for something the family's decoder does not do."""


class DivergenceError(UserError, RuntimeError):
    """A training run's loss or gradients became non-finite; the last good checkpoint is kept."""

    exit_code = 1


# ------------------------------------------------------------------ checks of option values
# Each returns the value as a Python int / float / bool, or raises `ConfigError` naming the
# option (`name`, e.g. "sparse_attention: windows[2]"), what it takes and what it got. They read
# Python numbers, NumPy scalars and concrete 0-d arrays; a traced value (under `jit`) is refused,
# as the options are static. No numpy or jax import: `moa_jax.cli` imports this module before
# the flags are parsed.


def _scalar(name: str, value: object) -> bool | int | float | None:
    """The Python value of a static number (None for anything else)."""
    if isinstance(value, (bool, int, float)):
        return value
    dtype = getattr(value, "dtype", None)
    if dtype is None or tuple(getattr(value, "shape", (None,))) != ():
        return None
    if getattr(dtype, "kind", "") not in ("b", "i", "u", "f"):
        return None
    try:
        return value.item()  # type: ignore[attr-defined]
    except TypeError:  # jax's ConcretizationTypeError: a traced value
        raise ConfigError(
            f"{name} must be static (a Python number, known when the function is traced), got "
            f"a traced {dtype} value"
        ) from None


def _got(value: object) -> str:
    """`value` for a message: its repr (a NumPy or jax scalar's Python value), shortened."""
    shown = repr(value)
    if getattr(value, "shape", None) == ():
        try:
            shown = repr(value.item())  # type: ignore[attr-defined]
        except TypeError:
            shown = "a traced value"
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return f"{shown} ({type(value).__name__})"


def check_int(
    name: str, value: object, *, at_least: int | None = None, below: int | None = None
) -> int:
    """`value` as an int >= `at_least` (and < `below`): an int, a NumPy integer or an integral
    float (4.0), never a bool, NaN, 2.5 or a string."""
    x = _scalar(name, value)
    if isinstance(x, float) and math.isfinite(x) and x.is_integer():
        x = int(x)
    if isinstance(x, bool) or not isinstance(x, int):
        raise ConfigError(f"{name} must be an int, got {_got(value)}")
    if (at_least is not None and x < at_least) or (below is not None and x >= below):
        want = (
            f">= {at_least}"
            if below is None
            else f"< {below}"
            if at_least is None
            else f"in [{at_least}, {below})"
        )
        raise ConfigError(f"{name} must be {want}, got {x}")
    return x


def check_power_of_two(name: str, value: object) -> int:
    """`value` as a positive power-of-two int (block sizes, warps)."""
    x = check_int(name, value)
    if x < 1 or x & (x - 1):
        raise ConfigError(f"{name} must be a positive power of two, got {x}")
    return x


def check_float(
    name: str,
    value: object,
    *,
    above: float | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
) -> float:
    """`value` as a finite float (an int or a float, never a bool, NaN, inf or a string) in the
    range the bounds give: > `above` (or >= `at_least`) and <= `at_most`."""
    x = _scalar(name, value)
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ConfigError(f"{name} must be a finite number, got {_got(value)}")
    x = float(x)
    low = (">", above) if above is not None else (">=", at_least) if at_least is not None else None
    ok = low is None or (x > low[1] if low[0] == ">" else x >= low[1])
    if not (ok and (at_most is None or x <= at_most)):
        if low is not None and at_most is not None:
            want = f"in {'(' if low[0] == '>' else '['}{low[1]:g}, {at_most:g}]"
        else:
            want = f"{low[0]} {low[1]:g}" if low is not None else f"<= {at_most:g}"
        raise ConfigError(f"{name} must be {want}, got {x:g}")
    return x


def check_flag(name: str, value: object, *, optional: bool = False) -> bool | None:
    """`value` as a bool (True, False or a NumPy bool; None too when `optional`)."""
    if value is None and optional:
        return None
    x = _scalar(name, value)
    if not isinstance(x, bool):
        want = "True, False or None" if optional else "True or False"
        raise ConfigError(f"{name} must be {want}, got {_got(value)}")
    return x


def check_choice(name: str, value: object, choices: Collection[object]) -> object:
    """`value`, one of `choices`."""
    try:
        known = value in choices
    except TypeError:  # unhashable
        known = False
    if not known:
        raise ConfigError(f"{name} must be one of {tuple(choices)}, got {_got(value)}")
    return value


def check_int_array(name: str, x: object, shape: tuple[int | None, ...], doc: str) -> None:
    """`x` is an int array of `shape` (None: any size on that axis), `doc` its layout ('[B]');
    else `ArrayError`. Reads the shape and dtype only (a traced array passes)."""
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
