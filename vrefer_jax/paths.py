"""Paths taken from data, confined to their root.

Video files, frame folders, mask files named in requests and shards named by a safetensors index
all come from files a user did not write. Each is resolved inside the root it belongs to: a `../`
escape or an absolute path is refused (reason code `media_outside_root`) unless the caller was
given an explicit option that allows absolute paths. The check is lexical (after normalising
`.`/`..`), so symlinks a user placed inside the root are followed as the user intended.
"""

from __future__ import annotations

import os

OUTSIDE_ROOT = "media_outside_root"


class PathOutsideRoot(ValueError):
    """A path from data points outside its root. `reason` is the reason code for reports."""

    reason = OUTSIDE_ROOT

    def __init__(self, path: str, root: str, why: str):
        self.path, self.root = path, root
        super().__init__(f"{OUTSIDE_ROOT}: {path!r} {why} (root {root!r})")


def resolve_under(root: str, path: str, *, allow_absolute: bool = False) -> str:
    """Returns `path` joined onto `root`, refusing anything that leaves `root`.

    Args:
      root: the folder the data's paths are relative to.
      path: a path read from data.
      allow_absolute: accept absolute paths as they are (relative ones must still stay in `root`).
    Raises:
      PathOutsideRoot: `path` is absolute (and not allowed), or escapes `root` with `..`.
    """
    if not isinstance(path, str) or not path or "\x00" in path:
        raise PathOutsideRoot(str(path), root, "is not a usable path")
    if os.path.isabs(path):
        if allow_absolute:
            return os.path.normpath(path)
        raise PathOutsideRoot(path, root, "is absolute (allow absolute paths explicitly to read it)")
    root_n = os.path.normpath(os.path.abspath(root or "."))
    full = os.path.normpath(os.path.join(root_n, path))
    if full != root_n and not full.startswith(root_n.rstrip(os.sep) + os.sep):
        raise PathOutsideRoot(path, root, "leaves its root")
    return full
