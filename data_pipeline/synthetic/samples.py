"""Dataset entries of one video: training samples in the official VideoRefer format and the
Bench-Q / Bench-D entries, with their annotated frames."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from data_pipeline.bench_formats import BENCH_D_PROMPT, VL3_BENCH_D_PROMPT, bench_q_prompt
from data_pipeline.synthetic.captions import attributes, detailed_caption, short_caption
from data_pipeline.synthetic.questions import make_questions
from data_pipeline.synthetic.render import annotation
from data_pipeline.synthetic.scene import MIN_VISIBLE, QUESTION_TYPES, SynthConfig, Video


def _shared_frame(video: Video, objs: Sequence[int], rng: np.random.Generator,
                  prefer: Sequence[int] = ()) -> int:
    """A frame where every referred object is visible (the single-frame mask frame), one of
    `prefer` when possible."""
    ok = np.flatnonzero((video.masks[list(objs)].sum(axis=(2, 3)) >= MIN_VISIBLE).all(axis=0))
    visible = set(ok.tolist())
    pref = [t for t in prefer if t in visible]
    return int(rng.choice(pref or ok)) if len(ok) else 0


def keyframes(num_frames: int, n: int) -> list[int]:
    """The `n` evenly spaced frames (first and last included) masks are given on in multi-frame mode."""
    return sorted(set(np.linspace(0, num_frames - 1, n).round().astype(int).tolist()))


def _annotated(video: Video, objs: Sequence[int], rng: np.random.Generator, n: int) -> tuple[int, list[int]]:
    """(frame_idx, annotated frames): with n = 1 one frame where all `objs` are visible; else the
    `n` keyframes (every frame for n = 0), and frame_idx one of them where all are visible if there is one (so the
    single-frame reading of a multi-frame entry finds its mask)."""
    T = video.frames.shape[0]
    keys = keyframes(T, n) if n else list(range(T))
    fi = _shared_frame(video, objs, rng, prefer=keys if n > 1 else ())
    return fi, ([fi] if n == 1 else sorted({fi, *keys}))


# ----------------------------------------------------------------------------- samples


def _turns(video: Video, rng: np.random.Generator, cfg: SynthConfig) -> list[dict]:
    """A video's supervised turns: {type, prompt, reply, objects, frames} for each question (in
    the Bench-Q prompt), then `cfg.captions_per_video` captions (short, detailed) of one object."""
    out = []
    for q in make_questions(video, rng, cfg):
        _, frames = _annotated(video, q["objects"], rng, cfg.mask_frames)
        out.append({"type": q["type"], "prompt": bench_q_prompt(q["Question"], q["options"], cfg.prompt_protocol),
                    "reply": q["Answer"],
                    "objects": q["objects"], "frames": frames})
        if cfg.named_questions > 0 and q["kind"] != "colour" and rng.random() < cfg.named_questions:
            out.append({"type": q["type"], "prompt": bench_q_prompt(named(q["Question"], video, q["objects"]),
                                                                    q["options"], cfg.prompt_protocol),
                        "reply": q["Answer"], "objects": [], "frames": []})
    kinds = ("short", "detailed")
    if cfg.captions_per_video < 2:
        kinds = (kinds[int(rng.integers(2))],)[: cfg.captions_per_video]
    for kind in kinds:
        k = int(rng.integers(len(video.tracks)))
        _, frames = _annotated(video, [k], rng, cfg.mask_frames)
        vl3 = cfg.prompt_protocol == "vl3"  # VRVL3 adds the [...] around a region's tokens itself
        if kind == "short":
            prompt = f"What is {'<region>' if vl3 else '[<region>]'}? Answer in a few words."
            cap = short_caption(video.tracks[k])
        else:
            prompt, cap = (VL3_BENCH_D_PROMPT if vl3 else BENCH_D_PROMPT), detailed_caption(video, k, cfg.size)
        out.append({"type": f"{kind} caption", "prompt": prompt, "reply": cap, "objects": [k], "frames": frames})
    return out


def named(question: str, video: Video, objects: Sequence[int]) -> str:
    """`question` with its i-th `<objecti><region>` replaced by "the <colour> object" (colours are
    unique within a video, so the name is unambiguous)."""
    for i, k in enumerate(objects):
        question = question.replace(f"<object{i}><region>", f"the {video.tracks[k].colour} object")
    if "<region>" in question:
        raise ValueError(f"unnamed region left in {question!r}")
    return question


def train_samples(video: Video, rel: str, rng: np.random.Generator, cfg: SynthConfig) -> list[dict]:
    """Training samples (official format) from `_turns`: one turn per sample, or with
    `turns_per_sample` > 1 multi-round conversations (as in VideoRefer-700K's QA sets) of that many
    turns in shuffled order: `<video>` in the first human turn (`_with_video`), the annotation list holding each
    turn's objects in `<region>` order (an object asked about twice is listed twice)."""
    turns = _turns(video, rng, cfg)
    if cfg.turns_per_sample > 1:
        turns = [turns[i] for i in rng.permutation(len(turns))]
    out = []
    n = cfg.turns_per_sample
    for g, start in enumerate(range(0, len(turns), n)):
        group = turns[start:start + n]
        conv, ann = [], []
        for j, t in enumerate(group):
            conv += [{"from": "human", "value": _with_video(t["prompt"], cfg) if j == 0 else t["prompt"]},
                     {"from": "gpt", "value": t["reply"]}]
            ann += annotation(video, t["objects"], t["frames"])
        sid = f"{video.vid}_{_turn_id(group[0])}" if n == 1 else f"{video.vid}_c{g}"
        out.append({"id": sid, "video": rel, "conversations": conv, "annotation": ann,
                    "type": group[0]["type"] if n == 1 else "conversation"})
    return out


def _with_video(prompt: str, cfg: SynthConfig) -> str:
    """The first human turn: `<video>` before the text, except VRVL3's Bench-D prompt, which its
    script puts before the frames (`bench_formats.parse_bench_d`): trained as it is evaluated."""
    if cfg.prompt_protocol == "vl3" and prompt == VL3_BENCH_D_PROMPT:
        return prompt + "\n<video>"
    return "<video>\n" + prompt


def _turn_id(turn: dict) -> str:
    t = turn["type"]
    return t.split()[0] if t.endswith("caption") else "q" + str(QUESTION_TYPES.index(t))


def eval_entries(video: Video, rel: str, rng: np.random.Generator, cfg: SynthConfig) -> tuple[list[dict], list[dict]]:
    """Bench-Q entries (every question of the video) and one Bench-D entry; annotations on the
    `eval_mask_frames` keyframes where the object is visible, `frame_idx` a frame where all
    referred objects are."""
    bq = []
    for i, q in enumerate(make_questions(video, rng, cfg)):
        fi, frames = _annotated(video, q["objects"], rng, cfg.eval_mask_frames)
        bq.append({"id": f"{video.vid}_q{i}", "video": rel, "Question": q["Question"], "options": q["options"],
                   "Answer": q["Answer"], "type": q["type"], "kind": q["kind"], "frame_idx": fi,
                   "annotation": annotation(video, q["objects"], frames)})
    k = int(rng.integers(len(video.tracks)))
    fi, frames = _annotated(video, [k], rng, cfg.eval_mask_frames)
    bd = [{"id": f"{video.vid}_d", "video": rel, "caption": detailed_caption(video, k, cfg.size), "frame_idx": fi,
           "annotation": annotation(video, [k], frames), "attributes": attributes(video.tracks[k])}]
    return bq, bd
