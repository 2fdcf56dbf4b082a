"""data_pipeline.convert / cli / bench_formats end to end: records, skip report, resume, throughput."""

import dataclasses
import glob
import json
import os
import subprocess
import sys
import time

import av
import numpy as np
import pytest
from PIL import Image

from data_helpers import box as _box, conv as _conv, rle as _rle
from data_pipeline import cli, convert, inputs, masks, records, schema, video as V

SHARED_VIDEOS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "videos")
DOG, PEOPLE = "videos/dog_h264_1280x720.mp4", "videos/people_mpeg4_1280x720.mp4"


def _need_real():
    if not os.path.isdir(SHARED_VIDEOS):
        pytest.skip(f"real test videos not found at {os.path.abspath(SHARED_VIDEOS)} (../shared/data/videos)")


def _runs(m):
    flat = m.flatten(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    return ([0] + runs) if flat[0] else runs


def _make_media(root):
    """A frame folder (DAVIS layout), a small mp4, an image, a corrupt file; links to the real videos."""
    clip = root / "DAVIS" / "JPEGImages" / "480p" / "clip"
    clip.mkdir(parents=True)
    rs = np.random.RandomState(0)
    for i in range(12):
        img = np.clip(rs.rand(48, 64, 3) * 60 + 16 * i, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(clip / f"{i:05d}.png")
    with av.open(str(root / "synthetic.mp4"), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(40):
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 6 * i, np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    Image.fromarray((rs.rand(30, 50, 3) * 255).astype(np.uint8)).save(root / "img.png")
    (root / "broken.mp4").write_bytes(b"\x00not a video" * 50)
    if os.path.isdir(SHARED_VIDEOS):
        os.symlink(os.path.abspath(SHARED_VIDEOS), root / "videos")
    return "DAVIS/JPEGImages/480p/clip"


def _synthetic_entries(clip):
    m_clip = _box(48, 64, 5, 10, 30, 40)
    m_img = _box(30, 50, 2, 3, 20, 25)
    return [
        {"id": "folder", "video": clip, "conversations": _conv("What is <region>?"),
         "annotation": [{"11": {"segmentation": _rle(m_clip)},
                         "2": {"segmentation": {"size": [48, 64], "counts": _runs(m_clip)}}}]},
        {"id": "image", "image": "img.png", "conversations": _conv("Describe <region>.", tag="<image>"),
         "annotation": [{"0": {"segmentation": [[3, 2, 25, 2, 25, 20, 3, 20]]}}]},
        {"id": "plain", "video": "synthetic.mp4", "conversations": _conv("What happens?")},
        {"id": "size", "video": "synthetic.mp4", "conversations": _conv("<region>?"),
         "annotation": [{"3": {"segmentation": _rle(_box(40, 64, 0, 0, 5, 5))}}]},
        {"id": "missing", "video": "nope.mp4", "conversations": _conv("hi")},
        {"id": "broken", "video": "broken.mp4", "conversations": _conv("hi")},
        {"id": "range", "video": clip, "conversations": _conv("<region>?"),
         "annotation": [{"12": {"segmentation": None}}]},
    ], {"folder": m_clip, "image": m_img}


def _files(out):
    """Every output file except the merged report (which records run timings)."""
    return {os.path.basename(p): open(p, "rb").read() for p in sorted(glob.glob(os.path.join(out, "*")))
            if "-of-" in os.path.basename(p) or not p.endswith(".report.json")}


def test_convert_synthetic_media_exact(tmp_path):
    clip = _make_media(tmp_path)
    entries, ref = _synthetic_entries(clip)
    cfg = convert.ConvertConfig(num_frames=8, image_size=32, image_format="png")
    out = str(tmp_path / "out")
    report = convert.convert(entries, out, media_root=str(tmp_path), num_shards=2, workers=0, config=cfg,
                             source="syn.json", progress=False)
    assert report["written"] == 3
    assert report["skipped"] == {"frame_index_out_of_range": 1, "mask_size_mismatch": 1, "media_not_found": 1,
                                 "unreadable_media": 1}
    by_id = {s["id"]: s for s in report["skips"]}
    assert by_id["size"]["field"] == "annotation[0]['3'].segmentation" and "40x64" in by_id["size"]["message"]
    assert by_id["range"]["field"] == "annotation[0]['12']" and by_id["range"]["index"] == 6
    reader = records.RecordReader(out)
    recs = {r.sample_id: r for r in (reader[i] for i in range(len(reader)))}
    assert sorted(recs) == ["folder", "image", "plain"]

    f = recs["folder"]
    src = V.open_video(str(tmp_path / clip))
    assert f.frame_indices == tuple(V.sample_indices_v1(12, 8)) and f.num_source_frames == 12
    frames = src.get(set(f.frame_indices) | {2, 11})
    np.testing.assert_array_equal(f.decode_frames(), np.stack([V.resize_frame(frames[i], 32) for i in f.frame_indices]))
    assert f.region_frame_indices == (2, 11)  # ascending union
    np.testing.assert_array_equal(f.decode_region_frames()[1], V.resize_frame(frames[11], 32))
    (obj,) = f.objects
    assert obj.frames == (11, 2) and obj.region_index == (1, 0) and obj.null == (False, False)
    np.testing.assert_array_equal(obj.decode(), np.stack([ref["folder"]] * 2))
    assert f.conversations == tuple(entries[0]["conversations"]) and f.orig_size == (48, 64)
    assert f.source == "syn.json" and f.index == 0 and f.stored_size == 32

    im = recs["image"]
    assert im.modality == "image" and im.frame_indices == (0,) and im.region_frame_indices == (0,)
    poly = entries[1]["annotation"][0]["0"]["segmentation"]
    np.testing.assert_array_equal(im.objects[0].decode()[0], masks.decode_segmentation(poly, 30, 50))
    p = recs["plain"]
    assert p.objects == () and p.region_frames == () and len(p.frames) == 8 and p.num_source_frames == 40

    # The same records as ArrayRecord shards.
    ar_cfg = dataclasses.replace(cfg, output_format="array_record")
    ar_out = str(tmp_path / "ar")
    ar = convert.convert(entries, ar_out, media_root=str(tmp_path), num_shards=2, workers=0, config=ar_cfg,
                         source="syn.json", progress=False)
    assert ar["written"] == 3 and ar["skipped"] == report["skipped"]
    assert len(glob.glob(os.path.join(ar_out, "*.array_record"))) == 2
    assert not glob.glob(os.path.join(ar_out, "*.index"))
    tf_raw, ar_raw = records.RecordReader(out, parse=False), records.RecordReader(ar_out, parse=False)
    assert [ar_raw[i] for i in range(3)] == [tf_raw[i] for i in range(3)]


def _exploding_parse(raw, index):
    if raw.get("id") == "plain":
        raise ZeroDivisionError("boom")
    return schema.parse_sample(raw, index)


def test_unexpected_errors_are_reported_not_raised(tmp_path):
    clip = _make_media(tmp_path)
    entries, _ = _synthetic_entries(clip)
    report = convert.convert(entries[:3], str(tmp_path / "out"), media_root=str(tmp_path), num_shards=1,
                             workers=0, parse=_exploding_parse, progress=False,
                             config=convert.ConvertConfig(num_frames=2, image_size=8))
    assert report["written"] == 2 and report["skipped"] == {"unexpected_error": 1}
    (skip,) = report["skips"]
    assert skip["index"] == 2 and skip["message"].startswith("ZeroDivisionError: boom")


def test_convert_real_videos_report_and_resume(tmp_path):
    _need_real()
    clip = _make_media(tmp_path)
    syn, _ = _synthetic_entries(clip)
    H, W = 720, 1280
    a, b = _box(H, W, 100, 200, 400, 600), _box(H, W, 300, 700, 650, 1000)
    poly = [[700.0, 300.0, 1000.0, 300.0, 1000.0, 650.0, 700.0, 650.0]]
    entries = [
        {"id": "dog", "video": DOG, "conversations": _conv("Compare <region> with <region>."),
         "annotation": [{"75": {"segmentation": _rle(a)}, "10": {"segmentation": _rle(a)}},
                        {"75": {"segmentation": poly}, "140": {"segmentation": None}}]},
        {"id": "people", "video": PEOPLE, "height": H, "width": W, "conversations": _conv("Who is <region>?"),
         "annotation": [{"200": {"segmentation": {"size": [H, W], "counts": _runs(b)}}, "3": {"segmentation": poly}}]},
        {"id": "mismatch", "video": DOG, "conversations": _conv("Who is <region>?"), "annotation": []},
        {"id": "late", "video": PEOPLE, "conversations": _conv("<region>?"),
         "annotation": [{"300": {"segmentation": None}}]},
        {"id": "empty", "video": DOG, "conversations": _conv("<region>?"),
         "annotation": [{"1": {"segmentation": {"size": [H, W], "counts": ""}}}]},
    ] + syn
    cfg = convert.ConvertConfig(num_frames=8, image_size=64)
    out = str(tmp_path / "out")
    report = convert.convert(entries, out, media_root=str(tmp_path), num_shards=4, workers=2, config=cfg,
                             source="mix.json", progress=False)
    assert report["written"] == 5 and report["shards_done"] == 4
    assert report["skipped"] == {"empty_rle": 1, "frame_index_out_of_range": 2, "mask_size_mismatch": 1,
                                 "media_not_found": 1, "region_mask_mismatch": 1, "unreadable_media": 1}
    # sorted by sample index, each naming its reason and field
    assert [(s["index"], s["id"]) for s in report["skips"]] == [
        (2, "mismatch"), (3, "late"), (4, "empty"), (8, "size"), (9, "missing"), (10, "broken"), (11, "range")]
    assert report["skips"][1]["field"] == "annotation[0]['300']" and "224 frames" in report["skips"][1]["message"]
    saved = json.load(open(os.path.join(out, "data.report.json")))
    assert saved["written"] == 5 and saved["num_skipped"] == 7

    reader = records.RecordReader(out)
    recs = {r.sample_id: r for r in (reader[i] for i in range(len(reader)))}
    dog = recs["dog"]
    assert dog.frame_indices == tuple(V.sample_indices_v1(150, 8)) and dog.orig_size == (H, W)
    assert dog.region_frame_indices == (10, 75, 140)
    o1, o2 = dog.objects
    assert o1.frames == (75, 10) and o1.region_index == (1, 0)
    assert o2.frames == (75, 140) and o2.region_index == (1, 2) and o2.null == (False, True)
    np.testing.assert_array_equal(o1.decode(), np.stack([a, a]))
    dm = o2.decode()
    assert dm[0].sum() > 0 and not dm[1].any() and dm.shape == (2, H, W)
    people = recs["people"]
    np.testing.assert_array_equal(people.objects[0].decode()[0], b)
    src = V.open_video(os.path.join(SHARED_VIDEOS, os.path.basename(PEOPLE))).get([people.frame_indices[3]])
    ours = V.decode_image(people.frames[3]).astype(int)
    ref = V.resize_frame(src[people.frame_indices[3]], 64).astype(int)
    print(f"\ndefault ({cfg.image_format}) stored frame vs exact resize: max |diff| {np.abs(ours - ref).max()}, "
          f"mean {np.abs(ours - ref).mean():.3f} (uint8 levels)")
    assert np.abs(ours - ref).mean() < 4.0  # 64x64 thumbnails are all detail; at 384 the mean is ~1.3
    np.testing.assert_array_equal(ours, ref)  # the default format is lossless

    # Resume: a finished shard deleted, another never finished (stale temp files only).
    before = _files(out)
    names = sorted(n for n in before if n.endswith(".tfrecord"))
    os.remove(os.path.join(out, names[1]))
    open(os.path.join(out, names[1] + ".tmp"), "wb").write(b"stale")
    base3 = names[3][: -len(".tfrecord")]
    for ext in (".tfrecord", ".index", ".report.json"):
        os.remove(os.path.join(out, base3 + ext))
    open(os.path.join(out, names[3] + ".tmp"), "wb").write(b"partial shard")
    open(os.path.join(out, base3 + ".index.tmp"), "w").write("0 1\n")
    again = convert.convert(entries, out, media_root=str(tmp_path), num_shards=4, workers=2, config=cfg,
                            source="mix.json", progress=False)
    assert again["run"]["converted_shards"] == [1, 3]
    assert again["written"] == 5 and again["skipped"] == report["skipped"]
    assert _files(out) == before  # byte-identical shards, indexes and shard reports; no temp files left
    with pytest.raises(ValueError, match="different conversion"):
        convert.convert(entries, out, media_root=str(tmp_path), num_shards=4, workers=0,
                        config=convert.ConvertConfig(num_frames=16, image_size=64), source="mix.json", progress=False)


def test_killed_conversion_resumes_identically(tmp_path):
    """SIGKILL the CLI mid-run (after its first shard), resume, compare with an uninterrupted run."""
    _need_real()
    _make_media(tmp_path)
    rle = _rle(_box(720, 1280, 10, 10, 200, 300))
    entries = [{"id": f"k{i}", "video": DOG, "conversations": _conv("<region>?"),
                "annotation": [{str(20 * i + 3): {"segmentation": rle}}]} for i in range(4)]
    js = tmp_path / "kill.json"
    js.write_text(json.dumps(entries))
    args = ["convert", "--json", str(js), "--media-root", str(tmp_path), "--num-shards", "4", "--workers", "0",
            "--num-frames", "4", "--image-size", "32", "--no-progress"]
    out = tmp_path / "killed"
    root = os.path.join(os.path.dirname(__file__), "..")
    proc = subprocess.Popen([sys.executable, "-m", "data_pipeline.cli", *args, "--out", str(out)], cwd=root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "kill-00000-of-00004.tfrecord"
    deadline = time.time() + 60
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert first.exists() and not (out / "kill-00003-of-00004.tfrecord").exists(), "killed too late to test"
    assert cli.main([*args, "--out", str(out)]) == 0
    assert cli.main([*args, "--out", str(tmp_path / "ref")]) == 0
    assert _files(str(out)) == _files(str(tmp_path / "ref"))
    assert not glob.glob(str(out / "*.tmp*"))


def test_throughput_real_videos(tmp_path):
    _need_real()
    _make_media(tmp_path)
    H, W = 720, 1280
    entries = []
    for i in range(8):
        objs = [{str(f): {"segmentation": _rle(_box(H, W, 50 * k, 80 * k, 50 * k + 200, 80 * k + 300))}
                 for f in (5 + k, 60 + k, 120 + k)} for k in range(3)]
        entries.append({"id": f"t{i}", "video": (DOG, PEOPLE)[i % 2], "annotation": objs,
                        "conversations": _conv("Relate <region>, <region> and <region>.")})
    report = convert.convert(entries, str(tmp_path / "out"), media_root=str(tmp_path), num_shards=2, workers=2,
                             config=convert.ConvertConfig(num_frames=16, image_size=384), progress=False)
    run = report["run"]
    size = sum(os.path.getsize(p) for p in glob.glob(str(tmp_path / "out" / "*.tfrecord")))
    print(f"\nconversion throughput (real 1280x720 videos, 16 frames + 6 region frames at 384, 3 objects, "
          f"2 workers incl. start-up): {run['samples_per_second']:.2f} samples/s; {size / 8 / 1e6:.2f} MB/record")
    assert report["written"] == 8


def test_cli_shard_ranges_validate_inspect_and_bench(tmp_path, capsys):
    clip = _make_media(tmp_path)
    entries, _ = _synthetic_entries(clip)
    js = tmp_path / "syn.json"
    js.write_text(json.dumps(entries))
    common = ["--json", str(js), "--media-root", str(tmp_path), "--num-shards", "3", "--workers", "0",
              "--num-frames", "4", "--image-size", "16", "--no-progress"]
    assert cli.main(["convert", *common, "--out", str(tmp_path / "a"), "--shard-range", "1:3"]) == 0
    assert cli.main(["convert", *common, "--out", str(tmp_path / "a"), "--shard-range", "0:1"]) == 0
    assert cli.main(["convert", *common, "--out", str(tmp_path / "b")]) == 0
    assert _files(str(tmp_path / "a")) == _files(str(tmp_path / "b"))  # split runs == one run
    assert len(glob.glob(str(tmp_path / "a" / "syn-0000?-of-00003.tfrecord"))) == 3
    capsys.readouterr()
    assert cli.main(["validate", "--json", str(js)]) == 0
    v = json.loads(capsys.readouterr().out)
    assert v["samples"] == 7 and v["valid"] == 7  # media-dependent problems are found by convert only
    assert cli.main(["inspect", "--records", str(tmp_path / "a"), "--index", "0"]) == 0
    assert '"id": "folder"' in capsys.readouterr().out

    m = _box(48, 64, 5, 10, 30, 40)
    bench = [{"video": clip, "Question": "What is <object1><region>?", "type": "Basic Questions",
              "options": ["(A) x", "(B) y"], "Answer": "(A) x", "frame_idx": 4,
              "annotation": [{str(f): {"segmentation": _rle(m)} for f in (0, 4, 8)}]},
             {"video": clip, "Question": "<object2><region>?", "type": "Basic Questions",
              "options": ["(A) x"], "Answer": "(A) x", "frame_idx": 5,
              "annotation": [{"4": {"segmentation": _rle(m)}}]}]
    bj = tmp_path / "bench_q.json"
    bj.write_text(json.dumps(bench))
    for mode, frames in (("single", [(4,)]), ("multi", [(0, 4, 8), (4,)])):
        out = tmp_path / f"bench_{mode}"
        assert cli.main(["convert", "--json", str(bj), "--media-root", str(tmp_path), "--out", str(out),
                         "--num-shards", "1", "--workers", "0", "--num-frames", "8", "--image-size", "16",
                         "--format", "bench-q", "--bench-mode", mode, "--no-progress"]) == 0
        r = records.RecordReader(str(out))
        assert [rec.objects[0].frames for rec in (r[i] for i in range(len(r)))] == frames
        assert r[0].extra["answer"] == "(A) x" and r[0].extra["mode"] == mode
        rep = json.load(open(out / "bench_q.report.json"))
        assert rep["skipped"] == ({"missing_segmentation": 1} if mode == "single" else {})


# ----------------------------------------------------------------------------- hostile inputs (issue #15)


def _image_media(root, names=("img.png",)):
    """Small images (30x50) under `root`, for fast image samples."""
    rs = np.random.RandomState(1)
    for n in names:
        p = root / n
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rs.rand(30, 50, 3) * 255).astype(np.uint8)).save(p)


def _img_sample(sid, media="img.png", question="Describe it."):
    s = {"video" if not media.endswith(".png") else "image": media,
         "conversations": _conv(question, tag="<image>" if media.endswith(".png") else "<video>")}
    if sid is not None:
        s["id"] = sid
    return s


FAST = convert.ConvertConfig(num_frames=2, image_size=8, image_format="png")


def _all_records(out):
    reader = records.RecordReader(out)
    return [reader[i] for i in range(len(reader))]


def test_duplicate_ids_keep_the_first_and_validate_lists_them(tmp_path, capsys):
    _image_media(tmp_path)
    entries = [_img_sample("a", question="first a"), _img_sample("b"), _img_sample("a", question="second a"),
               _img_sample(7), _img_sample("7"), _img_sample(None), _img_sample("a", question="third a")]
    report = convert.convert(entries, str(tmp_path / "out"), media_root=str(tmp_path), num_shards=3,
                             config=FAST, progress=False)
    assert report["written"] == 4 and report["skipped"] == {"duplicate_id": 3}
    assert [(s["index"], s["id"], s["field"]) for s in report["skips"]] == [(2, "a", "id"), (4, "7", "id"),
                                                                            (6, "a", "id")]
    assert "sample #0" in report["skips"][0]["message"]
    recs = _all_records(str(tmp_path / "out"))
    assert [r.sample_id for r in recs] == ["a", "b", "7", "#5"]  # ids unique; the first "a" is kept
    assert "first a" in recs[0].conversations[0]["value"]

    js = tmp_path / "dup.json"
    js.write_text(json.dumps(entries))
    capsys.readouterr()
    assert cli.main(["validate", "--json", str(js)]) == 1
    v = json.loads(capsys.readouterr().out)
    assert v["duplicate_ids"] == {"a": [0, 2, 6], "7": [3, 4]}
    assert v["invalid"] == {"duplicate_id": 3} and v["valid"] == 4
    assert cli.main(["validate", "--json", str(js), "--allow-invalid"]) == 0


def test_media_outside_root_is_skipped_unless_absolute_allowed(tmp_path, capsys):
    root = tmp_path / "root"
    _image_media(root, ["img.png", "sub/in.png"])
    _image_media(tmp_path, ["secret.png"])  # outside the media root, readable
    frames = tmp_path / "frames"  # a frame folder outside the root
    _image_media(frames, [f"{i:05d}.png" for i in range(3)])
    secret = str(tmp_path / "secret.png")
    entries = [_img_sample("ok", "sub/../img.png"),  # normalises inside the root: fine
               _img_sample("dotdot", "../secret.png"),
               _img_sample("abs", secret),
               _img_sample("folder", "sub/../../frames"),
               _img_sample("absfolder", str(frames)),
               _img_sample("back", "sub/../../root/img.png")]  # normalises back inside: fine
    out = str(tmp_path / "out")
    report = convert.convert(entries, out, media_root=str(root), num_shards=1, config=FAST, progress=False)
    assert report["written"] == 2 and report["skipped"] == {"media_outside_root": 4}
    by_id = {s["id"]: s for s in report["skips"]}
    assert by_id["abs"]["field"] == "image" and "is absolute" in by_id["abs"]["message"]
    assert by_id["folder"]["field"] == "video" and "leaves its root" in by_id["folder"]["message"]
    assert [r.sample_id for r in _all_records(out)] == ["ok", "back"]

    allowed = dataclasses.replace(FAST, allow_absolute_media=True)
    rep = convert.convert(entries, str(tmp_path / "abs"), media_root=str(root), num_shards=1, config=allowed,
                          progress=False)
    assert rep["written"] == 4 and rep["skipped"] == {"media_outside_root": 2}  # relative escapes stay refused
    assert sorted(r.sample_id for r in _all_records(str(tmp_path / "abs"))) == ["abs", "absfolder", "back", "ok"]

    # The CLI option, and validate's lexical check (no media root needed).
    js = tmp_path / "media.json"
    js.write_text(json.dumps(entries))
    common = ["--json", str(js), "--media-root", str(root), "--num-shards", "1", "--workers", "0",
              "--num-frames", "2", "--image-size", "8", "--no-progress"]
    assert cli.main(["convert", *common, "--out", str(tmp_path / "c1")]) == 0
    assert json.load(open(tmp_path / "c1" / "media.report.json"))["skipped"] == {"media_outside_root": 4}
    assert cli.main(["convert", *common, "--out", str(tmp_path / "c2"), "--allow-absolute-media"]) == 0
    assert json.load(open(tmp_path / "c2" / "media.report.json"))["skipped"] == {"media_outside_root": 2}
    capsys.readouterr()
    assert cli.main(["validate", "--json", str(js), "--media-root", str(root)]) == 1
    assert json.loads(capsys.readouterr().out)["invalid"] == {"media_outside_root": 4}
    assert cli.main(["validate", "--json", str(js), "--media-root", str(root), "--allow-absolute-media"]) == 1
    assert json.loads(capsys.readouterr().out)["invalid"] == {"media_outside_root": 2}
    assert cli.main(["validate", "--json", str(js)]) == 1  # without a root, climbing out and back counts too
    assert json.loads(capsys.readouterr().out)["invalid"] == {"media_outside_root": 5}


def test_jsonl_bad_lines_are_counted_skips(tmp_path, capsys):
    _image_media(tmp_path)
    good = [json.dumps(_img_sample(f"g{i}")).encode() for i in range(3)]
    js = tmp_path / "data.jsonl"
    js.write_bytes(b"\xef\xbb\xbf" + good[0] + b"\n"  # a byte-order mark is fine
                   + b'{"id": "cut", "image": "img.png", "conv\n'  # truncated line
                   + b"\n"  # blank: ignored
                   + good[1].replace(b"Describe", b"D\xe9crire") + b"\n"  # Latin-1, not UTF-8
                   + good[2] + b"\n")
    entries = inputs.load_entries(str(js))
    assert len(entries) == 4 and [type(e).__name__ for e in entries] == ["dict", "BadLine", "BadLine", "dict"]
    report = convert.convert(entries, str(tmp_path / "out"), media_root=str(tmp_path), num_shards=2, config=FAST,
                             progress=False)
    assert report["written"] == 2 and report["skipped"] == {"bad_json_line": 2}
    s1, s2 = report["skips"]
    assert (s1["index"], s1["field"], s2["index"], s2["field"]) == (1, "line 2", 2, "line 4")
    assert s1["message"].startswith(f"{js}:2: invalid JSON") and s2["message"].startswith(f"{js}:4: not UTF-8")
    assert [r.sample_id for r in _all_records(str(tmp_path / "out"))] == ["g0", "g2"]
    capsys.readouterr()
    assert cli.main(["validate", "--json", str(js)]) == 1
    v = json.loads(capsys.readouterr().out)
    assert v["samples"] == 4 and v["invalid"] == {"bad_json_line": 2}


@pytest.mark.parametrize("content, where", [
    (b'[{"id": "a"},\n {"id": "b",\n  "video": }]', "line 3 column 12"),
    (b'[{"id": "a", "video": "x\xff.mp4"}]', "not UTF-8 at byte 24"),
    (b"[" * 100000, "nested too deeply"),
    (b'{"id": "a"}', "expected a JSON list"),
])
def test_unreadable_json_list_is_one_line_naming_file_and_position(tmp_path, capsys, content, where):
    js = tmp_path / "bad.json"
    js.write_bytes(content)
    with pytest.raises(inputs.InputError, match=where):
        inputs.load_entries(str(js))
    for cmd in (["validate", "--json", str(js)],
                ["convert", "--json", str(js), "--media-root", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--num-shards", "1", "--workers", "0", "--no-progress"]):
        capsys.readouterr()
        assert cli.main(cmd) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(js) in err and where in err and "Traceback" not in err
    capsys.readouterr()
    assert cli.main(["validate", "--json", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_validate_exit_status(tmp_path, capsys):
    js = tmp_path / "v.json"
    js.write_text(json.dumps([_img_sample("ok"), {"id": "bad", "image": "img.png", "conversations": []}]))
    assert cli.main(["validate", "--json", str(js)]) == 1
    assert json.loads(capsys.readouterr().out)["invalid"] == {"bad_conversations": 1}
    assert cli.main(["validate", "--json", str(js), "--allow-invalid"]) == 0
    js.write_text(json.dumps([_img_sample("ok")]))
    assert cli.main(["validate", "--json", str(js)]) == 0


def test_resume_with_changed_input_is_refused(tmp_path, capsys):
    """Shard 0 from one version of the JSON, then a resume after it changed (same sample count):
    mixing would give records of both versions, so the manifest's input hash refuses it."""
    _image_media(tmp_path)
    v1 = [_img_sample(f"s{i}") for i in range(4)]
    v2 = [_img_sample(f"t{i}") for i in range(4)]
    out = str(tmp_path / "out")
    convert.convert(v1, out, media_root=str(tmp_path), num_shards=2, shard_range=(0, 1), config=FAST, progress=False)
    manifest = json.load(open(os.path.join(out, "data.manifest.json")))
    assert manifest["input_sha256"] == inputs.entries_sha256(v1) != inputs.entries_sha256(v2)
    with pytest.raises(inputs.InputError, match="input samples changed"):
        convert.convert(v2, out, media_root=str(tmp_path), num_shards=2, config=FAST, progress=False)
    old = dict(manifest)
    del old["input_sha256"]  # a folder started before the manifest recorded the input
    with open(os.path.join(out, "data.manifest.json"), "w") as f:
        json.dump(old, f)
    with pytest.raises(inputs.InputError, match="did not record its input's hash"):
        convert.convert(v1, out, media_root=str(tmp_path), num_shards=2, config=FAST, progress=False)
    with open(os.path.join(out, "data.manifest.json"), "w") as f:
        json.dump(manifest, f)
    # Frame-key order is data (it orders an object's masks), so reordering keys is a change too.
    assert inputs.entries_sha256([{"a": 1, "b": 2}]) != inputs.entries_sha256([{"b": 2, "a": 1}])
    # The same samples, reformatted on disk, resume fine.
    rep = convert.convert(json.loads(json.dumps(v1, indent=3)), out, media_root=str(tmp_path), num_shards=2,
                          config=FAST, progress=False)
    assert rep["run"]["converted_shards"] == [1] and [r.sample_id for r in _all_records(out)] == [f"s{i}" for i in range(4)]

    # The CLI: one line, exit 2, nothing written.
    js = tmp_path / "data.json"
    js.write_text(json.dumps(v1))
    common = ["--json", str(js), "--media-root", str(tmp_path), "--out", str(tmp_path / "cli"), "--num-shards", "2",
              "--workers", "0", "--num-frames", "2", "--image-size", "8", "--image-format", "png", "--no-progress"]
    assert cli.main(["convert", *common, "--shard-range", "0:1"]) == 0
    js.write_text(json.dumps(v2))
    capsys.readouterr()
    assert cli.main(["convert", *common]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "input samples changed" in err
    assert not glob.glob(str(tmp_path / "cli" / "data-00001-*"))


def test_polygon_far_outside_the_frame_is_skipped_with_its_field(tmp_path):
    _make_media(tmp_path)
    entries = [{"id": "far", "video": "synthetic.mp4", "conversations": _conv("<region>?"),
                "annotation": [{"3": {"segmentation": [[1, 1, 9, 1, 9, 9]]},
                                "5": {"segmentation": [[1, 1, 1e4, 1, 9, 9]]}}]},  # frame is 48x64
               {"id": "ok", "video": "synthetic.mp4", "conversations": _conv("<region>?"),
                "annotation": [{"3": {"segmentation": [[-64, -48, 128, -48, 128, 96]]}}]}]
    report = convert.convert(entries, str(tmp_path / "out"), media_root=str(tmp_path), num_shards=1, workers=0,
                             config=convert.ConvertConfig(num_frames=2, image_size=8), progress=False)
    assert report["written"] == 1 and report["skipped"] == {"polygon_out_of_bounds": 1}
    (skip,) = report["skips"]
    assert (skip["id"], skip["field"]) == ("far", "annotation[0]['5'].segmentation[0]")
    assert "(10000, 1)" in skip["message"] and "48x64 frame" in skip["message"]


def test_truncated_video_is_skipped_not_written_shorter(tmp_path):
    from test_data_video import _faststart_video

    _faststart_video(tmp_path / "v.mp4")
    data = (tmp_path / "v.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) * 2 // 3])
    entries = [{"id": v, "video": f"{v}.mp4", "conversations": _conv("hi")} for v in ("v", "cut")]
    report = convert.convert(entries, str(tmp_path / "out"), media_root=str(tmp_path), num_shards=1, workers=0,
                             config=convert.ConvertConfig(num_frames=4, image_size=8), progress=False)
    assert report["written"] == 1 and report["skipped"] == {"truncated_media": 1}
    assert (report["skips"][0]["id"], report["skips"][0]["field"]) == ("cut", "video")


def _killing_parse(raw, index):
    """Kills the worker process on samples whose id starts with "kill" (as a segfault would)."""
    if str(raw.get("id", "")).startswith("kill"):
        os.kill(os.getpid(), 9)
    return schema.parse_sample(raw, index)


def test_worker_that_dies_is_named_skipped_and_replaced(tmp_path):
    """A sample that kills its worker is skipped as worker_died; every other sample, including
    those in flight in the dead pool, is converted exactly as without workers, and the run ends."""
    import signal

    clip = _make_media(tmp_path)
    syn, _ = _synthetic_entries(clip)
    good = [dict(e, id=f"{e['id']}{j}") for j in range(2) for e in syn[:4]]
    entries = good[:3] + [dict(syn[2], id="kill-a")] + good[3:6] + [dict(syn[2], id="kill-b")] + good[6:]
    cfg = convert.ConvertConfig(num_frames=4, image_size=16, image_format="png")

    def on_alarm(*_):
        raise TimeoutError("the converter hung on a dead worker")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(240)
    try:
        report = convert.convert(entries, str(tmp_path / "out"), media_root=str(tmp_path), num_shards=3, workers=2,
                                 config=cfg, parse=_killing_parse, progress=False, chunksize=2)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert report["skipped"] == {"mask_size_mismatch": 2, "worker_died": 2} and report["shards_done"] == 3
    died = [s for s in report["skips"] if s["reason"] == "worker_died"]
    assert [(s["index"], s["id"], s["field"]) for s in died] == [(3, "kill-a", "<sample>"), (7, "kill-b", "<sample>")]
    # Everything else is byte-identical to an in-process run in which the killers merely fail.
    ref = str(tmp_path / "ref")
    convert.convert(entries, ref, media_root=str(tmp_path), num_shards=3, workers=0, config=cfg,
                    parse=_failing_parse, progress=False)
    got, want = records.RecordReader(str(tmp_path / "out"), parse=False), records.RecordReader(ref, parse=False)
    assert len(got) == len(want) == 6 and [got[i] for i in range(6)] == [want[i] for i in range(6)]


def _failing_parse(raw, index):
    if str(raw.get("id", "")).startswith("kill"):
        raise ValueError("would kill")
    return schema.parse_sample(raw, index)


def test_default_frame_format_is_lossless(tmp_path):
    """Frames are stored as exactly the resized pixels by default (PNG); 'raw' holds the same pixels,
    uncompressed; JPEG stays available and is lossy."""
    clip = _make_media(tmp_path)
    entries = [{"id": "f", "video": clip, "conversations": _conv("hi")}]  # noise frames: JPEG cannot be exact
    assert convert.ConvertConfig().image_format == "png"
    src = V.open_video(str(tmp_path / clip))
    decoded, sizes = {}, {}
    for fmt in ("default", "raw", "jpeg"):
        cfg = convert.ConvertConfig(num_frames=4, image_size=32, **({} if fmt == "default" else {"image_format": fmt}))
        out = str(tmp_path / fmt)
        assert convert.convert(entries, out, media_root=str(tmp_path), num_shards=1, workers=0, config=cfg,
                               progress=False)["written"] == 1
        rec = records.RecordReader(out)[0]
        decoded[fmt], sizes[fmt] = rec.decode_frames(), sum(map(len, rec.frames))
    got = src.get(rec.frame_indices)
    exact = np.stack([V.resize_frame(got[i], 32) for i in rec.frame_indices])
    np.testing.assert_array_equal(decoded["default"], exact)
    np.testing.assert_array_equal(decoded["raw"], exact)
    assert np.abs(decoded["jpeg"].astype(int) - exact).max() > 0
    assert sizes["raw"] == 4 * (len(V.RAW_MAGIC) + 8 + 32 * 32 * 3)
