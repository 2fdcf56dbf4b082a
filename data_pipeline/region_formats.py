"""Region-level benchmark files (VRVL3's image / video region scripts) -> `schema.Sample`.

One reader per file format (reference_vl3 §13; the official `infer_*.py` scripts name the fields):

* Osprey category JSON (LVIS `lvis_val_1k_category.json`, PACO `paco_val_1k_category.json`): a list
  of images `{file_name, height, width, categories: [name], annotations: [{segmentation}],
  region_num?}`; every (image, category j) pair is one item, its mask `annotations[j]` (polygons or
  RLE). Item ids `"<entry>.<j>"`; an entry that is not usable as a whole is one error row `"<entry>"`.
* VG (`vg_val_5000.json`): `{image: [path] | path, height, width, caption, boxes: [[x, y, w, h]]}`,
  the first box.
* Ref-L4 (`ref-l4-val.json`, JSON Lines despite the name; a JSON list is read too): `{file_name,
  height, width, caption, bbox: [x, y, w, h]}`; the official script keeps only the Objects365 split
  (`"objects365" in file_name`), so does `subset="objects365"` (the default).
* HC-STVG: `{video, frame_idx, mask: RLE, caption}`, one mask on frame `frame_idx`.
* DLC-Bench (`annotations.json`, COCO format): every annotation of every image, images in file order
  and each image's annotations in file order (as `COCO.getAnnIds`); item id = `str(annotation id)`,
  the key of DLC-Bench's `qa.json` / `class_names.json`.

Boxes -> masks (`box_mask`): the official scripts fill `mask[y : y + h, x : x + w]` of a zero
`height x width` array after `int()` on each coordinate (Ref-L4 also clamps the starts at 0; VG's
negative starts would wrap around in numpy, we clamp them too). The box mask is stored as a
compressed RLE at the image size, so it goes through the same mask path as any other region. The
official scripts pass these box masks as float64 tensors, which makes VRVL3's region-token count
(from a soft bilinear resize) disagree with the pooled cells for small boxes and silently break the
splice (reference_vl3 §8.3); our VRVL3 host binarises every mask and counts the region tokens from
the binarised grid, so that failure cannot happen here. A box that is empty after clipping gives
an empty mask, which the VRVL3 host replaces by the whole image with a warning, as the official does.

Each sample's conversation is the official prompt as one human turn (`<image>\\n` + prompt, the tag
the official `mm_infer` prepends; HC-STVG's prompt carries its own `<video>\\n`) and the ground truth
as the gpt turn; scoring fields go to `extra`. Bad entries raise `schema.SampleError` with a named
reason (`bad_benchmark_entry`, `bad_box`, `bad_size`, `bad_segmentation`, ...); the evaluation
runner turns them into error rows.

Protocols (`bench_formats.PROTOCOLS`): "vl3" writes `<region>` as the VRVL3 scripts do (its region
expansion adds the brackets); "videorefer" writes `[<region>]` as VideoRefer-7B's scripts do for
Bench-Q (no official VideoRefer-7B script exists for these benchmarks).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from numbers import Real
from typing import Any

import numpy as np

from data_pipeline import bench_formats, inputs, masks as masks_lib, schema

LVIS_PROMPT = "What is the category of <region>? Using only one word or phrase."
PACO_PROMPT = ("What is the category of <region>? It maybe a subpart of an object. If it is a subpart, output in "
               "the format of 'category:subcategory', else just output the category.")
VG_PROMPT = "Please describe <region> briefly."
REFL4_PROMPT = "Please describe <region> in brief."
DLC_PROMPT = "Please describe the region <region> in the image in detail. Do not describe anything else."
HCSTVG_PROMPT = ("Please describe the important aspects of the marked object <region> in the video. "
                 "Output in one sentense.")  # sic, as the official script
CATEGORY_PROMPTS = {"lvis": LVIS_PROMPT, "paco": PACO_PROMPT}
REFL4_SUBSETS = ("objects365", "all")


def region_prompt(prompt: str, protocol: str) -> str:
    bench_formats._check_protocol(protocol)
    return prompt.replace("<region>", "[<region>]") if protocol == "videorefer" else prompt


# ----------------------------------------------------------------------------- field checks


def _entry(raw: Any, index: int, sid: str | None = None) -> tuple[Mapping, str]:
    if not isinstance(raw, Mapping):
        if isinstance(raw, schema.BadLine):
            raise schema.SampleError("bad_json_line", f"#{index}", f"line {raw.line}", raw.message)
        raise schema.SampleError("bad_sample", sid or f"#{index}", "<sample>",
                                 f"expected a JSON object, got {type(raw).__name__}")
    return raw, sid or schema.sample_id(raw, index)


def _str(raw: Mapping, key: str, sid: str) -> str:
    v = raw.get(key)
    if not isinstance(v, str) or not v.strip():
        raise schema.SampleError("bad_benchmark_entry", sid, key, f"expected a non-empty string, got {v!r}")
    return v


def _size(raw: Mapping, sid: str) -> tuple[int, int]:
    h, w = raw.get("height"), raw.get("width")
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (h, w))
    if not ok:
        raise schema.SampleError("bad_size", sid, "height/width",
                                 f"expected two positive integers, got height={h!r}, width={w!r}")
    return h, w


def _box(value: Any, sid: str, field: str) -> tuple[int, int, int, int]:
    """[x, y, w, h] finite numbers -> ints by `int()` (truncation toward zero), as the official."""
    ok = (isinstance(value, (list, tuple)) and len(value) == 4
          and all(isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) for v in value))
    if not ok:
        raise schema.SampleError("bad_box", sid, field, f"expected [x, y, width, height] finite numbers, got {value!r}")
    return tuple(int(v) for v in value)  # type: ignore[return-value]


def box_mask(box: Sequence[int], height: int, width: int) -> np.ndarray:
    """[height, width] bool mask of an `[x, y, w, h]` box: rows `max(0, y) : y + h`, columns
    `max(0, x) : x + w` (numpy slicing clips the ends), as the official Ref-L4 script."""
    x, y, w, h = (int(v) for v in box)
    m = np.zeros((height, width), bool)
    m[max(0, y): max(0, y + h), max(0, x): max(0, x + w)] = True
    return m


def box_rle(box: Sequence[int], height: int, width: int) -> dict[str, Any]:
    """The box mask as a compressed COCO RLE `{"size", "counts"}` (JSON-ready)."""
    return {"size": [height, width], "counts": masks_lib.encode_mask(box_mask(box, height, width)).decode("ascii")}


def _sample(sid: str, index: int, modality: str, media: str, prompt: str, answer: str, segmentation: Any,
            frame: int = 0, height: int | None = None, width: int | None = None,
            extra: Mapping[str, Any] | None = None) -> schema.Sample:
    tag = schema.MODAL_TOKENS[modality]
    train_form = {"id": sid, modality: media,
                  "conversations": [{"from": "human", "value": f"{tag}\n{prompt}"},
                                    {"from": "gpt", "value": answer}],
                  "annotation": [{str(frame): {"segmentation": segmentation}}]}
    if height is not None:
        train_form.update(height=height, width=width)
    return schema.parse_sample(train_form, index, extra={"prompt": prompt, **(extra or {})})


# ----------------------------------------------------------------------------- LVIS / PACO


Item = schema.Sample | schema.SampleError


def parse_category_file(entries: Sequence[Any], benchmark: str, protocol: str = "vl3") -> list[Item]:
    """Osprey category JSON entries -> one item per (image, category), in file order; an entry that
    cannot be split into items is one `SampleError` (id `"<entry index>"`)."""
    if benchmark not in CATEGORY_PROMPTS:
        raise ValueError(f"benchmark must be one of {sorted(CATEGORY_PROMPTS)}, got {benchmark!r}")
    prompt = region_prompt(CATEGORY_PROMPTS[benchmark], protocol)
    out: list[Item] = []
    n_items = 0
    for i, raw in enumerate(entries):
        eid = str(i)
        try:
            raw, _ = _entry(raw, i, eid)
            image = _str(raw, "file_name", eid)
            h, w = _size(raw, eid)
            cats, anns = raw.get("categories"), raw.get("annotations")
            if not isinstance(cats, list) or not cats:
                raise schema.SampleError("bad_benchmark_entry", eid, "categories", "expected a non-empty list")
            if not isinstance(anns, list):
                raise schema.SampleError("bad_benchmark_entry", eid, "annotations", "expected a list")
        except schema.SampleError as e:
            out.append(e)
            continue
        region_num = raw.get("region_num")
        for j, cat in enumerate(cats):
            sid = f"{i}.{j}"
            try:
                if not isinstance(cat, str) or not cat.strip():
                    raise schema.SampleError("bad_benchmark_entry", sid, f"categories[{j}]",
                                             f"expected a non-empty string, got {cat!r}")
                if j >= len(anns) or not isinstance(anns[j], Mapping) or "segmentation" not in anns[j]:
                    raise schema.SampleError("missing_segmentation", sid, f"annotations[{j}].segmentation",
                                             f"category {j} has no annotation with a segmentation")
                rn = region_num[j] if isinstance(region_num, list) and j < len(region_num) else 0
                out.append(_sample(sid, n_items, "image", image, prompt, cat, anns[j]["segmentation"],
                                   height=h, width=w,
                                   extra={"benchmark": benchmark, "answer": cat, "image": image, "region_num": rn}))
            except schema.SampleError as e:
                out.append(e)
            n_items += 1
    return out


# ----------------------------------------------------------------------------- VG / Ref-L4


def parse_vg(raw: Any, index: int, protocol: str = "vl3") -> schema.Sample:
    """One `vg_val_5000.json` entry -> Sample (first image path, first box)."""
    raw, sid = _entry(raw, index)
    image = raw.get("image")
    if isinstance(image, list):
        image = image[0] if image else None
    if not isinstance(image, str) or not image.strip():
        raise schema.SampleError("bad_media", sid, "image",
                                 f"expected a path or a list of paths, got {raw.get('image')!r}")
    h, w = _size(raw, sid)
    caption = _str(raw, "caption", sid)
    boxes = raw.get("boxes")
    if not isinstance(boxes, list) or not boxes:
        raise schema.SampleError("bad_box", sid, "boxes", f"expected a non-empty list of boxes, got {boxes!r}")
    box = _box(boxes[0], sid, "boxes[0]")
    return _sample(sid, index, "image", image, region_prompt(VG_PROMPT, protocol), caption, box_rle(box, h, w),
                   height=h, width=w, extra={"benchmark": "vg", "answer": caption, "image": image, "box": list(box)})


def parse_refl4(raw: Any, index: int, protocol: str = "vl3") -> schema.Sample:
    """One Ref-L4 entry -> Sample (the `bbox` box)."""
    raw, sid = _entry(raw, index)
    image = _str(raw, "file_name", sid)
    h, w = _size(raw, sid)
    caption = raw.get("caption")
    refs = caption if isinstance(caption, list) else [caption]
    if not refs or not all(isinstance(c, str) and c.strip() for c in refs):
        raise schema.SampleError("bad_benchmark_entry", sid, "caption",
                                 f"expected a non-empty string or list of strings, got {caption!r}")
    box = _box(raw.get("bbox"), sid, "bbox")
    return _sample(sid, index, "image", image, region_prompt(REFL4_PROMPT, protocol), refs[0], box_rle(box, h, w),
                   height=h, width=w, extra={"benchmark": "refl4", "answer": caption, "image": image, "box": list(box)})


def refl4_selected(raw: Any, subset: str) -> bool:
    """Whether an entry belongs to the evaluated split (`subset` "objects365": the official filter
    on `file_name`; "all": every entry). Unreadable entries are kept (they become error rows)."""
    if subset not in REFL4_SUBSETS:
        raise ValueError(f"subset must be one of {REFL4_SUBSETS}, got {subset!r}")
    if subset == "all" or not isinstance(raw, Mapping) or not isinstance(raw.get("file_name"), str):
        return True
    return "objects365" in raw["file_name"]


def load_json_or_lines(path: str) -> list:
    """A JSON list, or JSON Lines (whatever the extension: the official Ref-L4 file is `.json` with
    one object per line); unreadable lines become `schema.BadLine`."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return inputs._load_jsonl(path)
    if isinstance(data, list):
        return data
    if isinstance(data, Mapping):
        return [data]  # a one-line JSON Lines file
    raise inputs.InputError(f"{path}: expected a JSON list or JSON Lines of objects, got {type(data).__name__}")


# ----------------------------------------------------------------------------- HC-STVG


def parse_hcstvg(raw: Any, index: int, protocol: str = "vl3") -> schema.Sample:
    """One HC-STVG entry -> a video Sample with the mask on frame `frame_idx`."""
    raw, sid = _entry(raw, index)
    video = raw.get("video")
    if not isinstance(video, str) or not video.strip():
        raise schema.SampleError("bad_media", sid, "video", f"expected a non-empty path, got {video!r}")
    frame = bench_formats._frame_idx(raw, sid)
    caption = _str(raw, "caption", sid)
    if "mask" not in raw:
        raise schema.SampleError("missing_segmentation", sid, "mask", "the entry has no `mask`")
    return _sample(sid, index, "video", video, region_prompt(HCSTVG_PROMPT, protocol), caption, raw["mask"],
                   frame=int(frame), extra={"benchmark": "hcstvg", "answer": caption, "frame_idx": int(frame)})


# ----------------------------------------------------------------------------- DLC-Bench


def parse_dlc(coco: Any, protocol: str = "vl3") -> list[Item]:
    """DLC-Bench `annotations.json` (COCO) -> one item per annotation (see the module docstring).
    An annotation whose `image_id` names no image is an error row (COCO's index would skip it)."""
    prompt = region_prompt(DLC_PROMPT, protocol)
    if not isinstance(coco, Mapping) or not isinstance(coco.get("images"), list) \
            or not isinstance(coco.get("annotations"), list):
        raise inputs.InputError("DLC-Bench annotations: expected a COCO object with `images` and `annotations` lists")
    images: dict[Any, Mapping] = {}
    order: list[Any] = []
    bad_images: list[schema.SampleError] = []
    for i, img in enumerate(coco["images"]):
        if not isinstance(img, Mapping) or "id" not in img:
            bad_images.append(schema.SampleError("bad_benchmark_entry", f"image#{i}", "images",
                                                 "an image needs an `id`"))
            continue
        if img["id"] not in images:
            order.append(img["id"])
        images[img["id"]] = img  # COCO's index keeps the last one with an id
    per_image: dict[Any, list[tuple[int, Any]]] = {k: [] for k in order}
    out: list[Item] = list(bad_images)
    seen: dict[str, int] = {}
    for a, ann in enumerate(coco["annotations"]):
        aid = str(ann["id"]) if isinstance(ann, Mapping) and ann.get("id") is not None else f"ann#{a}"
        if not isinstance(ann, Mapping) or ann.get("id") is None:
            out.append(schema.SampleError("bad_benchmark_entry", aid, "annotations", "an annotation needs an `id`"))
        elif aid in seen:  # predictions are keyed by the annotation id: the later one is an error row
            out.append(schema.SampleError("duplicate_id", f"ann#{a}", "id",
                                          f"annotation id {aid} is already used by annotation #{seen[aid]}"))
        elif ann.get("image_id") not in per_image:
            out.append(schema.SampleError("bad_benchmark_entry", aid, "image_id",
                                          f"no image with id {ann.get('image_id')!r}"))
        else:
            seen[aid] = a
            per_image[ann["image_id"]].append((a, ann))
    n = 0
    for img_id in order:
        img = images[img_id]
        for a, ann in per_image[img_id]:
            sid = str(ann["id"])
            try:
                image = _str(img, "file_name", sid)
                h, w = _size(img, sid)
                if "segmentation" not in ann:
                    raise schema.SampleError("missing_segmentation", sid, "segmentation", "the annotation has none")
                out.append(_sample(sid, n, "image", image, prompt, "", ann["segmentation"], height=h, width=w,
                                   extra={"benchmark": "dlc", "image": image, "category_id": ann.get("category_id")}))
            except schema.SampleError as e:
                out.append(e)
            n += 1
    return out


def parse_all(entries: Sequence[Any], parse: Callable[[Any, int], schema.Sample]) -> list[Item]:
    """`parse` on every entry behind the whole-input checks (a bad JSON line is a `bad_json_line`
    error row; a repeated id a `duplicate_id` one, known by its position `#<index>` since
    predictions are keyed by id); errors stay in their entry's place."""
    checked = schema.CheckedParse.over(parse, entries)
    out: list[Item] = []
    for i, raw in enumerate(entries):
        try:
            out.append(checked(raw, i))
        except schema.SampleError as e:
            if e.reason == "duplicate_id":
                e = schema.SampleError("duplicate_id", f"#{i}", "id", e.message)
            out.append(e)
    return out
