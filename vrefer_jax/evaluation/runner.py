"""Shared evaluation machinery: sharding, batching, resumable JSONL predictions.

A benchmark is a list of items in file order, each a `schema.Sample` or, when the entry could not
be parsed, the `schema.SampleError` that says why. A run takes the shard's slice of that list,
skips the ids already in its prediction file, asks the predictor for the rest batch by batch and
appends one JSON line per item (flushed and fsynced after every batch), so a killed run resumes
where it stopped. Unparseable entries get a row with `"error"` and `"pred": null`: they are never
silently dropped and never retried.

Sharding follows the official eval scripts (`split_list` / `get_chunk`): contiguous chunks of
`ceil(n / num_shards)` items, shard k writes its own file (`shard_path`), `read_predictions`
merges any set of files by id.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from data_pipeline import schema
from vrefer_jax.shard_ranges import shard_bounds

Item = schema.Sample | schema.SampleError


class AnswerSource(Protocol):
    """What the runners need from a model: one answer string per sample, in order
    (`vrefer_jax.inference.predictor.Predictor` is one; tests use fakes)."""

    def answer(self, samples: Sequence[schema.Sample], media_root: str, gen=None,
               batch_size: int = ...) -> list[str]: ...


# ----------------------------------------------------------------------------- loading


def load_json(data: str | Sequence | Mapping) -> Any:
    """A JSON file path, or already-loaded JSON (returned as is)."""
    if isinstance(data, (str, os.PathLike)):
        with open(data, encoding="utf-8") as f:
            return json.load(f)
    return data


def parse_all(entries: Sequence[Any], parse: Callable[[Any, int], schema.Sample]) -> list[Item]:
    """`parse(entry, index)` on every entry; a `SampleError` is kept in the entry's place."""
    out: list[Item] = []
    for i, raw in enumerate(entries):
        try:
            out.append(parse(raw, i))
        except schema.SampleError as e:
            out.append(e)
    return out


def item_id(item: Item) -> str:
    return item.sample_id  # both Sample and SampleError carry it


def check_unique_ids(items: Sequence[Item]) -> None:
    seen: dict[str, int] = {}
    for i, it in enumerate(items):
        sid = item_id(it)
        if sid in seen:
            raise ValueError(f"duplicate sample id {sid!r} at positions {seen[sid]} and {i}: "
                             "predictions are keyed by id, so ids must be unique")
        seen[sid] = i


# ----------------------------------------------------------------------------- sharding


def shard_path(out: str, shard_index: int, num_shards: int) -> str:
    """`out` itself for one shard, else `<stem>.shard<k>-of-<n>.jsonl` next to it."""
    if num_shards == 1:
        return out
    stem = out[:-len(".jsonl")] if out.endswith(".jsonl") else out
    return f"{stem}.shard{shard_index:03d}-of-{num_shards:03d}.jsonl"


def shard_files(out: str) -> list[str]:
    """`out` if it exists, plus every shard file written for it (sorted)."""
    stem = out[:-len(".jsonl")] if out.endswith(".jsonl") else out
    files = sorted(glob.glob(glob.escape(stem) + ".shard*-of-*.jsonl"))
    return ([out] if os.path.exists(out) else []) + files


# ----------------------------------------------------------------------------- prediction files


def _repair_tail(path: str) -> None:
    """Cut a partial last line left by a killed writer, so appends start on a fresh line."""
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)


def read_rows(path: str) -> list[dict]:
    """Rows of one JSONL prediction file; a truncated last line (killed run) is ignored, a bad
    line elsewhere raises."""
    rows = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines) - 1:  # no trailing newline: the write was cut short
                continue
            raise ValueError(f"{path}:{n + 1}: not a JSON line") from None
    return rows


def read_predictions(paths: str | Iterable[str]) -> dict[str, dict]:
    """Merge prediction files by id (first occurrence wins; a conflicting duplicate raises)."""
    if isinstance(paths, str):
        paths = [paths]
    out: dict[str, dict] = {}
    for p in paths:
        for row in read_rows(p):
            sid = str(row["id"])
            if sid in out and out[sid].get("pred") != row.get("pred"):
                raise ValueError(f"id {sid!r} has different predictions in the merged files ({p})")
            out.setdefault(sid, row)
    return out


@dataclasses.dataclass
class RunResult:
    """What one run did: its file, predictions written now, ids skipped as already done, error
    rows written now (unparseable entries and samples the predictor rejected)."""

    path: str
    shard: tuple[int, int]  # [start, stop) in the item list
    written: int = 0
    resumed: int = 0
    errors: int = 0


def run_predictions(items: Sequence[Item], predictor: AnswerSource, out: str, *, media_root: str,
                    row_fn: Callable[[schema.Sample], Mapping[str, Any]], gen=None, batch_size: int = 1,
                    shard_index: int = 0, num_shards: int = 1, limit: int | None = None,
                    log: Callable[[str], None] | None = None) -> RunResult:
    """Predict this shard's items into `shard_path(out, shard_index, num_shards)`, resuming.

    Each row: `{"id", "index", "pred", **row_fn(sample)}`. Error rows (`"pred": null`,
    `"error": SampleError.to_dict()`) stand for entries that did not parse and for samples the
    predictor rejected with a `SampleError`; other exceptions stop the run (resume later).
    `limit` caps the number of new predictions (smoke runs).
    """
    check_unique_ids(items)
    start, stop = shard_bounds(len(items), shard_index, num_shards)
    path = shard_path(out, shard_index, num_shards)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    done: set[str] = set()
    if os.path.exists(path):
        _repair_tail(path)
        old = read_rows(path)
        done = {str(r["id"]) for r in old}
        _check_same_setting(old, items, path)
    todo = [it for it in items[start:stop] if item_id(it) not in done]
    res = RunResult(path, (start, stop), resumed=stop - start - len(todo))
    errs = [it for it in todo if isinstance(it, schema.SampleError)]
    samples = [it for it in todo if isinstance(it, schema.Sample)]
    if limit is not None:
        samples = samples[:limit]
    with open(path, "a", encoding="utf-8") as f:
        for e in errs:
            f.write(json.dumps({"id": e.sample_id, "index": None, "pred": None, "error": e.to_dict()}) + "\n")
        res.errors = len(errs)
        _sync(f)
        for b in range(0, len(samples), batch_size):
            batch = samples[b:b + batch_size]
            for s, p in _answer(predictor, batch, media_root, gen, batch_size):
                if isinstance(p, schema.SampleError):
                    row = {"id": s.sample_id, "index": s.index, "pred": None, "error": p.to_dict()}
                    res.errors += 1
                else:
                    row = {"id": s.sample_id, "index": s.index, "pred": p, **row_fn(s)}
                    res.written += 1
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            _sync(f)
            if log:
                log(f"{path}: {res.resumed + res.errors + res.written}/{stop - start}")
    return res


def _answer(predictor: AnswerSource, batch: list[schema.Sample], media_root: str, gen,
            batch_size: int) -> list[tuple[schema.Sample, str | schema.SampleError]]:
    """The batch's answers; when the predictor rejects a sample (`SampleError`, e.g. unreadable
    media), the batch is retried one sample at a time so only that sample gets an error row."""
    try:
        preds = predictor.answer(batch, media_root, gen=gen, batch_size=batch_size)
    except schema.SampleError as e:
        if len(batch) == 1:
            return [(batch[0], e)]
        return [pair for s in batch for pair in _answer(predictor, [s], media_root, gen, batch_size)]
    if len(preds) != len(batch):
        raise RuntimeError(f"predictor returned {len(preds)} answers for {len(batch)} samples")
    for s, p in zip(batch, preds):
        if not isinstance(p, str):
            raise TypeError(f"predictor returned {type(p).__name__} for {s.sample_id!r}, expected str")
    return list(zip(batch, preds))


def _check_same_setting(rows: Sequence[dict], items: Sequence[Item], path: str) -> None:
    """Refuse to resume a file written in another region mode (single vs multi)."""
    modes = {r.get("mode") for r in rows if r.get("mode") is not None}
    want = {it.extra.get("mode") for it in items if isinstance(it, schema.Sample) and it.extra.get("mode")}
    if modes and want and modes != want:
        raise ValueError(f"{path} holds predictions in mode {sorted(modes)}, this run is mode {sorted(want)}: "
                         "use another --out")


def _sync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def coverage(items: Sequence[Item], rows: Mapping[str, dict]) -> dict[str, list]:
    """Ids of the benchmark without a row (`missing`), error rows (`errors`), and rows whose id is
    not in the benchmark (`unknown`)."""
    ids = [item_id(it) for it in items]
    known = set(ids)
    return {"missing": [i for i in ids if i not in rows],
            "errors": [rows[i]["error"] for i in ids if i in rows and rows[i].get("error")],
            "unknown": sorted(set(rows) - known)}


def predicted(rows: Mapping[str, dict] | Sequence[dict], items: Sequence[Item] | None = None
              ) -> tuple[dict[str, dict], list[tuple[str, dict, Mapping]], dict[str, list]]:
    """(rows by id, `[(id, row, ground truth)]` of the rows with a prediction, coverage report).

    With `items`, the order is the benchmark's, the ground truth each sample's `extra`, and the
    coverage `coverage(items, rows)`; without, the rows' order, the row itself, and only the error
    rows are listed."""
    rows = dict(rows) if isinstance(rows, Mapping) else {str(r["id"]): r for r in rows}
    if items is None:
        cov = {"missing": [], "errors": [r["error"] for r in rows.values() if r.get("error")], "unknown": []}
        return rows, [(sid, r, r) for sid, r in rows.items() if r.get("pred") is not None], cov
    out = [(s.sample_id, rows[s.sample_id], s.extra) for s in items
           if isinstance(s, schema.Sample) and s.sample_id in rows and rows[s.sample_id].get("pred") is not None]
    return rows, out, coverage(items, rows)
