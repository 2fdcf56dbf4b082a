"""General video multiple-choice QA in the official VideoRefer style: MVBench, VideoMME, Perception Test.

Readers build `schema.Sample`s (video only, no regions) whose human turn is the instruction the
official inference script builds, and keep what scoring needs in `extra`. Answer parsing follows
each official script (reference §5.3), fallbacks included:

* MVBench (`inference_video_mcqa_mvbench.py`, `mvbench_dump`): delete "answer"/"Answer"; the first
  match of `[(, ]*[<first>-<last letter>][), ]*`, stripped of spaces then of `(`/`)`, must be one
  of the letters (else index 2); with no match, the first option whose text occurs in the output
  (case-insensitive), else index 2. Scored as `eval_video_mcqa_mvbench.py`: accuracy over all
  questions and per task.
* VideoMME (`inference_video_mcqa_videomme.py`, `videomme_dump`, then `eval_video_mcqa_videomme.py`,
  `extract_characters_regex`): delete "answer"/"Answer"; the first A-D (optionally bracketed);
  else the first option text (or its digit's English word) found in the output; else "C". The
  scorer then re-extracts the letter from that response and compares with `answer`; accuracy
  overall, per duration, per task type and per domain, over answered questions.
* Perception Test MC (`inference_video_mcqa_perception_test_mcqa.py`): delete "answer"/"Answer";
  the first `(*[A-C])*` stripped to a letter; else the (modified) output equal to an option text,
  case-insensitive; else index 2. The official script only writes the submission JSON
  (`perception_test_submission`); with `answer_id` in the data we also score locally.

Frames: the official general benchmarks sample `model.config.num_frames` = 16 frames with
`aspect_ratio=None` (the CLI defaults to 16 for `mcqa`). MVBench clip bounds (seconds) are in
`extra["bound"]`, which `convert.build_record` (and so the predictor) samples within, at the
video's fps or 3 fps for the frame folders of Episodic Reasoning. VideoMME subtitles are read
from the official `.srt` files with pysubs2 at the official frame times (`videomme_subtitles`).
"""

from __future__ import annotations

import collections
import functools
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from data_pipeline import schema
from data_pipeline import video as video_lib
from vrefer_jax import paths as paths_lib
from vrefer_jax.evaluation import runner

MCQA_SUFFIX = "Answer with the option's letter from the given choices directly and only give the best option."
VIDEO_FORMATS = (".mp4", ".avi", ".mov", ".mkv")

# task -> (question file, video sub-folder, media kind, has start/end bounds), as the official
# MVBench scripts lay the data out.
MVBENCH_TASKS: dict[str, tuple[str, str, str, bool]] = {
    "Action Sequence": ("action_sequence.json", "star/Charades_v1_480/", "video", True),
    "Action Prediction": ("action_prediction.json", "star/Charades_v1_480/", "video", True),
    "Action Antonym": ("action_antonym.json", "ssv2_video/", "video", False),
    "Fine-grained Action": ("fine_grained_action.json", "Moments_in_Time_Raw/videos/", "video", False),
    "Unexpected Action": ("unexpected_action.json", "FunQA_test/test/", "video", False),
    "Object Existence": ("object_existence.json", "clevrer/video_validation/", "video", False),
    "Object Interaction": ("object_interaction.json", "star/Charades_v1_480/", "video", True),
    "Object Shuffle": ("object_shuffle.json", "perception/videos/", "video", False),
    "Moving Direction": ("moving_direction.json", "clevrer/video_validation/", "video", False),
    "Action Localization": ("action_localization.json", "sta/sta_video/", "video", True),
    "Scene Transition": ("scene_transition.json", "scene_qa/video/", "video", False),
    "Action Count": ("action_count.json", "perception/videos/", "video", False),
    "Moving Count": ("moving_count.json", "clevrer/video_validation/", "video", False),
    "Moving Attribute": ("moving_attribute.json", "clevrer/video_validation/", "video", False),
    "State Change": ("state_change.json", "perception/videos/", "video", False),
    "Fine-grained Pose": ("fine_grained_pose.json", "nturgbd/", "video", False),
    "Character Order": ("character_order.json", "perception/videos/", "video", False),
    "Egocentric Navigation": ("egocentric_navigation.json", "vlnqa/", "video", False),
    "Episodic Reasoning": ("episodic_reasoning.json", "tvqa/frames_fps3_hq/", "frame", True),
    "Counterfactual Inference": ("counterfactual_inference.json", "clevrer/video_validation/", "video", False),
}

VIDEOMME_HEAD = ("Select the best answer to the following multiple-choice question based on the video. "
                 "Respond with only the letter (A, B, C, or D) of the correct option.\n")
VIDEOMME_TAIL = MCQA_SUFFIX + " The best answer is: "


def _letter(i: int) -> str:
    return chr(ord("A") + i)


def _sample(sid: str, index: int, media: str, instruct: str, answer: str, extra: dict) -> schema.Sample:
    raw = {"id": sid, "video": media,
           "conversations": [{"from": "human", "value": "<video>\n" + instruct}, {"from": "gpt", "value": answer}]}
    return schema.parse_sample(raw, index, extra={"prompt": instruct, **extra})


def _find_video(folder: str | None, stem: str) -> str | None:
    """`stem + ext` for the first official extension present under `folder` (None if none is);
    without a folder, `stem.mp4`. `stem` comes from the data: one that leaves `folder` (`..`, an
    absolute path) raises `paths.PathOutsideRoot` rather than probing files elsewhere."""
    if folder is None:
        return stem + ".mp4"
    for ext in VIDEO_FORMATS:
        if os.path.exists(paths_lib.resolve_under(folder, stem + ext)):
            return stem + ext
    return None


def _video_or_error(folder: str | None, stem: str) -> str | schema.SampleError | None:
    """`_find_video`, with a path outside `folder` as the `media_outside_root` error for its questions."""
    try:
        return _find_video(folder, stem)
    except paths_lib.PathOutsideRoot as e:
        return schema.SampleError(e.reason, stem, "video", str(e))


# ----------------------------------------------------------------------------- MVBench


def mvbench_prompt(question: str, candidates: Sequence[str]) -> str:
    opts = "".join(f"({_letter(i)}) {c}\n" for i, c in enumerate(candidates))
    return f"Question: {question}\nOptions:\n{opts}{MCQA_SUFFIX}"


def load_mvbench(question_dir: str, tasks: Mapping[str, tuple[str, str, str, bool]] | None = None) -> list[runner.Item]:
    """Every task file of `question_dir` (official layout); media paths are relative to the video
    root (the task's sub-folder + the entry's `video`). Ids: `<task>/<position in its file>`."""
    tasks = MVBENCH_TASKS if tasks is None else tasks
    items: list[runner.Item] = []
    for task, (fname, prefix, kind, bounded) in tasks.items():
        with open(os.path.join(question_dir, fname), encoding="utf-8") as f:
            entries = json.load(f)
        for k, d in enumerate(entries):
            sid, idx = f"{task}/{k}", len(items)
            try:
                cands = [str(c) for c in d["candidates"]]
                answer_idx = -1
                for i, c in enumerate(cands):
                    if c == d["answer"]:
                        answer_idx = i  # the official loop keeps the last equal candidate
                extra = {"benchmark": "mvbench", "task_type": task, "options": cands,
                         "letters": [_letter(i) for i in range(len(cands))], "answer_idx": answer_idx,
                         "data_type": kind, "bound": [d["start"], d["end"]] if bounded else None}
                items.append(_sample(sid, idx, prefix + d["video"], mvbench_prompt(d["question"], cands),
                                     _letter(answer_idx) if answer_idx >= 0 else "", extra))
            except KeyError as e:
                items.append(schema.SampleError("bad_benchmark_entry", sid, str(e), "missing field"))
            except schema.SampleError as e:
                items.append(e)
    return items


def mvbench_pred_idx(output: str, letters: Sequence[str], options: Sequence[str]) -> tuple[int, bool]:
    """(option index, parsed) by the official MVBench rules; parsed=False where the official script
    falls back to index 2."""
    out = output.replace("answer", "").replace("Answer", "")
    found = re.findall(rf"[\(,\ ]*[{letters[0]}-{letters[-1]}][\),\ ]*", out)
    if not found:
        for i, opt in enumerate(options):
            if opt.lower() in out.lower():
                return i, True
        return 2, False
    a = found[0].strip().strip("()")
    return (letters.index(a), True) if a in letters else (2, False)


# ----------------------------------------------------------------------------- VideoMME


def videomme_prompt(question: str, choices: Sequence[str], subtitles: str | None = None) -> str:
    text = VIDEOMME_HEAD + f"{question}\n" + "".join(f"{c}\n" for c in choices) + VIDEOMME_TAIL
    return text if subtitles is None else f"This video's subtitles are listed below:\n{subtitles}\n" + text


def videomme_option_texts(choices: Sequence[str]) -> list[str]:
    """Option texts as the official script cuts them (`X. text` minus its last character); a choice
    not in that form is kept whole (the official script would crash)."""
    out = []
    for c in choices:
        m = re.findall(r"[A-D]\. (.*).", c)
        out.append(m[0] if m else c)
    return out


def read_videomme_records(path: str) -> list[dict]:
    """The official per-video records (JSON list), or the HF parquet grouped the official way
    (needs pyarrow)."""
    if not path.endswith(".parquet"):
        return runner.load_json(path)
    import pyarrow.parquet as pq  # optional dependency, only for the raw HF file

    records: list[dict] = []
    for r in pq.read_table(path).to_pylist():
        q = {"question_id": r["question_id"], "task_type": r["task_type"], "question": r["question"],
             "choices": list(r["options"]), "answer": r["answer"]}
        if records and records[-1]["video_id"] == r["video_id"]:
            records[-1]["questions"].append(q)
        else:
            records.append({"video_id": r["video_id"], "youtube_id": r["videoID"], "url": r["url"],
                            "duration": r["duration"], "domain": r["domain"], "sub_category": r["sub_category"],
                            "questions": [q]})
    return records


def subtitle_frame_ids(total_frames: int, num_frames: int) -> list[int]:
    """The frames whose subtitles the official VideoMME script reads: its older `get_seq_frames`
    rule (segment ends rounded, then the integer midpoint), not the 'v1' sampling of the video."""
    seg = float(total_frames - 1) / num_frames
    return [(int(np.round(seg * i)) + int(np.round(seg * (i + 1)))) // 2 for i in range(num_frames)]


def videomme_subtitles(video_path: str, srt_path: str, num_frames: int = 16) -> str:
    """Subtitle text for one VideoMME video, as the official script builds it: at each of the
    `num_frames` frame times (`subtitle_frame_ids` over the video's frame count, converted to ms
    at its fps by pysubs2), the first cue with start < t < end, line breaks joined by spaces;
    blank ones dropped; joined by newlines. "" when the .srt file does not exist or the video
    cannot be read (the official script's behaviour)."""
    import pysubs2  # the library the official script parses .srt with

    if not os.path.exists(srt_path):
        return ""
    try:
        reader = video_lib.open_video(video_path)
    except video_lib.MediaError:
        return ""
    if reader.num_frames < 1 or not reader.fps:
        return ""
    subs = pysubs2.load(srt_path, encoding="utf-8")
    lines = []
    for frame in subtitle_frame_ids(reader.num_frames, num_frames):
        t = pysubs2.make_time(fps=reader.fps, frames=frame)
        text = next((ev.text.replace("\\N", " ") for ev in subs if ev.start < t < ev.end), "")
        if text.strip():
            lines.append(text)
    return "\n".join(lines)


def load_videomme(data: str | Sequence[Mapping], video_folder: str | None = None,
                  subtitles: Mapping[str, str] | None = None, subtitle_folder: str | None = None,
                  num_frames: int = 16) -> list[runner.Item]:
    """VideoMME records -> one item per question (id = `question_id`). With `video_folder`, a
    video with no file in an official format gives `media_not_found` errors (the official
    `missing`). The subtitle-prefixed run: `subtitle_folder` holds the official `<youtube id>.srt`
    files, read with `videomme_subtitles` at `num_frames` frame times (needs `video_folder` for
    the frame count and fps); or `subtitles` {youtube id: text} gives the text directly. A video
    without subtitles gets the empty prefix, as the official script does."""
    if subtitle_folder is not None and video_folder is None:
        raise ValueError("subtitle_folder needs video_folder (frame times come from the video)")
    records = read_videomme_records(data) if isinstance(data, str) else data
    if subtitle_folder is not None:
        subtitles = dict(subtitles or {})
    items: list[runner.Item] = []
    for rec in records:
        ytid = rec["url"].split("watch?v=")[-1]
        media = _video_or_error(video_folder, ytid)
        if subtitle_folder is not None and isinstance(media, str) and ytid not in subtitles:
            # `ytid` passed `_find_video`'s check, so it stays inside the subtitle folder too.
            subtitles[ytid] = videomme_subtitles(os.path.join(video_folder, media),
                                                 paths_lib.resolve_under(subtitle_folder, ytid + ".srt"), num_frames)
        for q in rec["questions"]:
            sid, idx = str(q["question_id"]), len(items)
            if isinstance(media, schema.SampleError):
                items.append(schema.SampleError(media.reason, sid, "url", media.message))
                continue
            if media is None:
                items.append(schema.SampleError("media_not_found", sid, "url", f"no video file for {ytid!r}"))
                continue
            sub = None if subtitles is None else subtitles.get(ytid, "")
            extra = {"benchmark": "videomme", "video_id": rec.get("video_id"), "duration": rec.get("duration"),
                     "domain": rec.get("domain"), "sub_category": rec.get("sub_category"),
                     "task_type": q.get("task_type"), "choices": list(q["choices"]),
                     "options": videomme_option_texts(q["choices"]), "answer": q["answer"]}
            try:
                items.append(_sample(sid, idx, media, videomme_prompt(q["question"], q["choices"], sub),
                                     q["answer"], extra))
            except schema.SampleError as e:
                items.append(e)
    return items


_DIGIT_WORDS = dict(zip("0123456789", ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")))


def videomme_response(output: str, options: Sequence[str]) -> tuple[str, bool]:
    """(letter, parsed) by the official `videomme_dump` rules; parsed=False on the "C" fallback."""
    out = output.replace("answer", "").replace("Answer", "")
    found = re.findall(r"[\(\ \[]*([A-D])[\)\.\ \]]*", out)
    if found:
        return found[0].strip().strip("()"), True
    low = out.lower()
    for i, opt in enumerate(options):
        if opt.lower() in low or _DIGIT_WORDS.get(opt, opt).lower() in low:
            return "ABCD"[i], True
    return "C", False


# The official list lacks two commas, so two pairs of prefixes are joined into one string each.
_VIDEOMME_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                      "The best option is" "The correct option is", "Best answer:" "Best option:")


def videomme_extract(s: str) -> str:
    """The official scorer's `extract_characters_regex` (its prefix list reproduced as written)."""
    s = s.strip()
    for p in _VIDEOMME_PREFIXES:
        s = s.replace(p, "")
    if len(s.split()) > 10 and not re.search("[ABCD]", s):
        return ""
    m = re.search(r"[ABCD]", s)
    return m[0] if m else ""


# ----------------------------------------------------------------------------- Perception Test


def perception_test_prompt(question: str, options: Sequence[str]) -> str:
    return (f"Question: {question}\nOptions:\n(A) {options[0]}\n(B) {options[1]}\n(C) {options[2]}\n"
            + MCQA_SUFFIX)


def load_perception_test(data: str | Mapping, video_folder: str | None = None) -> list[runner.Item]:
    """The official MC JSON ({key: {metadata: {video_id}, mc_question: [...]}}) -> one item per
    question (id = `<video_id>/<question id>`)."""
    videos = runner.load_json(data)
    items: list[runner.Item] = []
    for v in videos.values():
        vid = v["metadata"]["video_id"]
        media = _video_or_error(video_folder, vid)
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
                items.append(_sample(sid, idx, media, perception_test_prompt(q["question"], q["options"]),
                                     _letter(ans) if isinstance(ans, int) else "", extra))
            except schema.SampleError as e:
                items.append(e)
    return items


def perception_test_pred_idx(output: str, options: Sequence[str]) -> tuple[int, bool]:
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


def perception_test_submission(rows: Mapping[str, dict] | Sequence[dict]) -> dict[str, list[dict]]:
    """The official server's JSON: {video_id: [{id, answer_id, answer}]} from prediction rows."""
    rows = rows.values() if isinstance(rows, Mapping) else rows
    out: dict[str, list[dict]] = collections.defaultdict(list)
    for r in rows:
        if r.get("pred") is None:
            continue
        i, _ = perception_test_pred_idx(r["pred"], r["options"])
        out[r["video_id"]].append({"id": r["question_id"], "answer_id": i, "answer": r["options"][i]})
    return dict(out)


# ----------------------------------------------------------------------------- running and scoring

LOADERS = {"mvbench": load_mvbench, "videomme": load_videomme, "perception_test": load_perception_test}


def row_fields(s: schema.Sample) -> dict[str, Any]:
    return {"video": s.media, **{k: v for k, v in s.extra.items() if k != "prompt"}}


# `runner.run_predictions` with this benchmark's prediction-row fields.
run = functools.partial(runner.run_predictions, row_fn=row_fields)


def _judge_row(bench: str, pred: str, e: Mapping[str, Any]) -> tuple[bool | None, bool]:
    """(correct or None when the data has no answer, parsed) for one prediction."""
    if bench == "mvbench":
        i, ok = mvbench_pred_idx(pred, e["letters"], e["options"])
        return i == e["answer_idx"], ok
    if bench == "videomme":
        letter, ok = videomme_response(pred, e["options"])
        x = videomme_extract(letter)
        return (x == e["answer"] if x else None), ok
    i, ok = perception_test_pred_idx(pred, e["options"])
    return (i == e["answer_idx"] if isinstance(e.get("answer_idx"), int) else None), ok


def _groups(bench: str) -> tuple[str, ...]:
    return {"mvbench": ("task_type",), "videomme": ("duration", "task_type", "domain"),
            "perception_test": ("area",)}[bench]


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
    groups = {g: collections.defaultdict(lambda: [0, 0]) for g in _groups(benchmark)}
    n = correct = 0
    fallback, unscored = [], []
    for k in order:
        e = extras[k]
        ok, parsed = _judge_row(benchmark, rows[k]["pred"], e)
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
