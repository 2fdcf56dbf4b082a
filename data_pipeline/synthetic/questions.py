"""Bench-Q-style multiple-choice questions about a video: at most one per question type, each
with its answer computed from the tracks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from data_pipeline.synthetic.render import shape_mask
from data_pipeline.synthetic.scene import COLOURS, DIRECTIONS, QUESTION_TYPES, SHAPES, SynthConfig, Track, Video

LETTERS = "ABCDEFGH"


def _tags(n: int) -> list[str]:
    return [f"<object{i}><region>" for i in range(n)]


def _mc(rng: np.random.Generator, correct: str, distractors: Sequence[str], n: int) -> tuple[list[str], str]:
    opts = [correct] + list(rng.permutation(list(distractors))[: n - 1])
    opts = [opts[i] for i in rng.permutation(len(opts))]
    labelled = [f"({LETTERS[i]}) {o}" for i, o in enumerate(opts)]
    return labelled, labelled[opts.index(correct)]


def _pick_kind(rng: np.random.Generator, cfg: SynthConfig, kinds: Sequence[str]) -> str | None:
    """One of `kinds` that `cfg.question_kinds` allows (uniformly), or None."""
    allowed = [k for k in kinds if k in cfg.question_kinds]
    return str(allowed[int(rng.integers(len(allowed)))]) if allowed else None


def _q_basic(video, rng, cfg):
    kind = _pick_kind(rng, cfg, ("colour", "shape"))
    if kind is None:
        return None
    k = int(rng.integers(len(video.tracks)))
    tr = video.tracks[k]
    if kind == "colour":
        others = [c for c in COLOURS if c != tr.colour]
        in_video = [t.colour for t in video.tracks if t.colour != tr.colour]  # distractors from the scene first
        rest = [c for c in others if c not in in_video]
        dis = in_video + list(rng.permutation(rest))
        opts, ans = _mc(rng, tr.colour.capitalize(), [d.capitalize() for d in dis[:3]], 4)
        return f"What colour is {_tags(1)[0]}?", opts, ans, [k], "colour"
    opts, ans = _mc(rng, tr.shape.capitalize(), [s.capitalize() for s in SHAPES if s != tr.shape], 3)
    return f"What shape is {_tags(1)[0]}?", opts, ans, [k], "shape"


def _q_sequential(video, rng, cfg):
    if "direction" not in cfg.question_kinds:
        return None
    k = int(rng.integers(len(video.tracks)))
    tr = video.tracks[k]
    words = {d: f"It moves {d}" for d in DIRECTIONS}
    opts, ans = _mc(rng, words[tr.direction], [w for d, w in words.items() if d != tr.direction], 4)
    return f"In which direction does {_tags(1)[0]} move during the video?", opts, ans, [k], "direction"


def _relation(a: Track, b: Track, S: int) -> str | None:
    """Where a is relative to b on every frame, on the axis of their mean separation; None when
    the separation falls under 15% of the frame on some frame."""
    d = a.centres - b.centres  # [T, 2]
    axis = int(np.argmax(np.abs(d.mean(axis=0))))
    sep = d[:, axis]
    if not (np.all(sep > 0.15 * S) or np.all(sep < -0.15 * S)):
        return None
    if axis == 0:
        return "To the right of it" if sep[0] > 0 else "To the left of it"
    return "Below it" if sep[0] > 0 else "Above it"


def _pairs(video, rng):
    n = len(video.tracks)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    return [pairs[i] for i in rng.permutation(len(pairs))]


def _q_relationship(video, rng, cfg):
    S = cfg.size
    kind = _pick_kind(rng, cfg, ("position", "size"))
    if kind is None:
        return None
    pairs = _pairs(video, rng)
    if kind == "position":
        for a, b in pairs:
            rel = _relation(video.tracks[a], video.tracks[b], S)
            if rel is not None:
                all_rel = ["To the left of it", "To the right of it", "Above it", "Below it"]
                opts, ans = _mc(rng, rel, [r for r in all_rel if r != rel], 4)
                t0, t1 = _tags(2)
                return f"Where is {t0} relative to {t1} throughout the video?", opts, ans, [a, b], "position"
        if "size" not in cfg.question_kinds:
            return None
    for a, b in pairs:  # size: area ratio >= 1.5 between the two
        ra, rb = video.tracks[a].radius, video.tracks[b].radius
        if max(ra, rb) / min(ra, rb) >= 1.2:  # radius ratio 1.2 = area ratio 1.44 (same shape)
            area = [shape_mask(video.tracks[k].shape, S / 2, S / 2, video.tracks[k].radius, S).sum() for k in (a, b)]
            if max(area) / min(area) >= 1.4:
                opts, ans = _mc(rng, "Larger" if area[0] > area[1] else "Smaller",
                                ["Smaller" if area[0] > area[1] else "Larger"], 2)
                t0, t1 = _tags(2)
                return f"Compared with {t1}, is {t0} larger or smaller?", opts, ans, [a, b], "size"
    return None


EDGES = ("The left edge", "The right edge", "The top edge", "The bottom edge")


def exit_edge(track: Track, size: int, margin: float = 1.25) -> str | None:
    """The frame edge the centre would cross first if it kept its mean velocity after the last
    frame; None when the runner-up edge is reached within `margin` times the time (too close to call)."""
    T = len(track.centres)
    (px, py), (vx, vy) = track.centres[-1], (track.centres[-1] - track.centres[0]) / (T - 1)
    times = [px / -vx if vx < 0 else np.inf, (size - px) / vx if vx > 0 else np.inf,
             py / -vy if vy < 0 else np.inf, (size - py) / vy if vy > 0 else np.inf]
    order = np.argsort(times)
    if times[order[1]] < margin * times[order[0]]:
        return None
    return EDGES[int(order[0])]


def _q_reasoning(video, rng, cfg):
    kind = _pick_kind(rng, cfg, ("speed", "exit edge"))
    if kind == "exit edge":
        for k in rng.permutation(len(video.tracks)):
            edge = exit_edge(video.tracks[int(k)], cfg.size)
            if edge is not None:
                opts, ans = _mc(rng, edge, [e for e in EDGES if e != edge], 4)
                q = f"If {_tags(1)[0]} keeps moving the same way, which edge of the frame will it reach first?"
                return q, opts, ans, [int(k)], "exit edge"
        return None
    if kind != "speed":
        return None
    for a, b in _pairs(video, rng):
        sa, sb = video.tracks[a].speed, video.tracks[b].speed
        if max(sa, sb) / min(sa, sb) >= cfg.min_speed_ratio:
            opts, ans = _mc(rng, "<object0>" if sa > sb else "<object1>",
                            ["<object1>" if sa > sb else "<object0>"], 2)
            t0, t1 = _tags(2)
            return f"Which of {t0} and {t1} moves faster?", opts, ans, [a, b], "speed"
    return None


QUARTERS = ("The top-left quarter", "The top-right quarter", "The bottom-left quarter", "The bottom-right quarter")


def future_quarter(track: Track, size: int, horizon: float = 0.25) -> str | None:
    """The quarter of the frame holding the centre `horizon` clip-lengths after the last frame if
    it keeps its velocity (clipped to the frame); None within 8% of a midline. Depends on where the
    object is as well as where it goes, so it is not the motion direction in disguise."""
    T = len(track.centres)
    v = (track.centres[-1] - track.centres[0]) / (T - 1)
    p = np.clip(track.centres[-1] + v * horizon * T, 0, size)
    if np.abs(p - size / 2).min() < 0.08 * size:
        return None
    return QUARTERS[2 * int(p[1] > size / 2) + int(p[0] > size / 2)]


def _q_future(video, rng, cfg):
    if "future position" not in cfg.question_kinds:
        return None
    for k in rng.permutation(len(video.tracks)):
        quarter = future_quarter(video.tracks[int(k)], cfg.size)
        if quarter is not None:
            opts, ans = _mc(rng, quarter, [q for q in QUARTERS if q != quarter], 4)
            q = (f"If {_tags(1)[0]} keeps moving the same way, which part of the frame will it be in "
                 "shortly after the video ends?")
            return q, opts, ans, [int(k)], "future position"
    return None


QUESTION_MAKERS = dict(zip(QUESTION_TYPES, (_q_basic, _q_sequential, _q_relationship, _q_reasoning, _q_future)))


OPTION_SETS = (
    tuple(c.capitalize() for c in COLOURS), tuple(s.capitalize() for s in SHAPES),
    tuple(f"It moves {d}" for d in DIRECTIONS),
    ("To the left of it", "To the right of it", "Above it", "Below it"), ("Larger", "Smaller"),
    ("<object0>", "<object1>"), EDGES, QUARTERS)


def _fixed(opts: Sequence[str], ans: str) -> tuple[list[str], str]:
    """Replace sampled options by the answer's whole candidate set in its fixed order."""
    text = ans.split(") ", 1)[1]
    universe = next(u for u in OPTION_SETS if text in u)
    labelled = [f"({LETTERS[i]}) {o}" for i, o in enumerate(universe)]
    return labelled, labelled[universe.index(text)]


def make_questions(video: Video, rng: np.random.Generator, cfg: SynthConfig) -> list[dict]:
    """At most one question per type: {type, kind, Question, options, Answer, objects}; `kind` is
    what the question asks (one of `cfg.question_kinds`)."""
    out = []
    for qtype, fn in QUESTION_MAKERS.items():
        res = fn(video, rng, cfg)
        if res is not None:
            q, opts, ans, objs, kind = res
            if cfg.fixed_options:
                opts, ans = _fixed(opts, ans)
            out.append({"type": qtype, "kind": kind, "Question": q, "options": opts, "Answer": ans,
                        "objects": objs})
    return out
