"""VideoRefer-Bench-Q / -D entries -> `schema.Sample`, hence the same records as training data.

Bench-Q entry: `video` (frame folder such as `DAVIS/JPEGImages/480p/<name>` or a video file),
`Question` (with `<objectN><region>`), `options`, `Answer`, `type`, `frame_idx`, `annotation` (one
`{frame: {segmentation}}` per object). Bench-D entry: `video`, `caption`, `frame_idx`, `annotation`.
(reference §5.1-5.2; official `inference_videorefer_{q,d}_bench.py`.)

The record's conversation is the official inference prompt as one human turn (`<video>\\n` +
prompt) and the ground truth as the gpt turn; the raw fields go to `extra` for scoring.

Modes (reference §3.1): 'single' keeps each object's mask at `frame_idx` only (an object without
it is skipped as `missing_segmentation`, where the official script raises KeyError); 'multi' keeps
every annotated frame.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from data_pipeline import schema

BENCH_Q_SUFFIX = ". Answer with the option's letter from the given choices directly."
BENCH_D_PROMPT = "Please give a detailed description of the highlighted object [<region>] in the video."
MODES = ("single", "multi")
# Prompt protocols: VideoRefer-7B's scripts, and VRVL3's (reference_vl3 §13): Bench-Q without the
# `[...]` around `<region>` (VRVL3's own expansion adds the brackets), Bench-D text before frames.
PROTOCOLS = ("videorefer", "vl3")
VL3_BENCH_D_PROMPT = "Please describe in detail the marked object <region> in the video."


def bench_q_prompt(question: str, options: list[str], protocol: str = "videorefer") -> str:
    """Official Bench-Q prompt: options appended, fixed suffix; VideoRefer-7B's script also writes
    `<region>` as `[<region>]`."""
    if protocol == "videorefer":
        question = question.replace("<region>", "[<region>]")
    return question + " " + " ".join(options) + BENCH_Q_SUFFIX


def _require(raw: Mapping, key: str, kind: type, sid: str) -> Any:
    value = raw.get(key)
    if not isinstance(value, kind):
        raise schema.SampleError("bad_benchmark_entry", sid, key,
                                 f"expected {kind.__name__}, got {type(value).__name__}")
    return value


def _frame_idx(raw: Mapping, sid: str) -> str:
    fi = raw.get("frame_idx")
    if isinstance(fi, bool) or not isinstance(fi, (int, str)) or not str(fi).isdigit():
        raise schema.SampleError("bad_benchmark_entry", sid, "frame_idx", f"expected a frame index, got {fi!r}")
    return str(fi)  # the official lookup is `ann[str(frame_idx)]`


def select_annotation(annotation: Any, frame_idx: str, mode: str, sid: str) -> Any:
    """The annotation the model sees: per object only `{frame_idx: ...}` in single mode."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "multi" or not isinstance(annotation, list):
        return annotation  # malformed annotations are reported by the schema
    out = []
    for k, obj in enumerate(annotation):
        if not isinstance(obj, Mapping):
            return annotation
        if frame_idx not in obj:
            raise schema.SampleError("missing_segmentation", sid, f"annotation[{k}][{frame_idx!r}]",
                                     f"single mode needs each object's mask at frame_idx {frame_idx}")
        out.append({frame_idx: obj[frame_idx]})
    return out


def _to_sample(raw: Any, index: int, mode: str, prompt_fn, answer_key: str, extra_fn,
               text_first: bool = False) -> schema.Sample:
    if not isinstance(raw, Mapping):
        raise schema.SampleError("bad_sample", f"#{index}", "<sample>",
                                 f"expected a JSON object, got {type(raw).__name__}")
    sid = schema.sample_id(raw, index)
    frame_idx = _frame_idx(raw, sid)
    prompt = prompt_fn(raw, sid)
    answer = _require(raw, answer_key, str, sid)
    train_form = {
        "id": sid, "video": raw.get("video"),
        "conversations": [{"from": "human", "value": prompt + "\n<video>" if text_first else "<video>\n" + prompt},
                          {"from": "gpt", "value": answer}],
        "annotation": select_annotation(raw.get("annotation"), frame_idx, mode, sid),
    }
    extra = {"mode": mode, "frame_idx": int(frame_idx), "prompt": prompt, **extra_fn(raw)}
    return schema.parse_sample(train_form, index, extra=extra)


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")


def parse_bench_q(raw: Any, index: int, mode: str = "single", protocol: str = "videorefer") -> schema.Sample:
    """One VideoRefer-Bench-Q entry -> Sample (raises `schema.SampleError`)."""
    _check_protocol(protocol)

    def prompt(r, sid):
        q = _require(r, "Question", str, sid)
        opts = _require(r, "options", list, sid)
        if not all(isinstance(o, str) for o in opts):
            raise schema.SampleError("bad_benchmark_entry", sid, "options", "options must be strings")
        return bench_q_prompt(q, opts, protocol)

    def extra(r):
        return {"benchmark": "videorefer-bench-q", "question": r["Question"], "options": r["options"],
                "answer": r["Answer"], "type": r.get("type")}

    return _to_sample(raw, index, mode, prompt, "Answer", extra)


def parse_bench_d(raw: Any, index: int, mode: str = "single", protocol: str = "videorefer") -> schema.Sample:
    """One VideoRefer-Bench-D entry -> Sample (raises `schema.SampleError`). The VRVL3 protocol
    puts its prompt before the frames (`...in the video.\n<video>`), as its script does."""
    _check_protocol(protocol)

    def extra(r):
        return {"benchmark": "videorefer-bench-d", "caption": r["caption"]}

    prompt = BENCH_D_PROMPT if protocol == "videorefer" else VL3_BENCH_D_PROMPT
    return _to_sample(raw, index, mode, lambda r, sid: prompt, "caption", extra, text_first=protocol == "vl3")


PARSERS = {"bench-q": parse_bench_q, "bench-d": parse_bench_d}
