"""Reading the sample files a conversion starts from: a JSON list or JSON Lines, and the hash of
their samples that the converter's manifest records.

A JSON Lines line that is not UTF-8 JSON becomes a `schema.BadLine` in its place (one counted
`bad_json_line` skip, the rest is read); a JSON list that cannot be parsed raises `InputError`
naming the file and the position.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
from collections.abc import Sequence
from typing import Any

from data_pipeline import schema


class InputError(ValueError):
    """An input that cannot be used at all (unparseable JSON list, changed input on resume, ...):
    the message names the file and what is wrong; the CLI prints it as one line."""


def load_entries(path: str) -> list:
    """A JSON list (or JSON Lines file, `.jsonl`) of samples.

    JSON Lines: blank lines are ignored; a line that is not UTF-8 JSON becomes a `schema.BadLine`
    (one `bad_json_line` skip naming its line) and the rest is read. A JSON list that cannot be
    parsed raises `InputError` naming the file and the position. A UTF-8 byte-order mark is allowed.
    """
    if path.endswith(".jsonl"):
        return _load_jsonl(path)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise InputError(f"{path}: not UTF-8 at byte {e.start} (line {line})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: invalid JSON at line {e.lineno} column {e.colno} (char {e.pos}): {e.msg}") from None
    except RecursionError:
        raise InputError(f"{path}: JSON nested too deeply to parse") from None
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of samples, got {type(data).__name__}")
    return data


def _load_jsonl(path: str) -> list:
    entries: list = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if lineno == 1 and line.startswith(codecs.BOM_UTF8):
                line = line[len(codecs.BOM_UTF8):]
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line.decode("utf-8")))
                continue
            except UnicodeDecodeError as e:
                why = f"not UTF-8 at byte {e.start} of the line"
            except json.JSONDecodeError as e:
                why = f"invalid JSON at column {e.colno}: {e.msg}"
            except RecursionError:
                why = "JSON nested too deeply to parse"
            text = line.decode("utf-8", "backslashreplace").rstrip("\r\n")
            entries.append(schema.BadLine(lineno, f"{path}:{lineno}: {why}", text))
    return entries


def _json_default(obj: Any) -> Any:
    if isinstance(obj, schema.BadLine):
        return dataclasses.asdict(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON data")


def entries_sha256(entries: Sequence[Any]) -> str:
    """SHA-256 of the samples as data (keys kept in their order: frame-key order is meaningful),
    independent of the file's formatting."""
    h = hashlib.sha256()
    for e in entries:
        h.update(json.dumps(e, ensure_ascii=False, separators=(",", ":"), default=_json_default).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()
