"""Perception Test multiple-choice in the official VideoRefer style
(`inference_video_mcqa_perception_test_mcqa.py`).

Answer parsing (reference §5.3): delete "answer"/"Answer"; the first `(*[A-C])*` stripped to a
letter; else the (modified) output equal to an option text, case-insensitive; else index 2. The
official script only writes the submission JSON (`submission`); with `answer_id` in the data we
also score locally.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Mapping, Sequence

from data_pipeline import schema
from vrefer_jax.evaluation import mcqa, runner


def prompt(question: str, options: Sequence[str]) -> str:
    return (f"Question: {question}\nOptions:\n(A) {options[0]}\n(B) {options[1]}\n(C) {options[2]}\n"
            + mcqa.MCQA_SUFFIX)


def load(data: str | Mapping, video_folder: str | None = None) -> list[runner.Item]:
    """The official MC JSON ({key: {metadata: {video_id}, mc_question: [...]}}) -> one item per
    question (id = `<video_id>/<question id>`)."""
    videos = runner.load_json(data)
    items: list[runner.Item] = []
    for v in videos.values():
        vid = v["metadata"]["video_id"]
        media = mcqa.video_or_error(video_folder, vid)
        for q in v["mc_question"]:
            sid, idx = f"{vid}/{q['id']}", len(items)
            if isinstance(media, schema.SampleError):
                items.append(schema.SampleError(media.reason, sid, "metadata.video_id", media.message))
                continue
            if media is None:
                items.append(schema.SampleError("media_not_found", sid, "metadata.video_id",
                                                f"no video file for {vid!r}"))
                continue
            ans = q.get("answer_id")
            extra = {"benchmark": "perception_test", "video_id": vid, "question_id": q["id"],
                     "options": list(q["options"]), "answer_idx": ans, "area": q.get("area")}
            try:
                items.append(mcqa.make_sample(sid, idx, media, prompt(q["question"], q["options"]),
                                     mcqa.letter(ans) if isinstance(ans, int) else "", extra))
            except schema.SampleError as e:
                items.append(e)
    return items


def pred_idx(output: str, options: Sequence[str]) -> tuple[int, bool]:
    """(option index, parsed) by the official Perception Test rules; parsed=False on the index-2
    fallback."""
    out = output.replace("answer", "").replace("Answer", "")
    found = re.findall(r"\(*[A-C]\)*", out)
    if found:
        a = "(" + found[0].strip().strip("()") + ")"
        if a in ("(A)", "(B)", "(C)"):
            return ("(A)", "(B)", "(C)").index(a), True
    lows = [o.lower() for o in options]
    if out.lower() in lows:
        return lows.index(out.lower()), True
    return 2, False


def submission(rows: Mapping[str, dict] | Sequence[dict]) -> dict[str, list[dict]]:
    """The official server's JSON: {video_id: [{id, answer_id, answer}]} from prediction rows."""
    rows = rows.values() if isinstance(rows, Mapping) else rows
    out: dict[str, list[dict]] = collections.defaultdict(list)
    for r in rows:
        if r.get("pred") is None:
            continue
        i, _ = pred_idx(r["pred"], r["options"])
        out[r["video_id"]].append({"id": r["question_id"], "answer_id": i, "answer": r["options"][i]})
    return dict(out)


GROUPS = ("area",)


def judge(pred: str, e: Mapping) -> tuple[bool | None, bool]:
    """(correct, or None when the data has no answer; parsed) of one prediction."""
    i, ok = pred_idx(pred, e["options"])
    return (i == e["answer_idx"] if isinstance(e.get("answer_idx"), int) else None), ok
