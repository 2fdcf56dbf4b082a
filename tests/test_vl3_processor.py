"""data_pipeline.vl3: the VRVL3 image processor, fps frame sampling and frame-difference pruning.

References: independent readings of the VRVL3 reference (§4 resize/patches, §5 sampling, §6
merge, §7 pruning) written here; transformers' VideoLLaMA3 image processor (PIL variant); FFmpeg's
own `fps` filter run through PyAV's filter graph; torch for the pruning arithmetic.
"""

import hashlib
import itertools
import os
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline import video as V
from data_pipeline.vl3 import frames as F
from data_pipeline.vl3 import image_processing as IP
from data_pipeline.vl3 import pruning as PR

SHARED_VIDEOS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "videos")
BITS = 9  # frames of the synthetic videos carry their index in 9 black/white stripes of 6 px


# ============================================================================ smart_resize


def ref_smart_resize(h, w, factor, min_pixels, max_pixels):
    """§4.3 read independently (numpy's round is also half-to-even). Returns (size or "error", branch)."""
    branch = []
    if min(h, w) < factor:
        s = factor / min(h, w)
        h, w = int(np.round(s * h)), int(np.round(s * w))
        branch.append("small")
    elif max(h, w) > 200 * min(h, w):  # ratio > 200 (exact for integers)
        return "error", "aspect"
    hb, wb = int(np.round(h / factor)) * factor, int(np.round(w / factor)) * factor
    if hb * wb > max_pixels:
        b = np.sqrt(h * w / max_pixels)
        hb, wb = int(np.floor(h / b / factor)) * factor, int(np.floor(w / b / factor)) * factor
        branch.append("max")
    elif hb * wb < min_pixels:
        b = np.sqrt(min_pixels / (h * w))
        hb, wb = int(np.ceil(h * b / factor)) * factor, int(np.ceil(w * b / factor)) * factor
        branch.append("min")
    if min(hb, wb) == 0:
        return "error", "+".join(branch + ["zero"])
    return (hb, wb), "+".join(branch) or "round"


SIDES = [1, 5, 13, 14, 20, 27, 28, 41, 42, 70, 100, 224, 360, 479, 480, 720, 1080, 2000, 3001, 6000]
BUDGETS = [3136 * 2, 100352, 401408, 1605632, 10 ** 9]


def _grid():
    for factor in (14, 28):
        for h in SIDES:
            for w in SIDES:
                for mp in BUDGETS:
                    yield h, w, factor, 3136, mp


def test_smart_resize_matches_the_reference_on_every_branch():
    seen = {}
    for h, w, factor, lo, hi in _grid():
        want, branch = ref_smart_resize(h, w, factor, lo, hi)
        seen[branch] = seen.get(branch, 0) + 1
        if want == "error":
            with pytest.raises(ValueError, match=f"{h}x{w}"):
                IP.smart_resize(h, w, factor, lo, hi)
            continue
        got = IP.smart_resize(h, w, factor, lo, hi)
        assert got == want, (h, w, factor, hi, branch)
        assert got[0] % factor == 0 and got[1] % factor == 0
        if "max" in branch:
            assert got[0] * got[1] <= hi
    print("\nbranches:", dict(sorted(seen.items())))
    for b in ("round", "max", "min", "small", "small+min", "aspect", "max+zero"):
        assert seen.get(b), f"branch {b} not exercised"


def test_smart_resize_worked_values():
    big = 10 ** 9
    # half-to-even: 42/28 = 1.5 -> 2, 70/28 = 2.5 -> 2 (both 56), 98/28 = 3.5 -> 4
    assert IP.smart_resize(42, 70, 28, 1, big) == (56, 56)
    assert IP.smart_resize(98, 98, 28, 1, big) == (112, 112)
    # the small branch: 10 x 100 at factor 28 -> scale 2.8 -> 28 x 280
    assert IP.smart_resize(10, 100, 28, 3136, big) == (28, 280)
    # §4.4 worked examples
    assert IP.smart_resize(480, 640, 14, 3136, big) == (476, 644)
    assert IP.smart_resize(360, 640, 28, 3136, big) == (364, 644)
    with pytest.raises(ValueError, match=r"28x5656 .*aspect ratio 202"):
        IP.smart_resize(28, 202 * 28, 28, 3136, big)
    assert IP.smart_resize(28, 200 * 28, 28, 3136, big) == (28, 5600)  # 200 itself is allowed
    with pytest.raises(ValueError, match="0 patches"):
        IP.smart_resize(28, 5000, 28, 3136, 3136 * 2)
    with pytest.raises(ValueError, match="height"):
        IP.smart_resize(0, 10, 28, 3136, big)


def test_smart_resize_vs_transformers():
    """Where the two coincide they agree; where they differ, it is on purpose (comment below)."""
    pytest.importorskip("transformers")
    from transformers.models.video_llama_3.image_processing_pil_video_llama_3 import smart_resize as hf

    same = diff = 0
    for h, w, factor, lo, hi in _grid():
        want, branch = ref_smart_resize(h, w, factor, lo, hi)
        if "small" in branch or want == "error":
            continue
        assert IP.smart_resize(h, w, factor, lo, hi) == hf(h, w, factor, lo, hi), (h, w, factor, hi)
        same += 1
    # transformers' copy differs from the official (and from us) in three places:
    # (1) no "side < factor" branch: it rounds the side to 0 patches and then takes the min_pixels
    #     branch; the official first scales the short side up to `factor`;
    assert IP.smart_resize(10, 100, 28, 3136, 10 ** 9) == (28, 280) != hf(10, 100, 28, 3136, 10 ** 9) == (28, 196)
    # (2) its aspect-ratio check also applies to small images (the official checks only the others);
    assert IP.smart_resize(5, 6000, 14, 3136, 10 ** 9) == (14, 16800)
    with pytest.raises(ValueError):
        hf(5, 6000, 14, 3136, 10 ** 9)
    # (3) it keeps at least `factor` per side after the budget floor; the official floors to 0.
    assert hf(28, 5000, 28, 3136, 3136 * 2) == (28, 1036)
    for h, w, factor, lo, hi in _grid():
        if min(h, w) < factor:
            try:
                diff += IP.smart_resize(h, w, factor, lo, hi) != hf(h, w, factor, lo, hi)
            except ValueError:
                diff += 1
    print(f"\nsmart_resize: {same} sizes equal to transformers'; {diff} small-image sizes differ")
    assert same > 1000 and diff > 0


def test_budget_arithmetic():
    # images: mm_max_length patches; frames: mm_max_length / N merged tokens each (x 784 pixels)
    assert IP.budget(8192, 2, 1, 1) == 8192 * 196
    assert IP.budget(8192, 2, 2, 1) == 8192 * 784
    assert IP.budget(8192, 2, 2, 16) == 8192 * 784 // 16
    assert IP.budget(2369, 2, 2, 7) == 1857296 // 7 == 265328  # 9477 // 4 = 2369, the default
    assert IP.budget(100, 1, 1, 3) == 100 * 196 // 3
    for L, m, d, n in [(8192, 2, 1, 3), (10240, 2, 2, 768), (2369, 2, 2, 5), (77, 3, 1, 2), (77, 3, 3, 2)]:
        assert IP.budget(L, m, d, n) == int(int(L * m * m * 196 / (m / d) ** 2) // n)
    with pytest.raises(ValueError, match="num_images"):
        IP.budget(8192, 2, 2, 0)


def test_token_counts_worked_examples():
    """§4.4: a 640x480 image -> 1564 tokens; a 640x360 frame at d = 2 -> 299 before pruning."""
    img = np.random.RandomState(0).randint(0, 256, (480, 640, 3), np.uint8)
    r = IP.process_image(img, max_pixels=IP.budget(8192, 2, 1, 1), downsampling=1)
    assert r.grid == (34, 46) and r.num_tokens == 1564 and r.patches.shape == (1564, 588)
    frame = img[:360]
    r = IP.process_image(frame, max_pixels=IP.budget(8192, 2, 2, 16), downsampling=2)
    assert r.grid == (26, 46) and r.num_tokens == 299 and r.groups.shape == (299, 4)
    # a binding budget: 64 frames of 8192 tokens -> 128 tokens a frame at most
    r = IP.process_image(frame, max_pixels=IP.budget(8192, 2, 2, 64), downsampling=2)
    assert r.num_tokens <= 128 and r.patches.shape[0] * 196 <= IP.budget(8192, 2, 2, 64)
    print(f"\n640x360 frame, 64 frames of 8192 tokens: grid {r.grid}, {r.num_tokens} tokens")


# ============================================================================ patches


def ref_patches(img_chw, p, d):
    """§4.4 read literally: blocks (row, col), then in-block row, col; each patch (C, py, px)."""
    c, h, w = img_chw.shape
    gh, gw = h // p, w // p
    rows, coords = [], []
    for bi in range(gh // d):
        for bj in range(gw // d):
            for r in range(d):
                for cc in range(d):
                    y, x = bi * d + r, bj * d + cc
                    rows.append(img_chw[:, y * p:(y + 1) * p, x * p:(x + 1) * p].reshape(-1))
                    coords.append((y, x))
    return np.stack(rows), np.array(coords)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_patch_order_and_coords(d):
    p, gh, gw = 4, 6, 12
    img = np.random.RandomState(d).rand(gh * p, gw * p, 3).astype(np.float32)
    patches, coords = IP.patchify(img, p, d)
    want, want_coords = ref_patches(img.transpose(2, 0, 1), p, d)
    np.testing.assert_array_equal(patches, want)
    np.testing.assert_array_equal(coords, want_coords)
    groups = IP.merge_groups(gh, gw, d)
    assert groups.shape == (gh * gw // d ** 2, d * d)
    # token v = (merged row, merged col) in raster order owns the patches of that d x d block
    for v, g in enumerate(groups):
        mr, mc = divmod(v, gw // d)
        assert sorted(map(tuple, coords[g])) == [(mr * d + r, mc * d + c) for r in range(d) for c in range(d)]
    with pytest.raises(ValueError, match="merge blocks"):
        IP.patchify(np.zeros((4 * 5, 4 * 4, 3), np.float32), 4, 2)


def test_groups_mean_is_the_official_bilinear_downsampling():
    """§6: un-block to raster, bilinear resize to (gh/2, gw/2) (align_corners False) == mean over groups."""
    gh, gw, c = 6, 10, 5
    feats = torch.randn(gh * gw, c, dtype=torch.float64)  # per-patch features in patch (block) order, s = 2
    s = 2
    x = feats.view(1, gh // s, gw // s, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(1, gh, gw, c).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(x, (gh // s, gw // s), mode="bilinear").permute(0, 2, 3, 1).reshape(-1, c)
    ours = feats.numpy()[IP.merge_groups(gh, gw, s)].mean(1)
    err = np.abs(ours - ref.numpy()).max()
    print(f"\ngroup mean vs bilinear downsampling: max |diff| {err:.2e}")
    assert err < 1e-12
    np.testing.assert_array_equal(IP.merge_groups(gh, gw, 1), np.arange(gh * gw)[:, None])


def test_resize_and_normalize_match_transformers():
    pytest.importorskip("transformers")
    from transformers.image_transforms import resize as hf_resize

    x = np.random.RandomState(3).randint(0, 256, (91, 157, 3), np.uint8)
    for size in [(84, 140), (182, 308), (91, 157)]:
        np.testing.assert_array_equal(IP.resize_image(x, size), hf_resize(x, size, resample=3))
    np.testing.assert_array_equal(IP.resize_image(x, (91, 157)), x)  # identity at the same size
    levels = np.arange(256, dtype=np.uint8)
    want = ((levels.astype(np.float64) * (1 / 255)).astype(np.float32) - np.float32(0.5)) / np.float32(0.5)
    np.testing.assert_array_equal(IP.normalize(levels), want)
    assert abs(IP.normalize(levels).astype(np.float64) - (levels / 255 - 0.5) / 0.5).max() < 1e-7
    with pytest.raises(ValueError, match="uint8"):
        IP.normalize(levels.astype(np.float32))


@pytest.mark.parametrize("d,hw", [(1, (130, 200)), (2, (130, 200)), (2, (360, 640)), (1, (33, 47))])
def test_process_image_matches_transformers(d, hw):
    """Same image through transformers' VideoLLaMA3 PIL processor (merge_size = d, mean/std 0.5)."""
    pytest.importorskip("transformers")
    from transformers.models.video_llama_3.image_processing_pil_video_llama_3 import VideoLlama3ImageProcessorPil

    x = np.random.RandomState(hw[0] + d).randint(0, 256, (*hw, 3), np.uint8)
    max_pixels = IP.budget(2048, 2, d, 4)
    ours = IP.process_image(x, max_pixels=max_pixels, downsampling=d)
    proc = VideoLlama3ImageProcessorPil(min_pixels=3136, max_pixels=max_pixels, patch_size=14, merge_size=d,
                                        image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=3)
    ref = proc(images=[x], return_tensors="np")
    assert tuple(ref["image_grid_thw"][0]) == (1, *ours.grid)
    err = np.abs(ref["pixel_values"] - ours.patches).max()
    print(f"\nd={d} {hw} -> grid {ours.grid}: max |ours - transformers| = {err:.1e}")
    assert ours.patches.dtype == np.float32 and err <= 1e-6
    np.testing.assert_array_equal(ours.coords, IP.patch_coords(*ours.grid, d))


# ============================================================================ frame sampling


def _coded(i, h=48, w=64):
    img = np.zeros((h, w, 3), np.uint8)
    for b in range(BITS):
        if (i >> b) & 1:
            img[:, b * 6:(b + 1) * 6] = 255
    return img


def _index(frame):
    return sum(1 << b for b in range(BITS) if frame[4:-4, b * 6 + 2:b * 6 + 4].mean() > 127)


def _write_video(path, n, rate, codec="libx264", bframes=2):
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=rate)
        s.width, s.height = 64, 48
        s.pix_fmt = "rgb8" if codec == "gif" else "yuv420p"
        if bframes:
            s.codec_context.max_b_frames = bframes
        for i in range(n):
            for p in s.encode(av.VideoFrame.from_ndarray(_coded(i), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return str(path)


def ffmpeg_fps(path, fps):
    """Ground truth: decode with PyAV and run FFmpeg's own `fps=fps:round=down` filter; the index
    of each emitted frame is read back from its stripes (so the source must be `_coded`)."""
    out = []
    with av.open(path) as c:
        s = c.streams.video[0]
        g = av.filter.Graph()
        src, flt, sink = g.add_buffer(template=s), g.add("fps", f"fps={fps}:round=down"), g.add("buffersink")
        src.link_to(flt)
        flt.link_to(sink)
        g.configure()

        def drain():
            while True:
                try:
                    out.append(_index(g.pull().to_ndarray(format="rgb24")))
                except (av.BlockingIOError, av.EOFError):
                    return

        for fr in c.decode(s):
            g.push(fr)
            drain()
        g.push(None)
        drain()
    return out


def test_fps_filter_rule_matches_ffmpeg_on_irregular_timestamps():
    """The pure rule against the real filter on variable-frame-rate timestamps (gaps, bursts, long
    and zero last durations), 1/1000 s time base."""
    rs = np.random.RandomState(0)
    tb = Fraction(1, 1000)
    for trial in range(30):
        n = int(rs.randint(1, 60))
        steps = rs.choice([1, 7, 33, 40, 41, 250, 999, 1000, 1700], size=n)
        pts = np.cumsum(steps) - steps[0] + int(rs.randint(0, 1500))
        durs = [int(x) for x in rs.choice([0, 33, 40, 900, 2500], size=n)]
        fps = [1, 4, 2.5, 0.5, 30][trial % 5]
        g = av.filter.Graph()
        src = g.add_buffer(width=16, height=16, format="gray", time_base=tb)
        flt, sink = g.add("fps", f"fps={fps}:round=down"), g.add("buffersink")
        src.link_to(flt)
        flt.link_to(sink)
        g.configure()
        got = []

        def drain():
            while True:
                try:
                    a = g.pull().to_ndarray()
                    got.append(int(a[0, 0]) + 256 * int(a[0, 1]))
                except (av.BlockingIOError, av.EOFError):
                    return

        for i, (p, dur) in enumerate(zip(pts, durs)):
            a = np.zeros((16, 16), np.uint8)
            a[0, 0], a[0, 1] = i % 256, i // 256
            fr = av.VideoFrame.from_ndarray(a, format="gray")
            fr.pts, fr.time_base, fr.duration = int(p), tb, dur
            g.push(fr)
            drain()
        g.push(None)
        drain()
        times = [int(p) * tb for p in pts]
        assert F.fps_filter_indices(times, times[-1] + durs[-1] * tb, fps) == got, (trial, fps)


@pytest.fixture(scope="module")
def coded_videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("vl3_videos")
    return {"25": _write_video(d / "v25.mp4", 250, 25),
            "ntsc": _write_video(d / "ntsc.mp4", 300, Fraction(30000, 1001))}


@pytest.mark.parametrize("name", ["25", "ntsc"])
@pytest.mark.parametrize("fps", [1, 4])
def test_file_sampling_matches_ffmpeg(coded_videos, name, fps):
    path = coded_videos[name]
    v = F.load_video(path, fps=fps)
    want = ffmpeg_fps(path, fps)
    assert v.frame_indices == want
    assert [_index(f) for f in v.frames] == want  # the decoded pixels are those frames
    assert len(want) == 10 * fps  # 10 s (10.01 s for NTSC): floor(end * fps) slots
    np.testing.assert_allclose(v.timestamps, np.arange(len(want)) / fps, rtol=0, atol=1e-12)
    assert v.frames.shape == (len(want), 48, 64, 3) and v.frames.dtype == np.uint8
    if name == "25" and fps == 1:  # round=down: the last frame of each second
        assert want == [24 + 25 * k for k in range(10)]


def test_file_sampling_cap_and_uniform(coded_videos):
    path = coded_videos["25"]
    full = ffmpeg_fps(path, 4)
    v = F.load_video(path, fps=4, max_frames=7)
    pos = np.linspace(0, 39, 7).astype(int)
    assert v.frame_indices == [full[i] for i in pos] and [_index(f) for f in v.frames] == v.frame_indices
    np.testing.assert_allclose(v.timestamps, pos / 4, atol=1e-12)
    # fps=None: every frame (250 <= 768), labelled linspace(start, start + duration, n)
    v = F.load_video(path, fps=None)
    assert v.frame_indices == list(range(250)) and [_index(f) for f in v.frames] == list(range(250))
    np.testing.assert_allclose(v.timestamps, np.linspace(0, 10, 250), atol=1e-12)
    v = F.load_video(path, fps=None, max_frames=10)
    assert v.frame_indices == np.linspace(0, 249, 10).astype(int).tolist()


def test_annotated_frames_and_errors(coded_videos, tmp_path):
    path = coded_videos["ntsc"]
    v = F.load_video(path, fps=1, frame_ids=[150, 3, 150])
    assert v.frame_ids == [150, 3, 150] and [_index(f) for f in v.annotated] == [150, 3, 150]
    assert v.annotated.shape == (3, 48, 64, 3)
    assert F.load_video(path, fps=1).annotated.shape == (0, 48, 64, 3)
    with pytest.raises(V.MediaError, match=r"ntsc\.mp4: frame_ids \[300\] outside \[0, 300\)"):
        F.load_video(path, fps=1, frame_ids=[0, 300])
    with pytest.raises(V.MediaError, match="nope.mp4"):
        F.load_video(str(tmp_path / "nope.mp4"))
    short = _write_video(tmp_path / "short.mp4", 10, 25)  # 0.4 s: the filter emits nothing at fps 1
    assert ffmpeg_fps(short, 1) == []
    with pytest.raises(V.MediaError, match=r"short\.mp4: the fps filter at fps=1 emits no frame"):
        F.load_video(short, fps=1)
    assert F.load_video(short, fps=4).frame_indices == ffmpeg_fps(short, 4) == [6]
    data = open(path, "rb").read()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    with pytest.raises(V.MediaError, match="cut.mp4"):
        F.load_video(str(tmp_path / "cut.mp4"), fps=1)
    with pytest.raises(ValueError, match="fps"):
        F.load_video(path, fps=0)
    with pytest.raises(ValueError, match="max_frames"):
        F.load_video(path, fps=1, max_frames=0)


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_frame_folder_sampling(tmp_path, ext):
    d = tmp_path / "clip"
    d.mkdir()
    for i in range(11):
        Image.fromarray(_coded(i)).save(d / f"{i:05d}.{ext}", **({"quality": 95} if ext == "jpg" else {}))
    v = F.load_video(str(d), fps=1, frame_ids=[10, 0])
    assert v.frame_indices == [1, 4, 7, 10] and [_index(f) for f in v.frames] == [1, 4, 7, 10]
    assert v.timestamps == [1 / 3, 4 / 3, 7 / 3, 10 / 3] and v.source_fps == 3
    assert [_index(f) for f in v.annotated] == [10, 0]
    assert F.load_video(str(d), fps=2).frame_indices == list(range(11))  # segment 3 // 2 = 1
    assert F.load_video(str(d), fps=4).frame_indices == list(range(11))  # segment 0 -> uniform, all frames
    assert F.load_video(str(d), fps=None, max_frames=4).frame_indices == [0, 3, 6, 10]
    assert F.load_video(str(d), fps=0.5).frame_indices == [3, 9]  # segment 6
    # 11 frames / 3 = 3.7 s is not under max_frames = 3: uniform over 3
    assert F.load_video(str(d), fps=1, max_frames=3).frame_indices == [0, 5, 10]
    with pytest.raises(V.MediaError, match="frame_ids"):
        F.load_video(str(d), fps=1, frame_ids=[11])


def test_gif_sampling(tmp_path):
    path = _write_video(tmp_path / "a.gif", 60, 25, codec="gif", bframes=0)
    v = F.load_video(path, fps=1)
    assert v.frame_indices == [12, 37] and [_index(f) for f in v.frames] == [12, 37]  # segment 25
    assert v.timestamps == [12 / 25, 37 / 25] and v.source_fps == 25
    v = F.load_video(path, fps=4, frame_ids=[59])
    assert v.frame_indices == list(range(3, 60, 6)) and [_index(f) for f in v.frames] == v.frame_indices
    assert _index(v.annotated[0]) == 59


def test_sampling_rules_match_official_formulas():
    for n in (0, 1, 2, 3, 10, 100, 2304, 3000):
        for vid_fps in (3, 25):
            for fps in (1, 2, 4, 0.5, None):
                for mf in (768, 16):
                    got = F.sample_frame_ids(n, vid_fps, fps, mf)
                    if fps is not None and n / vid_fps < mf and min(vid_fps // fps, n) > 0:
                        seg = min(vid_fps // fps, n)
                        want = list(range(int(seg // 2), n, int(seg)))
                    else:
                        want = list(range(n)) if n <= mf else [int(x) for x in np.linspace(0, n - 1, mf)]
                    assert got == want, (n, vid_fps, fps, mf)
    assert F.file_timestamps(0.0, 4, 3) == [0.0, 0.25, 0.5]
    assert F.file_timestamps(0.5, 1, 2) == [0.5, 1.5]


@pytest.mark.parametrize("name,fps,n_out", [("dog_h264_1280x720.mp4", 1, 5), ("people_mpeg4_1280x720.mp4", 4, 74)])
def test_real_videos_match_ffmpeg_filter(name, fps, n_out):
    """The shared real videos (29.97 fps H.264, 12 fps MPEG-4): the sampled pixels are exactly the
    frames FFmpeg's fps filter emits (compared by hash to keep 720p frames out of memory)."""
    if not os.path.isdir(SHARED_VIDEOS):
        pytest.skip(f"real test videos not found at {os.path.abspath(SHARED_VIDEOS)}")
    path = os.path.join(SHARED_VIDEOS, name)
    ref = []
    with av.open(path) as c:
        s = c.streams.video[0]
        g = av.filter.Graph()
        src, flt, sink = g.add_buffer(template=s), g.add("fps", f"fps={fps}:round=down"), g.add("buffersink")
        src.link_to(flt)
        flt.link_to(sink)
        g.configure()
        for fr in itertools.chain(c.decode(s), [None]):
            g.push(fr)
            while True:
                try:
                    ref.append(hashlib.sha1(g.pull().to_ndarray(format="rgb24").tobytes()).hexdigest())
                except (av.BlockingIOError, av.EOFError):
                    break
    v = F.load_video(path, fps=fps, max_frames=768)
    assert len(ref) == n_out and [hashlib.sha1(f.tobytes()).hexdigest() for f in v.frames] == ref
    np.testing.assert_allclose(v.timestamps, np.arange(n_out) / fps, atol=1e-12)
    print(f"\n{name} at fps {fps}: {n_out} frames, sources {v.frame_indices[:6]} ...")


# ============================================================================ pruning


def torch_keep(grouped, dtype, threshold=0.1):
    """§7 written in torch: diff in `dtype`, mean over the block, x255, > threshold, min one token."""
    p = torch.from_numpy(np.ascontiguousarray(grouped)).to(dtype)
    diff = torch.abs(p[1:] - p[:-1]).mean(dim=-1) * 255
    diff = torch.cat([torch.full_like(diff[:1], threshold + 1), diff], dim=0)
    keep = diff > threshold
    keep[keep.sum(dim=1) < 1, :1] = True
    return keep.numpy(), diff[1:].float().numpy()


def _video_with_static_region():
    """6 frames of 56 x 84 (2 x 3 merged tokens at d = 2): the bottom row is static (a letterbox),
    the top-left block moves every frame, frame 3 duplicates frame 2, frame 4 changes the top-right
    block by k grey levels in total (near the threshold), frame 5 adds noise everywhere on top."""
    rs = np.random.RandomState(0)
    base = rs.randint(0, 256, (56, 84, 3), np.uint8)
    frames = [base.copy()]
    for t in range(1, 6):
        f = frames[-1].copy()
        if t != 3:
            f[:28, :28] = rs.randint(0, 256, (28, 28, 3), np.uint8)
        frames.append(f)
    frames[5][:28] = np.clip(frames[5][:28].astype(int) + rs.randint(-3, 4, (28, 84, 3)), 0, 255).astype(np.uint8)
    return frames


def _near_threshold(frames, k, level=77):
    """Frame 4's top-right block: flat `level` in frames 0-3, then k values raised by one level."""
    out = [f.copy() for f in frames]
    for f in out[:5]:
        f[:28, 56:] = level
    flat = out[4][:28, 56:].reshape(-1)
    flat[:k] += 1
    out[4][:28, 56:] = flat.reshape(28, 28, 3)
    return out


def _grouped(frames):
    procs = [IP.process_image(f, max_pixels=IP.budget(512, 2, 2, len(frames)), downsampling=2) for f in frames]
    assert all(p.grid == (4, 6) for p in procs)
    return procs, PR.group_frame_patches(procs)


def test_grouping_is_the_official_view():
    procs, grouped = _grouped(_video_with_static_region())
    stacked = torch.from_numpy(np.stack([p.patches for p in procs]))
    ref = stacked.view(len(procs), (4 // 2) * (6 // 2), -1).numpy()  # the official view of block-ordered patches
    np.testing.assert_array_equal(grouped, ref)
    assert grouped.shape == (6, 6, 4 * 588)


def test_pruning_matches_torch_and_its_rules():
    frames = _video_with_static_region()
    # the k where bf16 and fp32 disagree, found with the torch reference only
    flips = [k for k in range(100, 140)
             if torch_keep(_grouped(_near_threshold(frames, k))[1], torch.float32)[0][4, 2]
             != torch_keep(_grouped(_near_threshold(frames, k))[1], torch.bfloat16)[0][4, 2]]
    assert flips, "no bf16/fp32 disagreement near the threshold"
    k = flips[0]
    _, grouped = _grouped(_near_threshold(frames, k))
    errs = {}
    for name, tdt in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        want, want_diff = torch_keep(grouped, tdt)
        got = PR.keep_mask(grouped, dtype=name)
        np.testing.assert_array_equal(got, want)
        ours = PR.frame_differences(grouped, name)
        rel = (np.abs(ours - want_diff) / np.maximum(np.abs(want_diff), 1e-30)).max()
        errs[name] = rel
        # bf16: bit-exact (one rounding after an exact sum); fp32: summation order, ~1 ulp
        assert rel <= (0.0 if name == "bfloat16" else 1e-6), (name, rel)
    keep16, keep32 = PR.keep_mask(grouped, dtype="bfloat16"), PR.keep_mask(grouped, dtype="float32")
    print(f"\nflip at k = {k} raised values (fp32 keeps: {bool(keep32[4, 2])}); max relative |diff - torch|: {errs}")
    assert keep16[4, 2] != keep32[4, 2]
    for keep in (keep16, keep32):
        assert keep[0].all()  # frame 0 keeps everything
        assert not keep[1:, 3:].any()  # the static bottom row is dropped (tokens 3, 4, 5)
        assert keep[[1, 2, 4], 0].all()  # the moving block survives
        assert keep[3].tolist() == [True] + [False] * 5  # duplicated frame: only the first token
        assert keep[5, :3].all()  # noise of +-3 levels is far above 0.05 levels on average


def test_pruning_min_token_and_edge_cases():
    x = np.random.RandomState(1).rand(4, 5, 12).astype(np.float32)
    x[2] = x[1]
    x[3] = x[2] + 1e-4  # too small to pass (1e-4 * 255 / 2 < 0.1)
    keep = PR.keep_mask(x, dtype="float32")
    assert keep[2].tolist() == keep[3].tolist() == [True, False, False, False, False]
    assert PR.keep_mask(x[:1]).all() and PR.keep_mask(x[:1]).shape == (1, 5)  # one frame keeps all
    # a higher threshold prunes more; with a huge one every later frame keeps only token 0
    assert (PR.keep_mask(x, threshold=1e9)[1:].sum(1) == 1).all()
    with pytest.raises(ValueError, match="dtype"):
        PR.keep_mask(x, dtype="float16")
    with pytest.raises(ValueError, match="frame_patches"):
        PR.keep_mask(x[0])
    a = IP.process_image(np.zeros((56, 56, 3), np.uint8), max_pixels=10 ** 6, downsampling=2)
    b = IP.process_image(np.zeros((56, 84, 3), np.uint8), max_pixels=10 ** 6, downsampling=2)
    with pytest.raises(ValueError, match=r"frames\[1\]"):
        PR.group_frame_patches([a, b])


def test_threshold_is_compared_in_the_compute_dtype():
    """A block whose bf16 score is exactly bf16(0.1) = 0.10009765625: above 0.1 as a real number, but
    not above the threshold once PyTorch casts it to bf16 - and `keep_mask` agrees with torch."""
    D = 64
    js, vs = np.meshgrid(np.arange(1, D + 1), np.arange(1, 256) * 2.0 ** -14, indexing="ij")
    x = np.zeros((2, js.size, D), np.float32)  # one candidate block per (j values of v)
    x[1] = np.where(np.arange(D) < js.reshape(-1, 1), vs.reshape(-1, 1), 0)
    _, diff = torch_keep(x, torch.bfloat16)
    ties = np.flatnonzero(diff[0] == np.float32(0.10009765625))
    assert len(ties), "no block scores exactly bf16(0.1)"
    tie = x[:, [0, ties[0]]]
    tie[1, 0] = 1.0  # token 0 changes a lot (so the min-one rule stays out of it), token 1 is the tie
    keep, _ = torch_keep(tie, torch.bfloat16)
    assert PR.frame_differences(tie, "bfloat16")[0, 1] == np.float32(0.10009765625) > 0.1
    np.testing.assert_array_equal(PR.keep_mask(tie, dtype="bfloat16"), keep)
    assert keep[1].tolist() == [True, False]  # the tie is dropped
    np.testing.assert_array_equal(PR.keep_mask(x, dtype="bfloat16"), torch_keep(x, torch.bfloat16)[0])
    print(f"\n{len(ties)} of {js.size} candidate blocks score exactly bf16(0.1); all dropped as in torch")
