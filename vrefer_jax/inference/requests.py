"""Inference requests (`vrefer-infer` flags or JSONL lines) -> validated `schema.Sample`s.

A request (JSON object):

    {"id": "q1",                                  optional (default "#<line>")
     "video": "clip.mp4" | "frames/dir"  or  "image": "photo.jpg",
     "question": "What is <region> doing?",       one <region> per object (see `format_question`)
     "frame": 12,                                 default frame of single-frame objects (default 0)
     "objects": [                                 one entry per <region>, in order
        {"mask": "m.png"} | {"rle": {...} | "rle.json"} | {"box": [x0, y0, x1, y1]},   at "frame"
        {"frame": 30, "mask": "m30.png"},                                              at frame 30
        {"frames": {"3": {"mask": "a.png"}, "17": {"box": [...]}}}                     multi-frame
     ]}

or an official `"annotation"` list (`[{frame: {"segmentation": ...}}]`) instead of `objects`.
Paths are relative to `media_root`. A mask PNG is True where the pixel is non-zero (any channel);
a box covers pixels x0 <= x < x1, y0 <= y < y1 (rounded). Everything becomes a COCO RLE
annotation, so the sample takes exactly the training / benchmark path (`convert.build_record`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from data_pipeline import masks as masks_lib
from data_pipeline import schema
from data_pipeline import video as video_lib

REGION = "<region>"
_OBJECT_TAG = re.compile(r"<object\d+>")
_KINDS = ("mask", "rle", "box")


class RequestError(ValueError):
    """A malformed request; the message names the request and the field."""

    def __init__(self, request_id: str, field: str, message: str):
        self.request_id, self.field = request_id, field
        super().__init__(f"request {request_id!r}, field {field}: {message}")


def format_question(question: str, bench_q_style: bool = False) -> str:
    """The question as the model sees it.

    * bench_q_style: every `<region>` becomes `[<region>]` (official Bench-Q script).
    * A question with `<objectN>` tags and no `<region>` gets `<objectN> [<region>]` for each tag
      (the official notebooks' multi-object convention); N is only text, the k-th tag binds to the
      k-th object.
    """
    if REGION not in question and _OBJECT_TAG.search(question):
        return _OBJECT_TAG.sub(lambda m: m.group(0) + " [" + REGION + "]", question)
    return question.replace(REGION, "[" + REGION + "]") if bench_q_style else question


class _FrameSizes:
    """(H, W) of a media frame, decoded on demand (only boxes need it)."""

    def __init__(self, path: str, modality: str):
        self.path, self.modality, self._reader, self._cache = path, modality, None, {}

    def __call__(self, frame: int) -> tuple[int, int]:
        if frame not in self._cache:
            if self.modality == "image":
                self._cache[frame] = video_lib.read_image(self.path).shape[:2]
            else:
                if self._reader is None:
                    self._reader = video_lib.open_video(self.path)
                self._cache[frame] = self._reader.get([frame])[frame].shape[:2]
        return self._cache[frame]


def _rle(mask: np.ndarray) -> dict:
    return {"size": list(mask.shape), "counts": masks_lib.encode_mask(mask).decode("ascii")}


def _segmentation(spec: Mapping, frame: int, root: str, sizes: _FrameSizes, rid: str, field: str) -> Any:
    kinds = [k for k in _KINDS if k in spec]
    if len(kinds) != 1:
        raise RequestError(rid, field, f"give exactly one of {_KINDS}, got {sorted(spec)}")
    kind, value = kinds[0], spec[kinds[0]]
    try:
        if kind == "mask":
            with Image.open(os.path.join(root, value)) as im:
                return _rle(np.asarray(im).reshape(im.size[1], im.size[0], -1).any(axis=-1))
        if kind == "rle":
            if isinstance(value, str):
                with open(os.path.join(root, value), encoding="utf-8") as f:
                    value = json.load(f)
            return value
        box = [float(v) for v in (value.split(",") if isinstance(value, str) else value)]
        if len(box) != 4:
            raise ValueError(f"a box is x0,y0,x1,y1, got {value!r}")
        h, w = sizes(frame)
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        m = np.zeros((h, w), bool)
        m[max(y0, 0):max(min(y1, h), 0), max(x0, 0):max(min(x1, w), 0)] = True
        if not m.any():
            raise ValueError(f"box {box} covers no pixel of the {w}x{h} frame {frame}")
        return _rle(m)
    except (OSError, ValueError, TypeError, video_lib.MediaError) as e:
        raise RequestError(rid, f"{field}.{kind}", str(e)) from None


def _annotation(req: Mapping, root: str, modality: str, media: str, rid: str) -> list:
    if "annotation" in req:
        return req["annotation"]
    objects = req.get("objects") or []
    if not isinstance(objects, list):
        raise RequestError(rid, "objects", "expected a list")
    default = int(req.get("frame", 0))
    sizes = _FrameSizes(os.path.join(root, media), modality)
    out = []
    for k, obj in enumerate(objects):
        field = f"objects[{k}]"
        if not isinstance(obj, Mapping):
            raise RequestError(rid, field, "expected an object")
        if "frames" in obj:
            frames = obj["frames"]
            if not isinstance(frames, Mapping) or not frames:
                raise RequestError(rid, field + ".frames", "expected a non-empty {frame: {mask|rle|box}} map")
            items = [(int(f), spec, f"{field}.frames[{f!r}]") for f, spec in frames.items()]
        else:
            items = [(int(obj.get("frame", default)), obj, field)]
        out.append({str(f): {"segmentation": _segmentation(spec, f, root, sizes, rid, fld)}
                    for f, spec, fld in items})
    return out


def request_to_sample(req: Mapping[str, Any], index: int = 0, media_root: str = "",
                      bench_q_style: bool = False) -> schema.Sample:
    """One request -> a validated `schema.Sample` (raises `RequestError` or `schema.SampleError`)."""
    rid = str(req["id"]) if req.get("id") is not None else f"#{index}"
    media = [k for k in ("video", "image") if req.get(k)]
    if len(media) != 1:
        raise RequestError(rid, "video/image", "give exactly one of `video` and `image`")
    modality = media[0]
    question = req.get("question")
    if not isinstance(question, str) or not question.strip():
        raise RequestError(rid, "question", "a non-empty string is required")
    question = format_question(question, bench_q_style)
    annotation = _annotation(req, media_root, modality, req[modality], rid)
    n_regions = question.count(REGION)
    if n_regions != len(annotation):
        raise RequestError(rid, "question", f"{n_regions} {REGION} token(s) but {len(annotation)} object(s) "
                           "given (objects / --mask / --rle / --box): one <region> per object, in order")
    tag = schema.MODAL_TOKENS[modality]
    raw = {"id": rid, modality: req[modality], "annotation": annotation,
           "conversations": [{"from": "human", "value": tag + "\n" + question}, {"from": "gpt", "value": ""}]}
    return schema.parse_sample(raw, index, extra={"question": question})


def read_requests(path: str) -> list[dict]:
    """A JSONL file (or a JSON list) of requests."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def samples_from_requests(reqs: Sequence[Mapping], media_root: str = "", bench_q_style: bool = False):
    """-> (list of (index, Sample), list of (index, error message)); bad requests do not stop the rest."""
    ok, bad = [], []
    for i, r in enumerate(reqs):
        try:
            ok.append((i, request_to_sample(r, i, media_root, bench_q_style)))
        except (RequestError, schema.SampleError) as e:
            bad.append((i, str(e)))
    return ok, bad


__all__ = ["RequestError", "format_question", "request_to_sample", "read_requests", "samples_from_requests"]
