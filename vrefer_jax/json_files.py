"""The one JSON file writer: reports, manifests, configs, score files and dataset JSON all go
through `write_json`, so every JSON file the project writes is complete or absent, never half
written."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from typing import Any


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1, sort_keys: bool = False,
               default: Callable[[Any], Any] | None = None) -> None:
    """Write `obj` to `path` as UTF-8 JSON (non-ASCII kept as is, a final newline), atomically.

    The text goes to a temporary file beside `path` (named with the process id, since processes
    converting other shards may share the folder), is fsynced and then renamed over `path`: a
    reader, or a run killed mid-write, sees the old file or the new one. If `obj` cannot be
    serialised the temporary file is removed and `path` is left untouched. Parent folders are
    created. `indent=None` writes one compact line (large dataset files). `default`: as `json.dump`'s
    (e.g. `str` for a report holding paths or numpy scalars).
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent, sort_keys=sort_keys, ensure_ascii=False, default=default)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
