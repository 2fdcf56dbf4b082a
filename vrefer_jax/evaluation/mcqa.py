"""General video multiple-choice QA in the official VideoRefer style: what MVBench (`mvbench`),
VideoMME (`videomme`) and Perception Test (`perception_test`) share.

Each benchmark module's `load` builds `schema.Sample`s (video only, no regions) whose human turn
is the instruction the official inference script builds, and keeps what scoring needs in `extra`;
its `judge` parses an answer by that benchmark's official rules (reference §5.3, fallbacks
included). This module holds the shared pieces: the instruction suffix, sample building, video
lookup, the prediction run, the scorer and the registry of benchmarks (`BENCHMARKS`).

Frames: the official general benchmarks sample `model.config.num_frames` = 16 frames with
`aspect_ratio=None` (the CLI defaults to 16 for `mcqa`).
"""

from __future__ import annotations

import collections
import functools
import importlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

from data_pipeline import schema
from vrefer_jax import paths as paths_lib
from vrefer_jax.evaluation import runner

MCQA_SUFFIX = "Answer with the option's letter from the given choices directly and only give the best option."
VIDEO_FORMATS = (".mp4", ".avi", ".mov", ".mkv")


def letter(i: int) -> str:
    """Option letter of index i: A, B, C, ..."""
    return chr(ord("A") + i)


def make_sample(sid: str, index: int, media: str, instruct: str, answer: str, extra: dict) -> schema.Sample:
    """A video-only sample whose human turn is the official instruction (`extra["prompt"]`)."""
    raw = {"id": sid, "video": media,
           "conversations": [{"from": "human", "value": "<video>\n" + instruct}, {"from": "gpt", "value": answer}]}
    return schema.parse_sample(raw, index, extra={"prompt": instruct, **extra})


def find_video(folder: str | None, stem: str) -> str | None:
    """`stem + ext` for the first official extension present under `folder` (None if none is);
    without a folder, `stem.mp4`. `stem` comes from the data: one that leaves `folder` (`..`, an
    absolute path) raises `paths.PathOutsideRoot` rather than probing files elsewhere."""
    if folder is None:
        return stem + ".mp4"
    for ext in VIDEO_FORMATS:
        if os.path.exists(paths_lib.resolve_under(folder, stem + ext)):
            return stem + ext
    return None


def video_or_error(folder: str | None, stem: str) -> str | schema.SampleError | None:
    """`find_video`, with a path outside `folder` as the `media_outside_root` error for its questions."""
    try:
        return find_video(folder, stem)
    except paths_lib.PathOutsideRoot as e:
        return schema.SampleError(e.reason, stem, "video", str(e))


# ----------------------------------------------------------------------------- running and scoring

# The benchmarks of `vrefer-eval mcqa --benchmark`, each a module of this package with `load`, `judge`
# (prediction, row -> (correct or None, parsed)) and `GROUPS` (the per-group accuracy keys).
BENCHMARKS = ("mvbench", "videomme", "perception_test")


def benchmark_module(name: str):
    """The module of benchmark `name` (imported here on use: each imports this module)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown MCQA benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return importlib.import_module(f"vrefer_jax.evaluation.{name}")


def row_fields(s: schema.Sample) -> dict[str, Any]:
    return {"video": s.media, **{k: v for k, v in s.extra.items() if k != "prompt"}}


# `runner.run_predictions` with the MCQA prediction-row fields (what `score` needs rides in each row).
run = functools.partial(runner.run_predictions, row_fn=row_fields)


def score(rows: Mapping[str, dict] | Sequence[dict], items: Sequence[runner.Item] | None = None,
          benchmark: str | None = None) -> dict[str, Any]:
    """Accuracy (micro over scored questions, as each official scorer) overall and per group
    (MVBench: task; VideoMME: duration, task type, domain; Perception Test: area), plus the
    outputs that needed the official fallback (`fallback_items`) and unscorable questions."""
    rows = dict(rows) if isinstance(rows, Mapping) else {str(r["id"]): r for r in rows}
    if items is not None:
        extras = {s.sample_id: s.extra for s in items if isinstance(s, schema.Sample)}
        cov = runner.coverage(items, rows)
        order = [runner.item_id(it) for it in items if runner.item_id(it) in extras and runner.item_id(it) in rows]
    else:
        extras = rows
        cov = {"missing": [], "errors": [r["error"] for r in rows.values() if r.get("error")], "unknown": []}
        order = [k for k, r in rows.items() if not r.get("error")]
    order = [k for k in order if rows[k].get("pred") is not None]
    if benchmark is None:
        benchmark = next((extras[k]["benchmark"] for k in order), "mvbench")
    bench = benchmark_module(benchmark)
    groups = {g: collections.defaultdict(lambda: [0, 0]) for g in bench.GROUPS}
    n = correct = 0
    fallback, unscored = [], []
    for k in order:
        e = extras[k]
        ok, parsed = bench.judge(rows[k]["pred"], e)
        if not parsed:
            fallback.append({"id": k, "pred": rows[k]["pred"]})
        if ok is None:
            unscored.append(k)
            continue
        n += 1
        correct += ok
        for g, acc in groups.items():
            acc[str(e.get(g))][0] += 1
            acc[str(e.get(g))][1] += ok
    per = {g: {k: {"n": a, "correct": c, "accuracy": c / a} for k, (a, c) in sorted(acc.items())}
           for g, acc in groups.items()}
    return {"benchmark": benchmark, "n": n, "correct": correct, "accuracy": correct / n if n else 0.0,
            "per": per, "fallback": len(fallback), "fallback_items": fallback, "unscored": unscored, **cov}
