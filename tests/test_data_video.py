"""data_pipeline.video: official 'v1' sampling, frame picking by index, SigLIP resize."""

import os
import time

import av
import numpy as np
import pytest
from PIL import Image

from data_pipeline import video as V
from data_helpers import frame_level, write_level_video

SHARED_VIDEOS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "videos")
REAL = {"dog_h264_1280x720.mp4": (150, 30000 / 1001), "people_mpeg4_1280x720.mp4": (224, 12.0)}


def _need_real():
    if not os.path.isdir(SHARED_VIDEOS):
        pytest.skip(f"real test videos not found at {os.path.abspath(SHARED_VIDEOS)} (../shared/data/videos)")


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("duration,n,expected", [
    (100, 16, [3, 9, 15, 22, 28, 34, 40, 46, 53, 59, 65, 71, 77, 84, 90, 96]),
    (100, 8, [6, 19, 31, 43, 56, 68, 80, 93]),
    (5, 16, [0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4]),
])
def test_sampling_worked_examples(duration, n, expected):
    assert V.sample_indices_v1(duration, n) == expected


def test_sampling_matches_formula_and_edge_cases():
    for duration in (1, 2, 7, 33, 150, 224, 1001):
        for n in (1, 8, 16, 32):
            seg = float(duration - 1) / n
            ref = [int(np.round((seg * i + seg * (i + 1)) / 2 + 1e-6)) for i in range(n)]
            got = V.sample_indices_v1(duration, n)
            assert got == ref and all(0 <= g < duration for g in got) and got == sorted(got)
    assert V.sample_indices_v1(1, 4) == [0, 0, 0, 0]
    with pytest.raises(ValueError):
        V.sample_indices_v1(0, 16)


# ----------------------------------------------------------------------------- synthetic media


@pytest.mark.parametrize("name,codec,bframes", [
    ("a.mp4", "libx264", 2), ("b.webm", "libvpx-vp9", 0), ("c.mkv", "mpeg4", 1), ("d.gif", "gif", 0),
])
def test_synthetic_videos_pick_frames_by_index(tmp_path, name, codec, bframes):
    n = 30
    path = str(tmp_path / name)
    write_level_video(path, n, codec, bframes=bframes)
    r = V.open_video(path)
    assert r.num_frames == n
    with av.open(path) as c:
        seq = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(seq) == n
    rs = np.random.RandomState(0)
    for trial in range(4):
        idx = sorted(set(rs.randint(0, n, 6).tolist()))
        got = r.get(idx)
        assert sorted(got) == idx
        for i in idx:
            np.testing.assert_array_equal(got[i], seq[i])
            assert frame_level(got[i]) == i
    got = r.get(V.sample_indices_v1(n, 16))
    assert all(frame_level(got[i]) == i for i in got)
    with pytest.raises(V.MediaError) as e:
        r.get([n])
    assert e.value.reason == "unreadable_media"


def test_frame_folder_sorted_and_filtered(tmp_path):
    d = tmp_path / "JPEGImages" / "480p" / "clip"
    d.mkdir(parents=True)
    for i in [3, 0, 11, 1, 2]:
        Image.fromarray(np.full((20, 30, 3), 8 * i, np.uint8)).save(d / f"{i:05d}.jpg", quality=100)
    (d / ".DS_Store").write_bytes(b"junk")
    (d / "notes.txt").write_text("not a frame")
    r = V.open_video(str(d))
    assert isinstance(r, V.FolderReader) and r.num_frames == 5 and r.fps == 3
    got = r.get([0, 4])
    assert frame_level(got[0]) == 0 and frame_level(got[4]) == 11  # 5th name in sorted order is 00011.jpg
    assert got[0].shape == (20, 30, 3) and got[0].dtype == np.uint8


def test_missing_and_unreadable(tmp_path):
    with pytest.raises(V.MediaError) as e:
        V.open_video(str(tmp_path / "nope.mp4"))
    assert e.value.reason == "media_not_found"
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 1000)
    with pytest.raises(V.MediaError) as e:
        V.open_video(str(bad))
    assert e.value.reason == "unreadable_media"
    with pytest.raises(V.MediaError) as e:
        V.read_image(str(bad))
    assert e.value.reason == "unreadable_media"


# ----------------------------------------------------------------------------- real videos


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_videos_decode_and_sampling(name):
    _need_real()
    path = os.path.join(SHARED_VIDEOS, name)
    n, fps = REAL[name]
    r = V.open_video(path)
    assert r.num_frames == n and abs(r.fps - fps) < 1e-6
    t0 = time.perf_counter()
    with av.open(path) as c:
        seq = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    t_seq = time.perf_counter() - t0
    assert len(seq) == n
    want = sorted(set(V.sample_indices_v1(n, 16)) | {1, n // 2 + 1, n - 1})
    t0 = time.perf_counter()
    got = r.get(want)
    t_get = time.perf_counter() - t0
    for i in want:
        np.testing.assert_array_equal(got[i], seq[i])
    print(f"\n{name}: {n} frames, full decode+rgb {t_seq:.2f}s, {len(want)} picked frames {t_get:.2f}s")


def test_real_videos_match_decord():
    """Optional: the official reader (decord) gives the same pixels (run where decord is installed)."""
    _need_real()
    decord = pytest.importorskip("decord")
    for name in sorted(REAL):
        path = os.path.join(SHARED_VIDEOS, name)
        vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        idx = V.sample_indices_v1(len(vr), 8)
        ref = vr.get_batch(idx).asnumpy()
        got = V.open_video(path).get(idx)
        diff = np.abs(np.stack([got[i] for i in idx]).astype(int) - ref)
        print(f"\n{name}: decord len {len(vr)}, max |diff| {diff.max()}, pixels differing {(diff > 0).mean():.2e}")
        # h264 is bit-exact; MPEG-4 part 2 differs on a few pixels by <= 2 (the FFmpeg builds' IDCTs)
        assert len(vr) == REAL[name][0] and diff.max() <= 2 and (diff > 0).mean() < 1e-4


# ----------------------------------------------------------------------------- resize


@pytest.mark.parametrize("aspect", ["square", "pad"])
@pytest.mark.parametrize("hw", [(72, 128), (130, 50), (40, 40)])
def test_resize_matches_siglip_processor(aspect, hw):
    transformers = pytest.importorskip("transformers")
    try:
        from transformers import SiglipImageProcessorPil as Proc
    except ImportError:
        Proc = transformers.SiglipImageProcessor
    proc = Proc(size={"height": 96, "width": 96}, resample=3, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    x = (np.random.RandomState(hw[0]).rand(*hw, 3) * 255).astype(np.uint8)
    img = Image.fromarray(x)
    if aspect == "pad":  # the official expand2square on PIL
        w, h = img.size
        side = max(w, h)
        canvas = Image.new(img.mode, (side, side), (127, 127, 127))
        canvas.paste(img, ((side - w) // 2, (side - h) // 2))
        img = canvas
    ref = proc.preprocess([img], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ours = V.resize_frame(x, 96, aspect)
    assert ours.shape == (96, 96, 3) and ours.dtype == np.uint8
    norm = ((ours.astype(np.float64) * (1 / 255)).astype(np.float32) - 0.5) / 0.5
    err = np.abs(norm - ref).max()
    print(f"\n{aspect} {hw}: max |ours - SiglipImageProcessor| = {err}")
    assert err == 0.0
    assert V.resize_frame(x, 0, "square") is x


def test_image_codecs():
    x = (np.random.RandomState(0).rand(40, 60, 3) * 255).astype(np.uint8)
    np.testing.assert_array_equal(V.decode_image(V.encode_image(x, "png")), x)
    smooth = np.asarray(Image.fromarray(x).resize((15, 10)).resize((60, 40), Image.BICUBIC))
    y = V.decode_image(V.encode_image(smooth, "jpeg", 95))
    assert y.shape == x.shape and np.abs(y.astype(int) - smooth).mean() < 3


def test_raw_frames_are_lossless_and_checked():
    x = (np.random.RandomState(1).rand(40, 60, 3) * 255).astype(np.uint8)
    b = V.encode_image(x, "raw")
    assert len(b) == len(V.RAW_MAGIC) + 8 + x.size
    np.testing.assert_array_equal(V.decode_image(b), x)
    with pytest.raises(ValueError, match="needs 7200 bytes"):
        V.decode_image(b[:-1])
    with pytest.raises(ValueError, match="image_format"):
        V.encode_image(x, "webp")


def _faststart_video(path, n=20):
    """An mp4 with its index (moov) before the data, frame i a flat grey of level 8*i."""
    with av.open(str(path), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.codec_context.gop_size = 4
        for i in range(n):
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 8 * i, np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_truncated_video_is_refused_not_shortened(tmp_path):
    whole = tmp_path / "whole.mp4"
    _faststart_video(whole)
    r = V.open_video(str(whole))
    assert r.num_frames == 20 and frame_level(r.get([19])[19]) == 19
    with av.open(str(whole)) as c:
        ends = [p.pos + p.size for p in c.demux(video=0) if p.size > 0]
    data = whole.read_bytes()
    # Cut in half, and cut cleanly after packet 11: the index still declares 20 frames and the
    # surviving packets decode, so before the check this read as a whole 12-frame video.
    for name, cut in (("half.mp4", len(data) // 2), ("clean.mp4", ends[11])):
        (tmp_path / name).write_bytes(data[:cut])
        with pytest.raises(V.MediaError) as e:
            V.open_video(str(tmp_path / name))
        assert e.value.reason == "truncated_media" and "of the 20 frames" in e.value.message, str(e.value)
