"""`python -m moa_jax.train` that sends itself a signal at a chosen moment (run by
test_train_boundary.py as a process; `install` also serves in-process tests).

argv: SIGNAL (SIGINT | SIGTERM), MOMENT, STEP, then the flags of `python -m moa_jax.train`.
"""

import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from moa_jax.cli import run
from moa_jax.train import loop
from moa_jax.train.checkpoint import Checkpointer


def install(signum: int, moment: str, at: int, patch: Callable[..., Any] = setattr) -> None:
    """Sends `signum` to this process at `moment` of step `at`: `save` right after the
    asynchronous checkpoint write of the step has started (while it is in progress), `step`
    inside the step, before its jitted update. Prints `signal sent` (for `save`, with whether
    the write was in progress) on stdout. `patch(obj, name, value)` replaces the method."""

    def send(note: str = "") -> None:
        print(f"signal sent{note}", flush=True)
        os.kill(os.getpid(), signum)

    if moment == "save":
        real_save = Checkpointer.save

        def save(self, step, state, meta):
            real_save(self, step, state, meta)
            if step == at:
                send(f" (write in progress: {self._manager.is_saving_in_progress()})")

        patch(Checkpointer, "save", save)
    else:
        real_step = loop._Loop.train_step

        def train_step(self, step):
            if step == at:
                send()
            return real_step(self, step)

        patch(loop._Loop, "train_step", train_step)


if __name__ == "__main__":
    install(getattr(signal, sys.argv[1]), sys.argv[2], int(sys.argv[3]))
    sys.exit(run(loop.main, sys.argv[4:]))
