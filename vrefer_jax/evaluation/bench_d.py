"""VideoRefer-Bench-D: description predictions, LLM-judge scoring, attribute scoring (reference §5.2).

Prediction rows carry `video`, `caption` and `pred` (the fields of the official inference output).
Two scorers:

* `score_judge`: the four-dimension rubric through an OpenAI-compatible endpoint (`judge.py`).
* `score_attributes`: our synthetic Bench-D (entries with `attributes` {colour, shape, motion}),
  scored by `attribute_score.score_descriptions` without any LLM.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

from data_pipeline import bench_formats, schema
from vrefer_jax.evaluation import attribute_score
from vrefer_jax.evaluation import judge as judge_lib
from vrefer_jax.evaluation import runner


def load(data: str | Sequence, mode: str = "single", protocol: str = "videorefer") -> list[runner.Item]:
    """Bench-D JSON (path or list) -> items; an entry's `attributes` (synthetic set) is kept in
    `extra["attributes"]`. `protocol`: the prompt of the model family's script."""
    entries = runner.load_json(data)

    def parse(raw, i):
        s = bench_formats.parse_bench_d(raw, i, mode, protocol)
        if isinstance(raw.get("attributes"), Mapping):
            s = dataclasses.replace(s, extra={**s.extra, "attributes": dict(raw["attributes"])})
        return s

    return runner.parse_all(entries, parse)


def row_fields(s: schema.Sample) -> dict[str, Any]:
    e = s.extra
    row = {"video": s.media, "caption": e["caption"], "mode": e["mode"], "frame_idx": e["frame_idx"]}
    if "attributes" in e:
        row["attributes"] = e["attributes"]
    return row


# `runner.run_predictions` with this benchmark's prediction-row fields.
run = functools.partial(runner.run_predictions, row_fn=row_fields)


def _predicted(rows: Mapping[str, dict],
               items: Sequence[runner.Item] | None) -> tuple[list[tuple[str, dict, dict]], dict]:
    """[(id, row, extra)] of rows with a prediction, in benchmark order, and the coverage report."""
    _, out, cov = runner.predicted(rows, items)
    return out, cov


def _as_map(rows) -> dict[str, dict]:
    return dict(rows) if isinstance(rows, Mapping) else {str(r["id"]): r for r in rows}


def score_judge(rows: Mapping[str, dict] | Sequence[dict], client: judge_lib.JudgeClient,
                items: Sequence[runner.Item] | None = None, log=None) -> dict[str, Any]:
    """Judge every predicted description; the four means, their average, per-item scores and
    every item the judge reply could not be parsed for (see `judge.aggregate`)."""
    preds, cov = _predicted(_as_map(rows), items)
    judged = judge_lib.judge_items([(sid, e["caption"], r["pred"]) for sid, r, e in preds], client, log=log)
    return {"benchmark": "videorefer-bench-d", "scorer": "judge", "judge_model": client.cfg.model,
            **judge_lib.aggregate(judged), "judged": judged, "judge_requests": client.requests, **cov}


def score_attributes(rows: Mapping[str, dict] | Sequence[dict],
                     items: Sequence[runner.Item] | None = None) -> dict[str, Any]:
    """Attribute matching (synthetic Bench-D): mean colour / shape / motion / score over the
    predicted items; items without `attributes` are listed, not scored."""
    preds, cov = _predicted(_as_map(rows), items)
    usable = [(sid, r["pred"], e["attributes"]) for sid, r, e in preds if isinstance(e.get("attributes"), Mapping)]
    no_attr = [sid for sid, r, e in preds if not isinstance(e.get("attributes"), Mapping)]
    means = attribute_score.score_descriptions([p for _, p, _ in usable], [{"attributes": a} for *_, a in usable])
    per_item = [{"id": sid, **attribute_score.score_description(p, a)} for sid, p, a in usable]
    return {"benchmark": "videorefer-bench-d", "scorer": "attributes", "n": len(usable), **means,
            "per_item": per_item, "without_attributes": no_attr, **cov}
