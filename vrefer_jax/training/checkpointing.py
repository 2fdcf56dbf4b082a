"""Orbax checkpoints of a training run: the state (params, optimizer state, step, RNG), the Grain
iterator position and a small JSON of run metadata, saved together under one step.

Keep-last-N plus keep-every-K (`keep_period`), asynchronous saves (the step loop goes on while the
arrays are written), atomic step folders (Orbax writes to a temporary name and renames), so a run
killed at any moment resumes from its last complete checkpoint.

Integrity: Orbax 0.12 checks nothing on restore (its zarr3 crc32c covers only the shard index, and
the default layout is zarr2), so a flipped byte would be restored silently. Once a save has
committed, process 0 writes `vrefer_checksums.json` into the step folder: the size and SHA-256 of
every file in it. `restore` checks the newest step against it first; a corrupt or partial step
(changed, truncated or missing file, unreadable manifest, or a restore that fails) is named in one
log line, moved aside to `<checkpoints>.corrupt/<step>` and the next older step is tried. Steps
without a manifest (saved before manifests existed, or a run killed between commit and manifest)
are restored unverified; a restore error still falls back.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from vrefer_jax.json_files import write_json

log = logging.getLogger(__name__)

MANIFEST = "vrefer_checksums.json"
_CHUNK = 1 << 24


class CheckpointError(RuntimeError):
    """No checkpoint in the folder could be restored (each corrupt step is named)."""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _files(step_dir: str) -> list[str]:
    out = []
    for root, _, names in os.walk(step_dir):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), step_dir)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def write_manifest(step_dir: str) -> None:
    """Size and SHA-256 of every file under `step_dir`, written atomically beside them."""
    files = {rel: {"size": os.path.getsize(os.path.join(step_dir, rel)), "sha256": _sha256(os.path.join(step_dir, rel))}
             for rel in _files(step_dir)}
    write_json(os.path.join(step_dir, MANIFEST), {"algorithm": "sha256", "files": files}, indent=0)


def verify_step(step_dir: str) -> str | None:
    """None if `step_dir` matches its manifest (or has none: unverified), else what is wrong."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST}: {e}"
    for rel, want in sorted(files.items()):
        full = os.path.join(step_dir, rel)
        if not os.path.isfile(full):
            return f"missing file {rel}"
        size = os.path.getsize(full)
        if size != want["size"]:
            return f"{rel} is {size} bytes, expected {want['size']} (truncated or partial)"
        if _sha256(full) != want["sha256"]:
            return f"{rel} does not match its checksum"
    return None


def _agree(ok: bool) -> bool:
    """Process 0's verdict, on every process (they must restore the same step)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils
    return bool(multihost_utils.broadcast_one_to_all(np.array(ok)))


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _is_abandoned_read(u) -> bool:
    """An unraisable exception from one of Orbax's read coroutines (closed when collected)."""
    obj = u.object
    return getattr(obj, "__qualname__", "") == "_read_array_index_and_device_put" or (
        "orbax" in getattr(getattr(obj, "cr_code", None), "co_filename", ""))


def _silence_abandoned_reads() -> None:
    """After a failed restore, Orbax's other read coroutines die with the same error whenever they
    are collected (now, later, or at exit), each printed as an "Exception ignored" traceback. The
    failure is already logged in one line: from here on, those go to the debug log instead."""
    old = sys.unraisablehook
    if getattr(old, "_vrefer_filter", False):
        gc.collect()
        return

    def hook(u):
        if _is_abandoned_read(u):
            log.debug("abandoned checkpoint read: %s: %s", type(u.exc_value).__name__, u.exc_value)
        else:
            old(u)

    hook._vrefer_filter = True
    sys.unraisablehook = hook
    gc.collect()


class Checkpointer:
    """One run's `CheckpointManager`, with checksum manifests written after each committed save and
    checked (with fallback to older steps) on restore."""

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
        self._main = jax.process_index() == 0
        self._pending: list[int] = []  # saved in this session, committed or not, no manifest yet
        self._sealer: threading.Thread | None = None

    @property
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    # ------------------------------------------------------------------ saving

    def save(self, step: int, state, data_iter, meta: dict[str, Any], force: bool = False) -> bool:
        """Save if `step` is on the interval (or `force`); returns whether a save started."""
        if not (force or self.manager.should_save(step)):
            self._seal_committed(block=False)
            return False
        # Orbax waits for the previous save here anyway; its manifest is then written before the
        # next save's finalize can delete old steps (keep_last), so hashing never races a delete.
        self.manager.wait_until_finished()
        self._seal_committed(block=True)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave(meta),
        )
        started = self.manager.save(step, args=args, force=force)
        if started:
            self._pending.append(step)
        return started

    def _seal_committed(self, block: bool) -> None:
        """Write the manifests of committed saves (in a thread on process 0, off the step loop)."""
        if self._sealer is not None and (block or not self._sealer.is_alive()):
            self._sealer.join()
            self._sealer = None
        if self._sealer is None and self._pending and (block or not self.manager.is_saving_in_progress()):
            self.manager.wait_until_finished()  # the save has committed: this only joins its thread
            steps, self._pending = self._pending, []
            if self._main:
                self._sealer = threading.Thread(target=self._seal, args=(steps,), name="checksums", daemon=True)
                self._sealer.start()
        if block and self._sealer is not None:
            self._sealer.join()
            self._sealer = None

    def _seal(self, steps: list[int]) -> None:
        for step in steps:
            d = self.step_dir(step)
            try:
                if os.path.isdir(d):
                    write_manifest(d)
            except OSError as e:  # e.g. the folder removed under us: the step is then unverified
                log.warning("could not write checksums for checkpoint step %d in %s: %s", step, self.directory, e)

    # ------------------------------------------------------------------ restoring

    def restore(self, abstract_state, data_iter, step: int | None = None):
        """-> (state in the shardings of `abstract_state`, meta dict); `data_iter` is set in place.

        Without `step`, the newest intact step: each newer corrupt or partial one is logged in one
        line and moved to `<directory>.corrupt/`. Raises `CheckpointError` when none is intact."""
        steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        bad: list[tuple[int, str]] = []
        for s in steps:
            problem = verify_step(self.step_dir(s)) if self._main else None
            if _agree(problem is None):
                try:
                    out = self.manager.restore(s, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=grain.checkpoint.CheckpointRestore(data_iter),
                        meta=ocp.args.JsonRestore(),
                    ))
                except Exception as e:  # noqa: BLE001 -- any failure to read a step means: try an older one
                    problem = f"restore failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
                else:
                    self._quarantine([b for b, _ in bad])
                    return out.state, dict(out.meta)
                _silence_abandoned_reads()  # here, once `e` (and the frames it holds) is gone
            problem = problem or "corrupt on process 0"
            log.warning("checkpoint step %d in %s is corrupt or partial (%s); falling back to an older step",
                        s, self.directory, problem)
            bad.append((s, problem))
        raise CheckpointError(f"no intact checkpoint in {self.directory}: "
                              + "; ".join(f"step {s}: {p}" for s, p in bad))

    def _quarantine(self, steps: list[int]) -> None:
        """Move corrupt steps out of Orbax's folder (the run will save those step numbers again)."""
        if not steps:
            return
        if self._main:
            dest_root = self.directory + ".corrupt"
            os.makedirs(dest_root, exist_ok=True)
            for s in steps:
                dest, n = os.path.join(dest_root, str(s)), 1
                while os.path.exists(dest):
                    dest, n = os.path.join(dest_root, f"{s}.{n}"), n + 1
                shutil.move(self.step_dir(s), dest)
                log.info("moved corrupt checkpoint step %d to %s", s, dest)
        _barrier("vrefer_quarantine")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()
        self._seal_committed(block=True)

    def close(self) -> None:
        self.wait()
        self.manager.close()
