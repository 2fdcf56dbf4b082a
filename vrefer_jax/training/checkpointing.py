"""Orbax checkpoints of a training run: the state (params, optimizer state, step, RNG), the Grain
iterator position and a small JSON of run metadata, saved together under one step.

Keep-last-N plus keep-every-K (`keep_period`), asynchronous saves (the step loop goes on while the
arrays are written), atomic step folders (Orbax writes to a temporary name and renames), so a run
killed at any moment resumes from its last complete checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str, *, save_every: int, keep_last: int = 3, keep_every: int = 0,
                 async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(save_every, 1),
            max_to_keep=keep_last or None,
            keep_period=keep_every or None,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    @property
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iter, meta: dict[str, Any], force: bool = False) -> bool:
        """Save if `step` is on the interval (or `force`); returns whether a save started."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave(meta),
        )
        return self.manager.save(step, args=args, force=force)

    def restore(self, abstract_state, data_iter, step: int | None = None):
        """-> (state in the shardings of `abstract_state`, meta dict); `data_iter` is set in place."""
        step = self.latest_step if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iter),
            meta=ocp.args.JsonRestore(),
        ))
        return out.state, dict(out.meta)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
