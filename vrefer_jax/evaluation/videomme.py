"""VideoMME in the official VideoRefer style (`inference_video_mcqa_videomme.py`, `videomme_dump`,
then `eval_video_mcqa_videomme.py`, `extract_characters_regex`).

Answer parsing (reference §5.3): delete "answer"/"Answer"; the first A-D (optionally bracketed);
else the first option text (or its digit's English word) found in the output; else "C". The
scorer then re-extracts the letter from that response and compares with `answer`; accuracy
overall, per duration, per task type and per domain, over answered questions. Subtitles are read
from the official `.srt` files with pysubs2 at the official frame times (`read_subtitles`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import numpy as np

from data_pipeline import schema
from data_pipeline import video as video_lib
from vrefer_jax import paths as paths_lib
from vrefer_jax.evaluation import mcqa, runner

HEAD = ("Select the best answer to the following multiple-choice question based on the video. "
                 "Respond with only the letter (A, B, C, or D) of the correct option.\n")
TAIL = mcqa.MCQA_SUFFIX + " The best answer is: "


def prompt(question: str, choices: Sequence[str], subtitles: str | None = None) -> str:
    text = HEAD + f"{question}\n" + "".join(f"{c}\n" for c in choices) + TAIL
    return text if subtitles is None else f"This video's subtitles are listed below:\n{subtitles}\n" + text


def option_texts(choices: Sequence[str]) -> list[str]:
    """Option texts as the official script cuts them (`X. text` minus its last character); a choice
    not in that form is kept whole (the official script would crash)."""
    out = []
    for c in choices:
        m = re.findall(r"[A-D]\. (.*).", c)
        out.append(m[0] if m else c)
    return out


def read_records(path: str) -> list[dict]:
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


def read_subtitles(video_path: str, srt_path: str, num_frames: int = 16) -> str:
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


def load(data: str | Sequence[Mapping], video_folder: str | None = None,
                  subtitles: Mapping[str, str] | None = None, subtitle_folder: str | None = None,
                  num_frames: int = 16) -> list[runner.Item]:
    """VideoMME records -> one item per question (id = `question_id`). With `video_folder`, a
    video with no file in an official format gives `media_not_found` errors (the official
    `missing`). The subtitle-prefixed run: `subtitle_folder` holds the official `<youtube id>.srt`
    files, read with `read_subtitles` at `num_frames` frame times (needs `video_folder` for
    the frame count and fps); or `subtitles` {youtube id: text} gives the text directly. A video
    without subtitles gets the empty prefix, as the official script does."""
    if subtitle_folder is not None and video_folder is None:
        raise ValueError("subtitle_folder needs video_folder (frame times come from the video)")
    records = read_records(data) if isinstance(data, str) else data
    if subtitle_folder is not None:
        subtitles = dict(subtitles or {})
    items: list[runner.Item] = []
    for rec in records:
        ytid = rec["url"].split("watch?v=")[-1]
        media = mcqa.video_or_error(video_folder, ytid)
        if subtitle_folder is not None and isinstance(media, str) and ytid not in subtitles:
            # `ytid` passed `mcqa.find_video`'s check, so it stays inside the subtitle folder too.
            subtitles[ytid] = read_subtitles(os.path.join(video_folder, media),
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
                     "options": option_texts(q["choices"]), "answer": q["answer"]}
            try:
                items.append(mcqa.make_sample(sid, idx, media, prompt(q["question"], q["choices"], sub),
                                     q["answer"], extra))
            except schema.SampleError as e:
                items.append(e)
    return items


_DIGIT_WORDS = dict(zip("0123456789", ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")))


def response(output: str, options: Sequence[str]) -> tuple[str, bool]:
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
_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                      "The best option is" "The correct option is", "Best answer:" "Best option:")


def extract(s: str) -> str:
    """The official scorer's `extract_characters_regex` (its prefix list reproduced as written)."""
    s = s.strip()
    for p in _PREFIXES:
        s = s.replace(p, "")
    if len(s.split()) > 10 and not re.search("[ABCD]", s):
        return ""
    m = re.search(r"[ABCD]", s)
    return m[0] if m else ""


GROUPS = ("duration", "task_type", "domain")


def judge(pred: str, e: Mapping) -> tuple[bool | None, bool]:
    """(correct, or None when the official scorer extracts no letter; parsed) of one prediction."""
    letter, ok = response(pred, e["options"])
    x = extract(letter)
    return (x == e["answer"] if x else None), ok
