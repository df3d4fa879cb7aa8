"""Training checkpoints with orbax: params, optimizer state, PRNG key, step and data position.

`Checkpointer` wraps `orbax.checkpoint.CheckpointManager`. Each step is a directory
`<root>/<step>/` with two items: `state` (the pytree {params, opt_state, rng}, sharded arrays
written by every process through OCDBT/TensorStore) and `meta` (JSON: step, the data iterator's
state, the run config). Saving is atomic: orbax writes into a temporary directory and renames it
when complete, so a run killed mid-save leaves the previous checkpoint as the latest and the
partial one is ignored (and cleaned up by the next save). The manager keeps the `keep` most recent
steps. Restoring takes a target pytree (arrays or `jax.ShapeDtypeStruct`s with shardings), so a
checkpoint is restored directly onto the current mesh, whatever mesh wrote it.

A checkpoint that cannot be read (corrupt or truncated files, a different model) raises
`CheckpointError` naming the directory and the reason.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax

from moa_jax.errors import UserError

_REQUIRED_META = ("step", "data")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint could not be written or restored."""


def _ocp():
    # imported on first use: orbax (with tensorstore) would add seconds to every start of
    # `python -m moa_jax.train`, --help and flag errors included
    import orbax.checkpoint as ocp

    # orbax logs every save and restore at INFO / WARNING through absl; keep the console clean.
    logging.getLogger("absl").setLevel(logging.ERROR)
    return ocp


class Checkpointer:
    """Args:
    directory: root directory of the step directories (created if needed).
    keep: how many of the most recent checkpoints to keep (>= 1).
    async_save: let saves run in a background thread (call `wait()` / `close()` before the
      process exits; `save` of the next step waits for the previous one).
    """

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
        ocp = _ocp()
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def all_steps(self) -> list[int]:
        """Completed checkpoints, oldest first (partial, uncommitted saves are not listed)."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Saves `state` (a pytree of arrays) and `meta` (JSON-serialisable) as `step`."""
        ocp = _ocp()
        meta = {**meta, "step": int(step)}
        try:
            self._manager.save(
                int(step),
                force=True,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
            )
        except Exception as e:
            raise CheckpointError(
                f"could not save checkpoint step {step} in {self.directory}: "
                f"{type(e).__name__}: {e}"
            ) from e

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores (state, meta) of `step` (default: the latest) onto `target`'s structure,
        shapes, dtypes and shardings."""
        ocp = _ocp()
        self.wait()
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        step = steps[-1] if step is None else int(step)
        if step not in steps:
            raise CheckpointError(
                f"no checkpoint of step {step} in {self.directory} (available: {steps})"
            )
        path = self.directory / str(step)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            target,
        )
        others = [s for s in steps if s != step]
        hint = f"; delete {path} to resume from step {others[-1]} instead" if others else ""
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                ),
            )
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {path} is corrupt or incompatible with this run "
                f"({type(e).__name__}: {str(e)[:500]}){hint}"
            ) from e
        meta = restored.meta
        if not isinstance(meta, dict) or any(k not in meta for k in _REQUIRED_META):
            raise CheckpointError(
                f"checkpoint {path} has no valid metadata (expected keys "
                f"{list(_REQUIRED_META)}, got {meta!r}){hint}"
            )
        state = restored.state
        if jax.tree.structure(state) != jax.tree.structure(target):
            raise CheckpointError(
                f"checkpoint {path} holds a different state structure than "
                f"this run's model and optimizer{hint}"
            )
        for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(target)):
            if got.shape != want.shape or got.dtype != want.dtype:
                raise CheckpointError(
                    f"checkpoint {path} has an array {got.shape} {got.dtype} "
                    f"where this run has {want.shape} {want.dtype}{hint}"
                )
        return state, meta

    def wait(self) -> None:
        """Blocks until an asynchronous save has finished."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
