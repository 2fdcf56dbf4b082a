"""Ground-truth text about one object: short and detailed captions, and the attributes Bench-D
descriptions are scored on (`vrefer_jax.evaluation.attribute_score`)."""

from __future__ import annotations

import numpy as np

from data_pipeline.synthetic.render import shape_mask
from data_pipeline.synthetic.scene import Track, Video


def _pos_word(x: float, y: float, size: int) -> str:
    col = ("left", "centre", "right")[min(int(3 * x / size), 2)]
    row = ("top", "middle", "bottom")[min(int(3 * y / size), 2)]
    return "centre" if (row, col) == ("middle", "centre") else (f"{row}-{col}" if row != "middle" and col != "centre"
                                                                else (row if col == "centre" else col))


def speed_word(track: Track, size: int) -> str:
    return "fast" if track.speed * (len(track.centres) - 1) / size > 0.3 else "slow"  # share of the frame crossed


def short_caption(tr: Track) -> str:
    return f"A {tr.colour} {tr.shape} moving {tr.direction}."


def detailed_caption(video: Video, k: int, size: int) -> str:
    tr = video.tracks[k]
    (x0, y0), (x1, y1) = tr.centres[0], tr.centres[-1]
    text = (f"A {tr.size} {tr.colour} {tr.shape} that moves {tr.direction} at a {speed_word(tr, size)} pace, "
            f"from the {_pos_word(x0, y0, size)} of the frame to the {_pos_word(x1, y1, size)}.")
    frac = video.masks[k].sum(axis=(1, 2)) / np.maximum(
        1, np.stack([shape_mask(tr.shape, *c, tr.radius, size) for c in tr.centres]).sum(axis=(1, 2)))
    if frac.min() < 0.9:
        text += " It is partly hidden behind another object at times."
    return text


def attributes(tr: Track) -> dict:
    return {"colour": tr.colour, "shape": tr.shape, "motion": tr.direction}
