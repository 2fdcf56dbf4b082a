"""Parse and validate VideoRefer-700K-style samples into typed records.

A sample (one element of the training JSON list; reference §4.1):

    {"id": ..., "video": "rel/path.mp4" | "image": "rel/path.jpg",
     "conversations": [{"from": "human", "value": "<video>\\n... <region> ..."}, {"from": "gpt", ...}, ...],
     "annotation": [{"17": {"segmentation": S}, "42": {...}}, ...],   # one dict per object
     "height": H, "width": W}                                         # optional

`S` is a compressed RLE dict, an uncompressed RLE (`counts` list), a COCO polygon list or null
(see `masks.parse_segmentation`). Every problem raises `SampleError` with a reason code from
`REASONS`, the sample id, the field path and a message; nothing is repaired silently.

Checks that need the media (frame count, frame sizes) happen in `convert.build_record`, with the
same error type.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from data_pipeline import masks as masks_lib
from vrefer_jax.paths import OUTSIDE_ROOT

REGION_TOKEN = "<region>"
MODAL_TOKENS = {"video": "<video>", "image": "<image>"}
ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}

# Reason code -> what it means. The converter counts skipped samples by these codes.
REASONS: dict[str, str] = {
    "bad_json_line": "a line of a JSON Lines file is not valid UTF-8 JSON (its line number is the field)",
    "bad_sample": "the sample is not a JSON object",
    "duplicate_id": "the sample's id was already used by an earlier sample (the first one is kept)",
    "bad_media": "not exactly one of `video` / `image`, or its value is not a non-empty string",
    "media_not_found": "the video / image / frame folder does not exist",
    OUTSIDE_ROOT: "the media path is absolute or leaves the media root with `..` (absolute paths need "
                  "an explicit option)",
    "unreadable_media": "the media cannot be opened or a needed frame cannot be decoded",
    "truncated_media": "the video has fewer frames than its container declares (a cut-off file)",
    "bad_clip_bound": "the clip bound (start, end seconds; MVBench) admits no frame of the video",
    "bad_conversations": "conversations missing, empty, malformed, or not alternating human/gpt",
    "modal_token_mismatch": "a video/image sample needs its tag in exactly one turn; no other tag",
    "region_mask_mismatch": "number of <region> tokens != number of annotated objects",
    "bad_annotation": "annotation is not a list of non-empty objects {frame: {segmentation}}",
    "bad_frame_index": "a frame key is not a non-negative integer, or repeats within an object",
    "frame_index_out_of_range": "a frame key is beyond the last frame of the video",
    "image_multi_frame": "an object of an image sample has more than one mask",
    "missing_segmentation": "an annotated frame has no `segmentation` entry",
    "bad_segmentation": "a segmentation is malformed (unknown format, bad counts, bad polygon)",
    "empty_rle": "an RLE has empty counts",
    "polygon_out_of_bounds": "a polygon vertex lies more than one frame size outside the frame",
    "bad_size": "height/width are not both positive integers",
    "mask_size_mismatch": "a mask's size differs from its frame's size",
    "bad_benchmark_entry": "a benchmark entry lacks or mistypes Question/options/Answer/caption/frame_idx",
    "bad_box": "a box is not [x, y, width, height] finite numbers (Ref-L4 / VG region boxes)",
    "bad_media_size": "the image / frame size is outside what the model's image processor takes",
    "bad_region": "a region cannot be cropped and zoomed from its mask and frame",
    "region_count_mismatch": "the region token count differs from the pooled cells (float-mask parity mode)",
    "worker_died": "the converter worker process died on this sample (e.g. a crash in a decoder)",
    "unexpected_error": "an exception no check anticipated (type and message are kept): please report it",
}


class SampleError(ValueError):
    """An unusable sample: `reason` (a key of REASONS), `sample_id`, `field` and `message`."""

    def __init__(self, reason: str, sample_id: str, field: str, message: str):
        if reason not in REASONS:
            raise KeyError(f"unknown reason code {reason!r}")
        self.reason, self.sample_id, self.field, self.message = reason, sample_id, field, message
        super().__init__(f"[{reason}] sample {sample_id!r}, field {field}: {message}")

    def to_dict(self) -> dict[str, str]:
        return {"id": self.sample_id, "reason": self.reason, "field": self.field, "message": self.message}


@dataclasses.dataclass(frozen=True)
class RegionObject:
    """One referred object: absolute frame indices (JSON key order), the keys as written, and
    their segmentations."""

    frames: tuple[int, ...]
    keys: tuple[str, ...]
    segmentations: tuple[masks_lib.Segmentation, ...]


@dataclasses.dataclass(frozen=True)
class Sample:
    """A validated sample. `conversations` is the JSON list as given (validated, not rewritten)."""

    sample_id: str
    index: int  # position in its source list
    modality: str  # "video" | "image" | "text"
    media: str | None  # path relative to the media root
    conversations: tuple[Mapping[str, str], ...]
    objects: tuple[RegionObject, ...]
    height: int | None = None
    width: int | None = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def region_layout(self) -> tuple[list[int], list[list[int]]]:
        """(`all_frames`, `ann_indices`): the union of annotated frames and, per object, its frames
        as indices into that union, in the object's JSON key order (reference §3.1).

        The official order of `all_frames` is Python `set` order of the key strings (hash-seed
        dependent); ours is ascending frame index. The order of region frames does not change any
        result: each (object, frame) pair still pools the same frame's features and the temporal
        merge follows the object's own key order. Images: one region frame, index 0 for all.
        """
        if self.modality == "image":
            return ([0] if self.objects else []), [[0] for _ in self.objects]
        union = sorted({f for obj in self.objects for f in obj.frames})
        pos = {f: i for i, f in enumerate(union)}
        return union, [[pos[f] for f in obj.frames] for obj in self.objects]


def prompt_turns(sample: Sample) -> list[Mapping[str, str]]:
    """The turns an inference prompt is built from (a leading non-human turn dropped, as officially):
    everything before the first gpt turn whose text is empty (a chat: earlier questions and answers,
    then the question to answer), or, when no gpt turn is empty, the first human turn alone (a
    benchmark or training sample answered from its first question)."""
    kept = list(sample.conversations)
    while kept and ROLES.get(kept[0].get("from")) != "human":
        kept = kept[1:]
    for i, t in enumerate(kept):
        if ROLES[t["from"]] == "gpt" and not t["value"].strip():
            return kept[:i]
    return kept[:1]


# ----------------------------------------------------------------------------- whole-input checks


def sample_id(raw: Any, index: int) -> str:
    """The id a sample is known by (in records, reports and predictions): `str(raw["id"])` when
    the entry is an object with a non-null `id`, else `"#<index>"`."""
    if isinstance(raw, Mapping) and raw.get("id") is not None:
        return str(raw["id"])
    return f"#{index}"


@dataclasses.dataclass(frozen=True)
class BadLine:
    """Stands in for a JSON Lines line that could not be read, so sample indices stay aligned with
    the file's lines and the line becomes one `bad_json_line` skip instead of aborting the file."""

    line: int  # 1-based line number in the file
    message: str  # names the file, the line and what is wrong
    text: str  # the line as read (undecodable bytes escaped), so the input hash sees it


def duplicate_ids(entries: Sequence[Any]) -> dict[int, tuple[str, int]]:
    """{index of a later sample: (its id, index of the first sample with that id)} (see `sample_id`;
    entries without an id are `#<index>`, unique unless another entry is given that id)."""
    first: dict[str, int] = {}
    dups: dict[int, tuple[str, int]] = {}
    for i, raw in enumerate(entries):
        if isinstance(raw, BadLine):
            continue
        sid = sample_id(raw, i)
        if sid in first:
            dups[i] = (sid, first[sid])
        else:
            first[sid] = i
    return dups


@dataclasses.dataclass(frozen=True)
class CheckedParse:
    """`parse` preceded by the checks that need the whole input: an unreadable line is a
    `bad_json_line` skip and a repeated id a `duplicate_id` skip (the first sample with an id is
    kept; later ones are skipped whatever else they hold). Picklable for worker processes."""

    parse: Callable[[Any, int], Sample]
    duplicates: Mapping[int, tuple[str, int]]

    @classmethod
    def over(cls, parse: Callable[[Any, int], Sample], entries: Sequence[Any]) -> "CheckedParse":
        return cls(parse, duplicate_ids(entries))

    def __call__(self, raw: Any, index: int) -> Sample:
        if isinstance(raw, BadLine):
            raise SampleError("bad_json_line", f"#{index}", f"line {raw.line}", raw.message)
        if index in self.duplicates:
            sid, first = self.duplicates[index]
            raise SampleError("duplicate_id", sid, "id", f"id {sid!r} is already used by sample #{first}")
        return self.parse(raw, index)


# ----------------------------------------------------------------------------- parsing


_INT_KEY = re.compile(r"[0-9]+")


def _is_pos_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def parse_sample(raw: Any, index: int, extra: Mapping[str, Any] | None = None,
                 allow_text_only: bool = False) -> Sample:
    """Validate one training-format sample. Raises `SampleError`.

    The sample id is `raw["id"]` (as a string) when present, else `"#<index>"`. Text-only samples
    (neither `video` nor `image`) are accepted only with `allow_text_only`.
    """
    if not isinstance(raw, Mapping):
        raise SampleError("bad_sample", f"#{index}", "<sample>", f"expected a JSON object, got {type(raw).__name__}")
    sid = sample_id(raw, index)

    modality, media = _parse_media(raw, sid, allow_text_only)
    conversations = _parse_conversations(raw.get("conversations"), sid)
    height, width = _parse_size(raw, sid)
    objects = _parse_annotation(raw.get("annotation"), sid, modality)
    _check_text(conversations, modality, len(objects), sid)
    return Sample(sid, index, modality, media, conversations, objects, height, width, dict(extra or {}))


def _parse_media(raw: Mapping, sid: str, allow_text_only: bool) -> tuple[str, str | None]:
    present = [k for k in ("video", "image") if k in raw and raw[k] is not None]
    if len(present) > 1:
        raise SampleError("bad_media", sid, "video/image", "both `video` and `image` are set")
    if not present:
        if allow_text_only:
            return "text", None
        raise SampleError("bad_media", sid, "video/image", "neither `video` nor `image` is set")
    key = present[0]
    value = raw[key]
    if not isinstance(value, str) or not value.strip():
        raise SampleError("bad_media", sid, key, f"expected a non-empty path string, got {value!r}")
    return key, value


def _parse_conversations(conv: Any, sid: str) -> tuple[Mapping[str, str], ...]:
    if not isinstance(conv, list) or not conv:
        raise SampleError("bad_conversations", sid, "conversations", "expected a non-empty list of turns")
    for i, turn in enumerate(conv):
        field = f"conversations[{i}]"
        if not isinstance(turn, Mapping):
            raise SampleError("bad_conversations", sid, field, "a turn must be an object {from, value}")
        if turn.get("from") not in ROLES:
            raise SampleError("bad_conversations", sid, field + ".from",
                              f"role must be one of {sorted(ROLES)}, got {turn.get('from')!r}")
        if not isinstance(turn.get("value"), str):
            raise SampleError("bad_conversations", sid, field + ".value", "turn text must be a string")
    roles = [ROLES[t["from"]] for t in conv]
    start = 1 if roles[0] != "human" else 0  # the official `preprocess` drops a leading non-human turn
    kept = roles[start:]
    for j, role in enumerate(kept):
        want = "human" if j % 2 == 0 else "gpt"
        if role != want:
            raise SampleError("bad_conversations", sid, f"conversations[{j + start}].from",
                              f"turns must alternate human/gpt starting with human; expected {want}, got {role}")
    if len(kept) < 2 or len(kept) % 2:
        raise SampleError("bad_conversations", sid, "conversations",
                          f"need (human, gpt) pairs; got {len(kept)} usable turn(s)")
    return tuple(dict(t) for t in conv)


def _parse_size(raw: Mapping, sid: str) -> tuple[int | None, int | None]:
    h, w = raw.get("height"), raw.get("width")
    if h is None and w is None:
        return None, None
    if not (_is_pos_int(h) and _is_pos_int(w)):
        raise SampleError("bad_size", sid, "height/width",
                          f"expected two positive integers, got height={h!r}, width={w!r}")
    return h, w


def _parse_annotation(ann: Any, sid: str, modality: str) -> tuple[RegionObject, ...]:
    if ann is None:
        return ()
    if not isinstance(ann, list):
        raise SampleError("bad_annotation", sid, "annotation", f"expected a list of objects, got {type(ann).__name__}")
    if ann and modality == "text":
        raise SampleError("bad_annotation", sid, "annotation", "a text-only sample cannot have annotations")
    objects = []
    for k, obj in enumerate(ann):
        field = f"annotation[{k}]"
        if not isinstance(obj, Mapping) or not obj:
            raise SampleError("bad_annotation", sid, field, "an object must be a non-empty {frame: {segmentation}} map")
        if modality == "image" and len(obj) != 1:
            raise SampleError("image_multi_frame", sid, field, f"an image object takes one mask, got {len(obj)}")
        frames, keys, segs, seen = [], [], [], {}
        for key, entry in obj.items():
            kfield = f"{field}[{key!r}]"
            if not isinstance(key, str) or not _INT_KEY.fullmatch(key):
                raise SampleError("bad_frame_index", sid, kfield, "frame key must be a non-negative integer string")
            f = int(key)
            if modality == "image":
                f = 0  # the image itself; the key's value is irrelevant (official `[[0]] * n`)
            elif f in seen:
                raise SampleError("bad_frame_index", sid, kfield,
                                  f"frame {f} repeats key {seen[f]!r} of the same object")
            seen[f] = key
            if not isinstance(entry, Mapping) or "segmentation" not in entry:
                raise SampleError("missing_segmentation", sid, kfield + ".segmentation",
                                  "expected an object with a `segmentation` entry (null is allowed)")
            try:
                segs.append(masks_lib.parse_segmentation(entry["segmentation"]))
            except masks_lib.MaskFormatError as e:
                raise SampleError(e.reason, sid, kfield + ".segmentation" + e.subfield, e.message) from None
            frames.append(f)
            keys.append(key)
        objects.append(RegionObject(tuple(frames), tuple(keys), tuple(segs)))
    return tuple(objects)


def _check_text(conv: Sequence[Mapping[str, str]], modality: str, n_objects: int, sid: str) -> None:
    start = 1 if ROLES[conv[0]["from"]] != "human" else 0  # the dropped turn never reaches the model
    kept = conv[start:]
    for m, tag in MODAL_TOKENS.items():
        turns = [i + start for i, t in enumerate(kept) if tag in t["value"]]
        if m == modality and len(turns) != 1:
            raise SampleError("modal_token_mismatch", sid, "conversations",
                              f"a {m} sample needs {tag} in exactly one turn, found it in {len(turns)}")
        if m != modality and turns:
            raise SampleError("modal_token_mismatch", sid, f"conversations[{turns[0]}].value",
                              f"{tag} in a {modality} sample")
    n_regions = sum(t["value"].count(REGION_TOKEN) for t in kept)
    if n_regions != n_objects:
        raise SampleError("region_mask_mismatch", sid, "conversations/annotation",
                          f"{n_regions} {REGION_TOKEN} token(s) but {n_objects} annotated object(s)")
