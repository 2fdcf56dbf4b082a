"""Inference requests (`vrefer-infer` flags or JSONL lines) -> validated `schema.Sample`s.

A request (JSON object):

    {"id": "q1",                                  optional (default "#<line>")
     "video": "clip.mp4" | "frames/dir"  or  "image": "photo.jpg",
     "question": "What is <region> doing?",       one <region> per object (see `format_question`)
     "frame": 12,                                 default frame of single-frame objects (default 0)
     "history": [{"question": ..., "answer": ...}],   optional earlier chat turns (the media tag
                                                  goes to the first; <region>s count over all)
     "objects": [                                 one entry per <region>, in order
        {"mask": "m.png"} | {"rle": {...} | "rle.json"} | {"box": [x0, y0, x1, y1]},   at "frame"
        {"png": "<base64 PNG>"} | {"polygon": [[x0, y0, x1, y1, ...], ...]}           inline
        {"frame": 30, "mask": "m30.png"},                                              at frame 30
        {"frames": {"3": {"mask": "a.png"}, "17": {"box": [...]}}}                     multi-frame
     ]}

or an official `"annotation"` list (`[{frame: {"segmentation": ...}}]`) instead of `objects`.
Paths (media, mask PNGs, RLE files) are relative to `media_root` and, for requests read from a
file (`confine=True`), must stay inside it: `../` escapes and absolute paths are refused with
`media_outside_root` unless `allow_absolute` (see `vrefer_jax.paths`). A mask image is refused
above `max_image_pixels` (`image_too_large`, read from its header before decoding); an all-zero
mask is accepted (`Predictor.prepare` warns about it). A mask PNG is True where the pixel is
non-zero (any channel); a box covers pixels x0 <= x < x1, y0 <= y < y1 (rounded). Everything becomes a COCO RLE
annotation, so the sample takes exactly the training / benchmark path (`convert.decode_sample`).
"""

from __future__ import annotations

import json
import os
import re
import warnings
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from data_pipeline import masks as masks_lib
from data_pipeline import schema
from data_pipeline import video as video_lib
from vrefer_jax.paths import PathOutsideRoot, resolve_under

REGION = "<region>"
_OBJECT_TAG = re.compile(r"<object\d+>")
_KINDS = ("mask", "rle", "box", "png", "polygon")
# Largest mask image decoded (pixels): an 8K frame is 33M; a PNG claiming more is refused before
# decoding (a few KB of PNG can declare gigapixels). Pillow's own bomb check still applies above it.
MAX_IMAGE_PIXELS = 8192 * 8192
# Reason codes of request errors (besides `schema.REASONS`, which a request's sample can also fail with).
REASONS = {
    "bad_json": "a line of the requests file is not valid JSON",
    "bad_request": "a line is not a JSON object, or a request field is missing / mistyped / unreadable",
    "bad_frame_index": "a frame is not a non-negative integer (or a string of digits)",
    "image_too_large": "a mask image declares more pixels than max_image_pixels (decompression bomb)",
    "media_outside_root": "a path in the request leaves the media root, or is absolute while not allowed",
}


class RequestError(ValueError):
    """A malformed request; the message names the request and the field. `reason` is a reason code
    (`bad_request`, or e.g. `media_outside_root` / `image_too_large`)."""

    def __init__(self, request_id: str, field: str, message: str, reason: str = "bad_request"):
        self.request_id, self.field, self.reason = request_id, field, reason
        super().__init__(f"request {request_id!r}, field {field}: {message}")


@dataclasses.dataclass(frozen=True)
class PathPolicy:
    """Where a request's paths may point. `confine`: paths from data stay inside `media_root`
    (`vrefer_jax.paths.resolve_under`); off for paths the user typed on the command line.
    `allow_absolute`: absolute paths from data are read as they are. `max_image_pixels`: mask
    image size limit."""

    confine: bool = True
    allow_absolute: bool = False
    max_image_pixels: int = MAX_IMAGE_PIXELS


def _path(value: Any, root: str, policy: PathPolicy, rid: str, field: str) -> str:
    """A path from a request, joined onto `root` (and confined to it under `policy.confine`)."""
    if not isinstance(value, str) or not value.strip():
        raise RequestError(rid, field, f"expected a path string, got {value!r}")
    if not policy.confine:
        return os.path.join(root, value)
    try:
        return resolve_under(root or ".", value, allow_absolute=policy.allow_absolute)
    except PathOutsideRoot as e:
        raise RequestError(rid, field, str(e), reason=e.reason) from None


def _frame(value: Any, rid: str, field: str) -> int:
    """A frame index: a non-negative int or a string of digits (JSON keys); nothing else is guessed."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise RequestError(rid, field, f"a frame index is a non-negative integer, got {value!r}", "bad_frame_index")


class ImageTooLarge(ValueError):
    """An image over the pixel limit (reason code `image_too_large`)."""

    reason = "image_too_large"


def read_mask(path, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """A mask image (a path or a binary file object) -> [H, W] bool (non-zero in any channel).
    Raises `ImageTooLarge` for an image over `max_pixels` (checked from the header, before
    decoding) and OSError for an unreadable one."""
    with warnings.catch_warnings():  # the size is checked here, Pillow's warning would only repeat it
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except Image.DecompressionBombError as e:  # over Pillow's own (2x) limit: refused at open
            raise ImageTooLarge(f"image_too_large: {_name(path)}: {e}") from None
        with im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageTooLarge(f"image_too_large: {_name(path)} is {w}x{h} = {w * h} pixels, over the limit of "
                                    f"{max_pixels} (max_image_pixels)")
            return np.asarray(im).reshape(h, w, -1).any(axis=-1)


def _name(path) -> str:
    return path if isinstance(path, str) else "the inline PNG"


def decode_png(value: Any, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """An inline mask image: base64 text (a `data:image/png;base64,` prefix allowed) -> [H, W] bool,
    with `read_mask`'s size limit. Raises ValueError for text that is not base64."""
    import base64
    import binascii
    import io

    if not isinstance(value, str):
        raise ValueError(f"expected base64 text, got {type(value).__name__}")
    data = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"not base64: {e}") from None
    return read_mask(io.BytesIO(raw), max_pixels)


def format_question(question: str, bench_q_style: bool = False, seen: set[str] | None = None) -> str:
    """The question as the model sees it.

    * bench_q_style: every `<region>` becomes `[<region>]` (official Bench-Q script).
    * A question with `<objectN>` tags and no `<region>` gets `<objectN> [<region>]` for each tag
      (the official notebooks' multi-object convention); N is only text, the k-th tag binds to the
      k-th object. In a chat (`seen` given: the tags earlier turns introduced), a tag met again
      only names its object (no second `<region>`); new tags are added to `seen`.
    """
    if REGION not in question and _OBJECT_TAG.search(question):
        if seen is None:  # one question: every tag is an object
            return _OBJECT_TAG.sub(lambda m: m.group(0) + " [" + REGION + "]", question)

        def expand(m):
            if m.group(0) in seen:
                return m.group(0)
            seen.add(m.group(0))
            return m.group(0) + " [" + REGION + "]"

        return _OBJECT_TAG.sub(expand, question)
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


def _segmentation(spec: Mapping, frame: int, root: str, sizes: _FrameSizes, rid: str, field: str,
                  policy: PathPolicy) -> Any:
    kinds = [k for k in _KINDS if k in spec]
    if len(kinds) != 1:
        raise RequestError(rid, field, f"give exactly one of {_KINDS}, got {sorted(spec)}")
    kind, value = kinds[0], spec[kinds[0]]
    try:
        if kind == "mask":
            return _rle(read_mask(_path(value, root, policy, rid, f"{field}.mask"), policy.max_image_pixels))
        if kind == "png":
            return _rle(decode_png(value, policy.max_image_pixels))
        if kind == "polygon":  # COCO polygons in pixels; `schema.parse_sample` checks them
            if not isinstance(value, list) or not value or not all(isinstance(p, list) for p in value):
                raise ValueError(f"expected a list of [x0, y0, x1, y1, ...] lists, got {value!r}")
            return value
        if kind == "rle":
            if isinstance(value, str):
                with open(_path(value, root, policy, rid, f"{field}.rle"), encoding="utf-8") as f:
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
    except RequestError:
        raise
    except (OSError, ValueError, TypeError, video_lib.MediaError) as e:
        raise RequestError(rid, f"{field}.{kind}", str(e), getattr(e, "reason", "bad_request")) from None


def _annotation(req: Mapping, root: str, modality: str, media_path: str, rid: str, policy: PathPolicy) -> list:
    if "annotation" in req:
        if not isinstance(req["annotation"], list):
            raise RequestError(rid, "annotation", "expected a list of {frame: {\"segmentation\": ...}}")
        return req["annotation"]
    objects = req.get("objects") or []
    if not isinstance(objects, list):
        raise RequestError(rid, "objects", "expected a list")
    default = _frame(req.get("frame", 0), rid, "frame")
    sizes = _FrameSizes(media_path, modality)
    out = []
    for k, obj in enumerate(objects):
        field = f"objects[{k}]"
        if not isinstance(obj, Mapping):
            raise RequestError(rid, field, "expected an object")
        if "frames" in obj:
            frames = obj["frames"]
            if not isinstance(frames, Mapping) or not frames:
                raise RequestError(rid, field + ".frames", "expected a non-empty {frame: {mask|rle|box}} map")
            items = [(_frame(f, rid, f"{field}.frames"), spec, f"{field}.frames[{f!r}]")
                     for f, spec in frames.items()]
        else:
            items = [(_frame(obj.get("frame", default), rid, f"{field}.frame"), obj, field)]
        for _, spec, fld in items:
            if not isinstance(spec, Mapping):
                raise RequestError(rid, fld, f"expected an object {{mask|rle|box: ...}}, got {spec!r}")
        out.append({str(f): {"segmentation": _segmentation(spec, f, root, sizes, rid, fld, policy)}
                    for f, spec, fld in items})
    return out


def request_to_sample(req: Mapping[str, Any], index: int = 0, media_root: str = "",
                      bench_q_style: bool = False, policy: PathPolicy = PathPolicy(),
                      media_file: str | None = None) -> schema.Sample:
    """One request -> a validated `schema.Sample` (raises `RequestError` or `schema.SampleError`).

    `policy` decides where the request's paths may point (default: inside `media_root`). A relative
    media path that was confined stays as written (relative to `media_root`); any other (absolute,
    or typed on the command line) becomes the absolute path checked here, which the predictor reads
    with `allow_absolute=True`. `media_file`: the media, already stored by the caller (an upload:
    the request's `video` / `image` value is then only its name); read with `allow_absolute=True`."""
    if not isinstance(req, Mapping):
        raise RequestError(f"#{index}", "(request)", f"expected a JSON object, got {type(req).__name__}")
    rid = str(req["id"]) if req.get("id") is not None else f"#{index}"
    media = [k for k in ("video", "image") if req.get(k)]
    if len(media) != 1:
        raise RequestError(rid, "video/image", "give exactly one of `video` and `image`")
    modality = media[0]
    media_path = media_file or _path(req[modality], media_root, policy, rid, modality)
    question = req.get("question")
    if not isinstance(question, str) or not question.strip():
        raise RequestError(rid, "question", "a non-empty string is required")
    tags = [t for t in schema.MODAL_TOKENS.values() if t in question]
    if tags:  # the model takes one media placeholder per sample, the one added below
        raise RequestError(rid, "question", f"must not contain {tags[0]} (the {modality} tag is added to it)")
    seen: set[str] | None = set() if req.get("history") else None  # chat: tags given a <region> earlier
    turns = [(format_question(q, bench_q_style, seen), a) for q, a in _history(req.get("history"), rid)]
    question = format_question(question, bench_q_style, seen)
    turns.append((question, ""))
    annotation = _annotation(req, media_root, modality, media_path, rid, policy)
    n_regions = sum(q.count(REGION) for q, _ in turns)
    if n_regions != len(annotation):
        raise RequestError(rid, "question", f"{n_regions} {REGION} token(s) but {len(annotation)} object(s) "
                           "given (objects / --mask / --rle / --box): one <region> per object, in order")
    tag = schema.MODAL_TOKENS[modality]
    as_written = policy.confine and not os.path.isabs(req[modality]) and media_file is None
    conv = [t for k, (q, a) in enumerate(turns)
            for t in ({"from": "human", "value": (tag + "\n" if k == 0 else "") + q}, {"from": "gpt", "value": a})]
    raw = {"id": rid, modality: req[modality] if as_written else os.path.abspath(media_path), "annotation": annotation,
           "conversations": conv}
    return schema.parse_sample(raw, index, extra={"question": question})


def _history(value: Any, rid: str) -> list[tuple[str, str]]:
    """Earlier chat turns `[{"question", "answer"}]` -> [(question, answer)]; answers must be
    non-empty (an empty answer marks the question to answer) and hold no media tag or <region>."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise RequestError(rid, "history", "expected a list of {question, answer} turns")
    out = []
    for k, turn in enumerate(value):
        field = f"history[{k}]"
        if not isinstance(turn, Mapping) or set(turn) != {"question", "answer"}:
            raise RequestError(rid, field, f"expected an object with exactly `question` and `answer`, got {turn!r}")
        q, a = turn["question"], turn["answer"]
        if not isinstance(q, str) or not q.strip() or not isinstance(a, str) or not a.strip():
            raise RequestError(rid, field, "question and answer must be non-empty strings")
        for name, text in (("question", q), ("answer", a)):
            tags = [t for t in schema.MODAL_TOKENS.values() if t in text] + ([REGION] if name == "answer" and REGION
                                                                             in text else [])
            if tags:
                raise RequestError(rid, f"{field}.{name}", f"must not contain {tags[0]}")
        out.append((q, a))
    return out


class BadLine:
    """A line of a requests file that is not a request object (kept in place so that it gets an
    error row): `message` names the line, `reason` is `bad_json` or `bad_request`."""

    def __init__(self, message: str, reason: str):
        self.message, self.reason = message, reason

    def __repr__(self) -> str:
        return f"BadLine({self.message!r})"


def read_request_lines(path: str) -> list[tuple[str, Any]]:
    """A JSONL file (or one JSON list) of requests -> [(where, request or `BadLine`)], one per
    non-blank line (`where` = "line N", 1-based) or list item ("item N"). A line that is not JSON
    or not a JSON object becomes a `BadLine`, so the other lines are still answered.
    Raises OSError / UnicodeDecodeError for an unreadable file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            items = None  # maybe JSONL whose first line is a list: read it line by line
        if isinstance(items, list):
            return [(f"item {k + 1}", _object_or_bad(r, f"item {k + 1}")) for k, r in enumerate(items)]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"line {n}", _object_or_bad(json.loads(line), f"line {n}")))
        except json.JSONDecodeError as e:
            out.append((f"line {n}", BadLine(f"line {n}: not valid JSON ({e.msg} at column {e.colno})", "bad_json")))
    return out


def _object_or_bad(value: Any, where: str) -> Any:
    if isinstance(value, Mapping):
        return value
    return BadLine(f"{where}: expected a JSON object (a request), got {type(value).__name__}", "bad_request")


def read_requests(path: str) -> list[dict]:
    """A JSONL file (or a JSON list) of requests; the first bad line raises ValueError naming it
    (`read_request_lines` keeps going instead)."""
    out = []
    for _, r in read_request_lines(path):
        if isinstance(r, BadLine):
            raise ValueError(f"{path}: {r.message}")
        out.append(r)
    return out


def samples_from_requests(reqs: Sequence[Any], media_root: str = "", bench_q_style: bool = False,
                          policy: PathPolicy = PathPolicy()):
    """-> (list of (index, Sample), list of (index, error)); bad requests do not stop the rest.

    An error is a `RequestError`, `schema.SampleError` or `BadLine` (each has `.reason`; `str()`
    or `.message` names the request and the field)."""
    ok, bad = [], []
    for i, r in enumerate(reqs):
        if isinstance(r, BadLine):
            bad.append((i, r))
            continue
        try:
            ok.append((i, request_to_sample(r, i, media_root, bench_q_style, policy)))
        except (RequestError, schema.SampleError) as e:
            bad.append((i, e))
    return ok, bad


def error_text(e: Any) -> str:
    """The one-line message of an error from `samples_from_requests`."""
    return e.message if isinstance(e, BadLine) else str(e)


__all__ = ["RequestError", "PathPolicy", "BadLine", "ImageTooLarge", "MAX_IMAGE_PIXELS", "REASONS", "format_question",
           "decode_png",
           "request_to_sample", "read_mask", "read_request_lines", "read_requests", "samples_from_requests",
           "error_text"]
