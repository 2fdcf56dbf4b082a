"""Attribute scoring of Bench-D descriptions on the synthetic set (no LLM judge): does the
description name the object's colour, shape and motion, and nothing else?"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from data_pipeline.synthetic.scene import COLOURS

_COLOUR_WORDS = {c: c for c in COLOURS} | {"violet": "purple", "color": None}
_SHAPE_WORDS = {"circle": "circle", "disc": "circle", "disk": "circle", "ball": "circle", "round": "circle",
                "square": "square", "box": "square", "rectangle": "square", "triangle": "triangle",
                "triangular": "triangle"}
_MOTION_WORDS = {"left": "left", "leftward": "left", "leftwards": "left", "right": "right", "rightward": "right",
                 "rightwards": "right", "up": "up", "upward": "up", "upwards": "up", "down": "down",
                 "downward": "down", "downwards": "down"}
_MOTION_RE = re.compile(r"\b(?:mov|travel|head|go|drift|slid|glid|fl)\w*\s+(?:\w+\s+){0,3}?"
                        r"(left|leftwards?|right|rightwards?|up|upwards?|down|downwards?)\b")


def _found(text: str, table: Mapping[str, str | None]) -> set[str]:
    return {table[w] for w in re.findall(r"[a-z]+", text) if table.get(w)}


def score_description(pred_text: str, gt_attributes: Mapping[str, str]) -> dict[str, float]:
    """Attribute matching of a description against {colour, shape, motion}.

    Each attribute scores 1 when the prediction names the ground-truth value and no other value of
    that attribute, else 0 (hedging over several colours does not pay). Motion is read from a
    direction word within four words after a motion verb ("moves left", "moving towards the
    right"), so position words ("top-left of the frame") do not count. `score` is the mean.
    """
    text = pred_text.lower()
    found = {"colour": _found(text, _COLOUR_WORDS), "shape": _found(text, _SHAPE_WORDS),
             "motion": {_MOTION_WORDS[m] for m in _MOTION_RE.findall(text)}}
    out = {k: float(found[k] == {gt_attributes[k]}) for k in ("colour", "shape", "motion")}
    out["score"] = sum(out.values()) / 3
    return out


def score_descriptions(preds: Sequence[str], entries: Sequence[Mapping]) -> dict[str, float]:
    """Mean of `score_description` over Bench-D entries (with `attributes`)."""
    rows = [score_description(p, e["attributes"]) for p, e in zip(preds, entries, strict=True)]
    return {k: float(np.mean([r[k] for r in rows])) if rows else 0.0 for k in ("colour", "shape", "motion", "score")}
