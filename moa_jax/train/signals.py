"""Stopping a training run on SIGINT or SIGTERM at a step boundary, with a checkpoint.

While a `StopSignals` is active (in the main thread), the first SIGINT or SIGTERM only records
the request: the loop finishes the step (or evaluation) it is in, saves a checkpoint of that step,
waits for the write and then raises `KeyboardInterrupt` (SIGINT) or `moa_jax.cli.Terminated`
(SIGTERM), which `moa_jax.cli.run` prints as `interrupted` / `terminated`. No signal lands inside
a jitted step whose inputs were donated, or inside an orbax write. A second signal stops at once
(without a new checkpoint), except inside `shielded()` (a checkpoint save or wait), which it
leaves first. A signal that was ignored when the run started (`nohup`, a background job) stays
ignored.

In a run of several processes, `requested()` is agreed by all of them (the strongest request of
any process), so every process saves the same step.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from moa_jax.cli import Terminated

_KINDS: dict[int, type[KeyboardInterrupt]] = {
    signal.SIGINT: KeyboardInterrupt,
    signal.SIGTERM: Terminated,
}
_ORDER = (None, KeyboardInterrupt, Terminated)  # the agreed request of several processes


class StopSignals:
    """A context manager; see the module docstring."""

    def __init__(self) -> None:
        self.pending: type[KeyboardInterrupt] | None = None
        self._previous: dict[int, Any] = {}
        self._shield = 0
        self._urgent: type[KeyboardInterrupt] | None = None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in _KINDS:
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        kind = _KINDS[signum]
        if self.pending is None:
            self.pending = kind
        elif self._shield:
            self._urgent = kind
        else:
            raise kind()

    @contextlib.contextmanager
    def shielded(self) -> Iterator[None]:
        """A second signal waits until the block is done (a checkpoint save or wait)."""
        self._shield += 1
        try:
            yield
        finally:
            self._shield -= 1
        if not self._shield and self._urgent is not None:
            raise self._urgent()

    def requested(self) -> type[KeyboardInterrupt] | None:
        """The exception to stop with (None: go on), agreed by every process."""
        if jax.process_count() == 1:
            return self.pending
        mine = np.int32(_ORDER.index(self.pending))
        return _ORDER[int(np.max(multihost_utils.process_allgather(mine)))]
