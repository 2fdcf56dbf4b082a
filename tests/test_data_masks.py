"""data_pipeline.masks: RLE / polygon / null decoding against pycocotools, validation, storage form."""

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from data_pipeline import masks as M


def _random_mask(rs, h, w):
    m = np.zeros((h, w), np.uint8)
    for _ in range(rs.randint(1, 4)):
        y, x = rs.randint(0, h), rs.randint(0, w)
        m[y:y + rs.randint(1, h), x:x + rs.randint(1, w)] = 1
    m[rs.rand(h, w) < 0.05] ^= 1
    return m


def _runs(m):
    """Column-major run lengths, zeros first (uncompressed COCO RLE), computed independently."""
    flat = m.flatten(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat[0] == 1 else runs


def _ann_to_mask(seg, h, w):
    """The official `annToMask`, written out here as the reference."""
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, h, w)
    else:
        rle = dict(seg, counts=seg["counts"].encode() if isinstance(seg["counts"], str) else seg["counts"])
    return mask_utils.decode(rle)


def test_compressed_and_uncompressed_rle_decode():
    rs = np.random.RandomState(0)
    for t in range(30):
        h, w = rs.randint(1, 50, 2)
        m = _random_mask(rs, h, w)
        coco = mask_utils.encode(np.asfortranarray(m[:, :, None]))[0]
        for counts in (coco["counts"], coco["counts"].decode()):  # bytes, and str as JSON stores it
            seg = {"size": [int(h), int(w)], "counts": counts}
            got = M.decode_segmentation(seg, 999, 999)  # RLE carries its own size
            assert got.dtype == bool and got.shape == (h, w)
            np.testing.assert_array_equal(got, m.astype(bool))
            np.testing.assert_array_equal(got, _ann_to_mask(seg, h, w).astype(bool))
        runs = _runs(m)
        np.testing.assert_array_equal(M.rle_string_counts(coco["counts"]), runs)
        useg = {"size": [int(h), int(w)], "counts": runs}
        np.testing.assert_array_equal(M.decode_segmentation(useg, h, w), m.astype(bool))
        np.testing.assert_array_equal(_ann_to_mask(useg, h, w), m)
        counts, size = M.to_compressed(M.parse_segmentation(useg), h, w)
        assert size == (h, w) and counts == coco["counts"]  # stored form equals pycocotools' own


def test_polygons_match_pycocotools():
    h, w = 40, 60
    polys = [[5.0, 5.0, 30.5, 6.0, 28.0, 25.0, 7.0, 20.0], [40, 10, 55, 10, 55, 35, 48, 30, 40, 35]]
    ref = _ann_to_mask(polys, h, w).astype(bool)
    got = M.decode_segmentation(polys, h, w)
    assert got.shape == (h, w) and got.sum() > 100
    np.testing.assert_array_equal(got, ref)
    counts, size = M.to_compressed(M.parse_segmentation(polys), h, w)
    assert size == (h, w)
    np.testing.assert_array_equal(M.decode_rle(counts, h, w), ref)


def test_null_is_zeros_of_frame_size():
    seg = M.parse_segmentation(None)
    assert seg.kind == "null" and M.segmentation_size(seg, 7, 9) == (7, 9)
    got = M.decode_segmentation(None, 7, 9)
    assert got.shape == (7, 9) and not got.any()


def test_encode_roundtrip_large():
    rs = np.random.RandomState(1)
    m = _random_mask(rs, 720, 1280).astype(bool)
    counts = M.encode_mask(m)
    np.testing.assert_array_equal(M.decode_rle(counts, 720, 1280), m)
    assert int(M.rle_string_counts(counts).sum()) == 720 * 1280


@pytest.mark.parametrize("seg,reason,sub", [
    ({"size": [4, 5], "counts": ""}, "empty_rle", ".counts"),
    ({"size": [4, 5], "counts": []}, "empty_rle", ".counts"),
    ({"size": [4, 5], "counts": "622"}, "bad_segmentation", ".counts"),  # 10 of 20 pixels
    ({"size": [4, 5], "counts": [6, 2, 2]}, "bad_segmentation", ".counts"),  # pycocotools zero-pads this
    ({"size": [4, 5], "counts": [6, 2, 2, 2, 9]}, "bad_segmentation", ".counts"),
    ({"size": [4, 5], "counts": [6, -2, 16]}, "bad_segmentation", ".counts"),
    ({"size": [4, 5], "counts": "9~~"}, "bad_segmentation", ".counts"),  # outside the alphabet
    ({"size": [4, 5], "counts": "9a"}, "bad_segmentation", ".counts"),  # unterminated varint
    ({"size": [4, 5], "counts": 7}, "bad_segmentation", ".counts"),
    ({"size": [0, 5], "counts": "0"}, "bad_segmentation", ".size"),
    ({"size": [4], "counts": "0"}, "bad_segmentation", ".size"),
    ({"counts": "0"}, "bad_segmentation", ""),
    ([], "bad_segmentation", ""),
    ([[1, 1, 3, 3]], "bad_segmentation", "[0]"),  # pycocotools would read it as a box
    ([[1, 1, 3, 3, 4]], "bad_segmentation", "[0]"),
    ([[1, 1, 3, 3, 4, 4], [1, "a", 3, 3, 4, 4]], "bad_segmentation", "[1]"),
    ([1, 2, 3, 4, 5, 6], "bad_segmentation", "[0]"),
    ("abc", "bad_segmentation", ""),
    ({"size": [4, 5], "counts": "5\u00e9"}, "bad_segmentation", ".counts"),  # was read as "5?": 5+15 px
    ([[1, 1, 3, 3, 4, float("inf")]], "bad_segmentation", "[0]"),
    ([[1, 1, 3, 3, 4, 10 ** 400]], "bad_segmentation", "[0]"),  # no float holds it
    ([[0, 0, 1e9, 0, 1e9, 1e9]], "polygon_out_of_bounds", "[0]"),  # segfaulted pycocotools' rasteriser
    ([[0, 0, 9, 0, 9, 9], [0, 0, -2e7, 0, 5, 5]], "polygon_out_of_bounds", "[1]"),
])
def test_malformed_segmentations(seg, reason, sub):
    with pytest.raises(M.MaskFormatError) as e:
        M.parse_segmentation(seg)
    assert e.value.reason == reason and e.value.subfield == sub, str(e.value)


def test_short_compressed_rle_is_caught_where_pycocotools_is_not():
    seg = {"size": [4, 5], "counts": b"622"}
    mask_utils.decode(seg)  # pycocotools accepts it (and returns uninitialised pixels)
    with pytest.raises(M.MaskFormatError):
        M.parse_segmentation(seg)


def test_non_ascii_rle_string_names_the_character():
    with pytest.raises(M.MaskFormatError, match=r"non-ASCII character 'é' at position 1"):
        M.parse_segmentation({"size": [4, 5], "counts": "5é"})


def test_polygon_bounded_by_frame_before_rasterising():
    h, w = 720, 1280
    edge = [[-w, -h, 2 * w, -h, 2 * w, 2 * h, -w, 2 * h]]  # one frame size outside on every side: allowed
    assert M.decode_segmentation(edge, h, w).all()
    for poly, sub in (([[0, 0, 2 * w + 1, 0, 5, 5]], "[0]"), ([[0, 0, 9, 9, 0, 9], [0, -h - 0.5, 5, 5, 9, 0]], "[1]"),
                      ([[0, 0, 6e4, 0, 6e4, 6e4]], "[0]")):
        seg = M.parse_segmentation(poly)  # within the absolute bound: only the frame can refuse it
        with pytest.raises(M.MaskFormatError) as e:
            M.to_compressed(seg, h, w)
        assert (e.value.reason, e.value.subfield) == ("polygon_out_of_bounds", sub), str(e.value)
        assert f"{h}x{w} frame" in e.value.message
        with pytest.raises(M.MaskFormatError):
            M.decode_segmentation(poly, h, w)


def test_huge_polygon_does_not_crash_the_process():
    """pycocotools segfaults on such a polygon; the check must stop it before (run in a child so a
    regression shows as a failed test, not a dead test runner)."""
    import subprocess
    import sys

    code = ("from data_pipeline import masks as M\n"
            "try:\n    M.decode_segmentation([[0, 0, 1e9, 0, 1e9, 1e9, 0, 1e9]], 720, 1280)\n"
            "except M.MaskFormatError as e:\n    print(e.reason)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "polygon_out_of_bounds", (r.returncode, r.stderr[-500:])
