"""Segmentations (COCO RLE / polygon / null) -> validated form, compressed RLE and boolean masks.

Formats accepted in an annotation's `segmentation` (reference §4.1; the official `annToMask`):

* compressed RLE  `{"size": [h, w], "counts": "<COCO string>"}` (str or bytes)
* uncompressed RLE `{"size": [h, w], "counts": [n0, n1, ...]}` (column-major run lengths, zeros first)
* polygons        `[[x0, y0, x1, y1, ...], ...]` (merged into one mask; size from the sample's
                  `height`/`width`, or the frame's size when the sample has none)
* null            an all-zero mask of the frame's size

`parse_segmentation` checks structure and run totals up front, because pycocotools does not: a
compressed RLE whose runs sum to less than h*w decodes into uninitialised memory, an empty counts
string into an all-zero mask, and uncompressed counts that are short are silently zero-padded.
Storage is always compressed RLE at the original resolution (`to_compressed`); decoding gives
`[H, W] bool` (`decode_rle`, `decode_segmentation`). The loader and the predictor bring masks to
the vision grid with `pad_mask_to_square` ('pad' checkpoints) and `grid_masks`.
"""

from __future__ import annotations

import dataclasses
from numbers import Real
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from vrefer_jax.numerics import bilinear_weights

KINDS = ("rle", "uncompressed_rle", "polygon", "null")

# Polygon coordinates are bounded before pycocotools sees them: its rasteriser (`rleFrPoly`) scales
# them by 5 into C ints and allocates one entry per upsampled edge pixel, so coordinates near 1e9
# overflow and segfault, and ~1e7 ones take gigabytes. Any coordinate beyond MAX_POLYGON_COORD is
# refused at parse time (no frame needed); against the frame, a vertex may lie at most one frame
# size outside it (x in [-W, 2W], y in [-H, 2H]): annotation tools clip polygons at or near the
# border, so anything further is a unit or scale error, not a shape.
MAX_POLYGON_COORD = 1 << 16


class MaskFormatError(ValueError):
    """A malformed segmentation: `reason` (a schema reason code), `subfield` (path below
    `segmentation`, e.g. ".counts") and `message`."""

    def __init__(self, reason: str, subfield: str, message: str):
        self.reason, self.subfield, self.message = reason, subfield, message
        super().__init__(f"[{reason}] segmentation{subfield}: {message}")


@dataclasses.dataclass(frozen=True)
class Segmentation:
    """A validated segmentation. `size` is (h, w) for the RLE kinds (they carry it), else None."""

    kind: str
    size: tuple[int, int] | None = None
    counts: bytes | tuple[int, ...] | None = None
    polygons: tuple[tuple[float, ...], ...] | None = None


# ----------------------------------------------------------------------------- validation


def rle_string_counts(s: bytes) -> np.ndarray:
    """Run lengths [n] int64 of a COCO compressed RLE string (pycocotools' `rleFrString`).

    Each count is a little-endian base-32 varint of 6-bit characters offset by 48 (bit 0x20 =
    continue, bit 0x10 of the last character = sign); counts from the third on are stored as the
    difference to the count two places back. Raises ValueError on malformed input.
    """
    c = np.frombuffer(s, np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros((0,), np.int64)
    if (c < 0).any() or (c > 63).any():
        raise ValueError("character outside the RLE alphabet ('0'..'o')")
    more = (c & 0x20) != 0
    if more[-1]:
        raise ValueError("truncated: the last count is unterminated")
    ends = ~more
    gid = np.concatenate([[0], np.cumsum(ends)[:-1]])  # count number of each character
    starts = np.flatnonzero(np.concatenate([[True], ends[:-1]]))
    k = np.arange(c.size) - starts[gid]  # character position within its count
    if k.max() > 11:
        raise ValueError("a count is longer than 12 characters")
    vals = np.zeros(int(ends.sum()), np.int64)
    np.add.at(vals, gid, (c & 0x1F) << (5 * k))
    neg = (c[ends] & 0x10) != 0
    vals[neg] |= np.left_shift(np.int64(-1), 5 * (k[ends][neg] + 1))
    out = vals.copy()
    out[1::2] = np.cumsum(vals[1::2])  # x[m] += x[m-2] for m > 2
    out[2::2] = np.cumsum(vals[2::2])
    return out


def _check_size(size: Any) -> tuple[int, int]:
    ok = (isinstance(size, (list, tuple)) and len(size) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size))
    if not ok:
        raise MaskFormatError("bad_segmentation", ".size", f"expected [height, width] positive integers, got {size!r}")
    return int(size[0]), int(size[1])


def _check_runs(runs: np.ndarray, h: int, w: int, what: str) -> None:
    if (runs < 0).any():
        raise MaskFormatError("bad_segmentation", ".counts", f"{what} has a negative run length")
    total = int(runs.sum())
    if total != h * w:
        raise MaskFormatError("bad_segmentation", ".counts",
                              f"{what} covers {total} pixels but size {h}x{w} has {h * w}")


def parse_segmentation(seg: Any) -> Segmentation:
    """Validate one `segmentation` value. Raises `MaskFormatError` (reason `bad_segmentation` or
    `empty_rle`)."""
    if seg is None:
        return Segmentation("null")
    if isinstance(seg, list):
        if not seg:
            raise MaskFormatError("bad_segmentation", "", "empty polygon list")
        polys = []
        for i, poly in enumerate(seg):
            if not isinstance(poly, list) or not all(isinstance(v, Real) and not isinstance(v, bool) for v in poly):
                raise MaskFormatError("bad_segmentation", f"[{i}]", "a polygon must be a flat list of numbers")
            # pycocotools reads a 4-number first "polygon" as a box; odd lengths are not polygons.
            if len(poly) < 6 or len(poly) % 2:
                raise MaskFormatError("bad_segmentation", f"[{i}]",
                                      f"a polygon needs an even number >= 6 of coordinates, got {len(poly)}")
            try:  # an int too big for a float (e.g. 10**400) is as unusable as inf
                coords = tuple(float(v) for v in poly)
            except OverflowError:
                coords = (np.inf,)
            if not all(np.isfinite(coords)):
                raise MaskFormatError("bad_segmentation", f"[{i}]", "non-finite coordinate")
            big = max(abs(v) for v in coords)
            if big > MAX_POLYGON_COORD:
                raise MaskFormatError("polygon_out_of_bounds", f"[{i}]",
                                      f"coordinate {big:g} beyond +-{MAX_POLYGON_COORD} pixels")
            polys.append(coords)
        return Segmentation("polygon", polygons=tuple(polys))
    if isinstance(seg, dict):
        if "counts" not in seg or "size" not in seg:
            raise MaskFormatError("bad_segmentation", "", "an RLE needs both `counts` and `size`")
        h, w = _check_size(seg["size"])
        counts = seg["counts"]
        if isinstance(counts, (str, bytes)):
            try:  # never "replace": '?' is itself an RLE character, so that would change the mask
                raw = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
            except UnicodeEncodeError as e:
                raise MaskFormatError("bad_segmentation", ".counts",
                                      f"non-ASCII character {counts[e.start]!r} at position {e.start} "
                                      "of a compressed RLE string") from None
            if not raw:
                raise MaskFormatError("empty_rle", ".counts", "compressed RLE with empty counts")
            try:
                runs = rle_string_counts(raw)
            except ValueError as e:
                raise MaskFormatError("bad_segmentation", ".counts", f"malformed compressed RLE: {e}") from None
            _check_runs(runs, h, w, "compressed RLE")
            return Segmentation("rle", (h, w), raw)
        if isinstance(counts, list):
            if not counts:
                raise MaskFormatError("empty_rle", ".counts", "uncompressed RLE with an empty counts list")
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in counts):
                raise MaskFormatError("bad_segmentation", ".counts", "uncompressed RLE counts must be integers")
            _check_runs(np.asarray(counts, np.int64), h, w, "uncompressed RLE")
            return Segmentation("uncompressed_rle", (h, w), tuple(counts))
        raise MaskFormatError("bad_segmentation", ".counts",
                              f"counts must be a string or a list, got {type(counts).__name__}")
    raise MaskFormatError("bad_segmentation", "",
                          f"expected an RLE object, a polygon list or null, got {type(seg).__name__}")


# ----------------------------------------------------------------------------- conversion


def segmentation_size(seg: Segmentation, height: int, width: int) -> tuple[int, int]:
    """The (h, w) the decoded mask will have: its own for RLE, else (height, width)."""
    return seg.size if seg.size is not None else (height, width)


def encode_mask(mask: np.ndarray) -> bytes:
    """[H, W] bool/uint8 mask -> COCO compressed RLE counts."""
    m = np.asfortranarray(np.asarray(mask, dtype=np.uint8)[:, :, None])
    return mask_utils.encode(m)[0]["counts"]


def check_polygon_bounds(seg: Segmentation, height: int, width: int) -> None:
    """Raise `MaskFormatError` ("polygon_out_of_bounds") if a vertex lies more than one frame size
    outside a `height` x `width` frame (see MAX_POLYGON_COORD)."""
    for i, poly in enumerate(seg.polygons or ()):
        xy = np.asarray(poly, np.float64).reshape(-1, 2)
        bad = ~((xy[:, 0] >= -width) & (xy[:, 0] <= 2 * width) & (xy[:, 1] >= -height) & (xy[:, 1] <= 2 * height))
        if bad.any():
            x, y = xy[np.argmax(bad)]
            raise MaskFormatError("polygon_out_of_bounds", f"[{i}]",
                                  f"vertex ({x:g}, {y:g}) is more than one frame size outside the "
                                  f"{height}x{width} frame (x must be in [{-width}, {2 * width}], "
                                  f"y in [{-height}, {2 * height}])")


def to_compressed(seg: Segmentation, height: int, width: int) -> tuple[bytes, tuple[int, int]]:
    """Compressed RLE counts and (h, w) of a segmentation, as the official `annToMask` would decode
    it with `annToMask(seg, height, width)` (polygons and null use (height, width))."""
    if seg.kind == "rle":
        return seg.counts, seg.size
    if seg.kind == "uncompressed_rle":
        h, w = seg.size
        return mask_utils.frPyObjects({"size": [h, w], "counts": list(seg.counts)}, h, w)["counts"], (h, w)
    if seg.kind == "polygon":
        check_polygon_bounds(seg, height, width)
        rles = mask_utils.frPyObjects([list(p) for p in seg.polygons], height, width)
        return mask_utils.merge(rles)["counts"], (height, width)
    if seg.kind == "null":
        return encode_mask(np.zeros((height, width), np.uint8)), (height, width)
    raise ValueError(f"unknown segmentation kind {seg.kind!r}")


def decode_rle(counts: bytes | str, height: int, width: int) -> np.ndarray:
    """Compressed RLE -> [height, width] bool."""
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return mask_utils.decode({"size": [height, width], "counts": counts}).astype(bool)


def decode_segmentation(seg: Segmentation | Any, height: int, width: int) -> np.ndarray:
    """Any segmentation (validated or raw JSON value) -> [H, W] bool."""
    if not isinstance(seg, Segmentation):
        seg = parse_segmentation(seg)
    counts, (h, w) = to_compressed(seg, height, width)
    return decode_rle(counts, h, w)


# ----------------------------------------------------------------------------- to the vision grid


def pad_mask_to_square(m: np.ndarray) -> np.ndarray:
    """[..., H, W] -> [..., s, s] zero padded like `expand2square` (offset (long - short) // 2)."""
    h, w = m.shape[-2:]
    if h == w:
        return m
    s = max(h, w)
    out = np.zeros(m.shape[:-2] + (s, s), m.dtype)
    top, left = (s - h) // 2, (s - w) // 2
    out[..., top:top + h, left:left + w] = m
    return out


def _support(in_len: int, out_len: int) -> np.ndarray:
    """[out_len, 2] input indices with non-zero bilinear weight (a repeated index where only one)."""
    w = bilinear_weights(in_len, out_len) > 0
    first = np.argmax(w, axis=1)
    last = in_len - 1 - np.argmax(w[:, ::-1], axis=1)
    return np.stack([first, last], axis=1)


def grid_masks(m: np.ndarray, g: int) -> np.ndarray:
    """bool [..., H, W] -> bool [..., g, g], exactly `resize_masks_np(m, g, g) > 0`.

    The bilinear weights are non-negative and each output cell has at most 2x2 input pixels of
    non-zero weight, so the resized value is > 0 iff one of those pixels is set (a sum of positive
    fp32 terms never rounds to 0): a gather of 2 rows and 2 columns per cell instead of two dense
    matmuls over the full-resolution mask (~50x faster at 720x1280).
    """
    h, w = m.shape[-2:]
    rows, cols = _support(h, g), _support(w, g)
    r = m[..., rows, :].any(axis=-2)  # [..., g, W]
    return r[..., cols].any(axis=-1)  # [..., g, g]
