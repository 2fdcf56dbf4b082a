"""data_pipeline.synthetic (and evaluation.attribute_score): determinism, exact masks, correct answers, official formats, tokenizer, scorer."""

import dataclasses
import functools
import hashlib
import json
import os
import re
import time

import numpy as np
import pytest
from PIL import Image

from data_pipeline import bench_formats, convert, masks, records, schema
from data_pipeline.synthetic import dataset, questions, render, samples, scene, tokenizer
from vrefer_jax.evaluation import attribute_score

CFG = scene.SynthConfig(num_frames=16, size=64, mask_frames=4, question_kinds=tuple(scene.KIND_TYPES))  # every kind


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("syn"))
    t0 = time.perf_counter()
    summary = dataset.generate(out, seed=3, train_videos=24, eval_videos=12, cfg=CFG, vocab_size=600)
    print(f"\ngenerated 36 videos in {time.perf_counter() - t0:.2f}s: {summary}")
    load = lambda name: json.load(open(os.path.join(out, name)))
    return out, load("train.json"), load("bench_q.json"), load("bench_d.json"), load("tracks.json")


def _frames(root, rel):
    d = os.path.join(root, rel)
    return np.stack([np.asarray(Image.open(os.path.join(d, f))) for f in sorted(os.listdir(d))])


def _objects_of(entry, tracks):
    """Tracks of the entry's referred objects, matched by the colour under their masks."""
    frames = _frames_cache(entry["_root"], entry["video"])
    out = []
    for obj in entry["annotation"]:
        key = next(iter(obj))
        m = masks.decode_segmentation(obj[key]["segmentation"], 64, 64)
        rgb = tuple(frames[int(key)][m][0])
        (name,) = [c for c, v in scene.COLOURS.items() if v == rgb]
        (tr,) = [t for t in tracks["videos"][os.path.basename(entry["video"])]["objects"] if t["colour"] == name]
        out.append(tr)
    return out


@functools.lru_cache(maxsize=None)
def _frames_cache(root, rel):
    return _frames(root, rel)


def test_deterministic_by_seed_and_split():
    a = render.make_video(7, "train", 2, CFG)
    b = render.make_video(7, "train", 2, CFG)
    c = render.make_video(8, "train", 2, CFG)
    d = render.make_video(7, "eval", 2, CFG)
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.masks, b.masks)
    assert not np.array_equal(a.frames, c.frames) and not np.array_equal(a.frames, d.frames)
    qa = questions.make_questions(a, np.random.default_rng(0), CFG)
    qb = questions.make_questions(b, np.random.default_rng(0), CFG)
    assert qa == qb


def test_generate_is_byte_identical(tmp_path):
    digests = []
    for run in ("a", "b"):
        out = tmp_path / run
        dataset.generate(str(out), seed=1, train_videos=3, eval_videos=2, cfg=CFG, vocab_size=400)
        h = hashlib.sha256()
        for dirpath, _, files in sorted(os.walk(out)):
            for f in sorted(files):
                if f == "summary.json":  # holds timings
                    continue
                h.update(os.path.relpath(os.path.join(dirpath, f), out).encode())
                h.update(open(os.path.join(dirpath, f), "rb").read())
        digests.append(h.hexdigest())
    assert digests[0] == digests[1]


def test_masks_are_the_visible_pixels():
    for i in range(6):
        v = render.make_video(11, "train", i, scene.SynthConfig(num_frames=12, size=96, max_objects=4))
        n = len(v.tracks)
        assert 2 <= n <= 4 and len({t.colour for t in v.tracks}) == n
        for k, tr in enumerate(v.tracks):
            colour_pixels = (v.frames == np.array(scene.COLOURS[tr.colour], np.uint8)).all(-1)  # [T, H, W]
            assert np.array_equal(colour_pixels, v.masks[k])
            for t in range(0, 12, 5):  # visible = drawn minus whatever later objects cover
                drawn = render.shape_mask(tr.shape, *tr.centres[t], tr.radius, 96)
                later = np.zeros_like(drawn)
                for tr2 in v.tracks[k + 1:]:
                    later |= render.shape_mask(tr2.shape, *tr2.centres[t], tr2.radius, 96)
                assert np.array_equal(v.masks[k, t], drawn & ~later)
        assert not v.masks.any(0).all()  # some background left


def test_rle_annotations_match_png_frames(data):
    root, train, bq, _, _ = data
    for e in train[:20] + bq[:10]:
        frames = _frames_cache(root, e["video"])
        for obj in e["annotation"]:
            colours = set()
            for key, ann in obj.items():
                m = masks.decode_segmentation(ann["segmentation"], 64, 64)
                assert m.sum() >= scene.MIN_VISIBLE
                px = frames[int(key)][m]
                assert (px == px[0]).all()  # one flat colour under the mask
                colours.add(tuple(px[0]))
                # and every pixel of that colour on the frame is in the mask
                assert np.array_equal((frames[int(key)] == px[0]).all(-1), m)
            assert len(colours) == 1


def test_annotated_frames_are_keyframes(data):
    """Training samples carry masks on the `mask_frames` keyframes (where the object is visible);
    eval entries on the `eval_mask_frames` keyframes, `frame_idx` among them when all referred
    objects are visible on one, so single- and multi-frame readings agree with training."""
    _, train, bq, bd, _ = data
    keys = set(samples.keyframes(16, CFG.mask_frames))
    assert keys == {0, 5, 10, 15}
    for e in train:  # plus at most one frame where all referred objects show when no keyframe has them
        for obj in e["annotation"]:
            assert len({int(k) for k in obj} - keys) <= 1 and len(obj) <= CFG.mask_frames + 1
    in_keys = 0
    for e in bq + bd:
        fi = e["frame_idx"]
        for obj in e["annotation"]:
            assert {int(k) for k in obj} <= set(samples.keyframes(16, CFG.eval_mask_frames)) | {fi}
            assert str(fi) in obj  # the single-frame mode's mask
        in_keys += fi in keys
    assert in_keys >= 0.8 * len(bq + bd)
    v = render.make_video(3, "eval", 0, CFG)
    fi, frames = samples._annotated(v, [0], np.random.default_rng(0), 0)  # 0: every frame
    assert frames == list(range(16))
    fi, frames = samples._annotated(v, [0], np.random.default_rng(0), 1)
    assert frames == [fi] and v.masks[0, fi].sum() >= scene.MIN_VISIBLE


def _letter(ans):
    return re.match(r"\((\w)\)", ans).group(1)


def _option(entry):
    return {_letter(o): o[4:] for o in entry["options"]}[_letter(entry["Answer"])]


def test_answers_match_ground_truth(data):
    root, _, bq, _, tracks = data
    seen = set()
    for e in bq:
        e = dict(e, _root=root)
        objs = _objects_of(e, tracks)
        ans, c = _option(e), [np.array(o["centres"]) for o in objs]
        t = e["type"]
        seen.add(t)
        assert e["Question"].count("<region>") == len(e["annotation"]) == len(objs)
        if t == "Basic Questions":
            assert ans.lower() in (objs[0]["colour"], objs[0]["shape"])
            assert ("colour" in e["Question"]) == (ans.lower() == objs[0]["colour"])
        elif t == "Sequential Questions":
            dx, dy = c[0][-1] - c[0][0]
            want = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
            assert ans == f"It moves {want}"
        elif t == "Relationship Questions":
            if "larger" in e["Question"]:
                assert (ans == "Larger") == (objs[0]["radius"] > objs[1]["radius"])
            else:
                d = c[0] - c[1]
                want = {"To the left of it": d[:, 0] < 0, "To the right of it": d[:, 0] > 0,
                        "Above it": d[:, 1] < 0, "Below it": d[:, 1] > 0}[ans]
                assert want.all()
        elif t == "Reasoning Questions" and e["kind"] == "speed":
            sp = [np.linalg.norm(x[-1] - x[0]) for x in c]
            assert ans == ("<object0>" if sp[0] > sp[1] else "<object1>")
        elif t == "Reasoning Questions":  # exit edge: first edge crossed at the mean velocity
            v = (c[0][-1] - c[0][0]) / (len(c[0]) - 1)
            steps = np.linspace(0, 400, 40001)[:, None]
            path = c[0][-1] + steps * v
            first = int(np.argmax(((path < 0) | (path > 64)).any(axis=1)))
            x, y = path[first]
            want = "left" if x < 0 else "right" if x > 64 else "top" if y < 0 else "bottom"
            assert ans == f"The {want} edge"
        else:
            T = len(c[0])
            p = np.clip(c[0][-1] + (c[0][-1] - c[0][0]) / (T - 1) * T / 4, 0, 64)
            row, col = ("top" if p[1] < 32 else "bottom"), ("left" if p[0] < 32 else "right")
            assert ans == f"The {row}-{col} quarter"
        assert len(e["options"]) == len(set(e["options"])) >= 2
    assert seen == set(scene.QUESTION_TYPES)


def test_official_formats_parse_and_convert(data, tmp_path):
    root, train, bq, bd, _ = data
    for i, s in enumerate(train):
        sample = schema.parse_sample(s, i)
        n_regions = sum(t["value"].count("<region>") for t in s["conversations"])
        assert n_regions == len(sample.objects) >= 1
    for mode in bench_formats.MODES:
        for i, e in enumerate(bq):
            bench_formats.parse_bench_q(e, i, mode=mode)
        for i, e in enumerate(bd):
            bench_formats.parse_bench_d(e, i, mode=mode)
    cfg = convert.ConvertConfig(num_frames=8, image_size=32, image_format="png")
    rep = convert.convert(train[:6], str(tmp_path / "tr"), media_root=root, num_shards=2, config=cfg, progress=False)
    assert rep["written"] == 6 and rep["num_skipped"] == 0, rep
    parse = functools.partial(bench_formats.parse_bench_q, mode="single")
    rep = convert.convert(bq[:5], str(tmp_path / "bq"), media_root=root, num_shards=1, config=cfg, parse=parse,
                          progress=False)
    assert rep["written"] == 5 and rep["num_skipped"] == 0, rep
    r = records.RecordReader(str(tmp_path / "bq"))[0]
    assert r.num_source_frames == CFG.num_frames and len(r.objects) == len(bq[0]["annotation"])


def test_multi_round_conversations(tmp_path):
    """turns_per_sample > 1 packs a video's questions and captions into conversations: the same
    turns as one-per-sample (same seed), `<video>` only in the first human turn, one annotation per
    `<region>` in order, and they convert and tokenise with every reply supervised."""
    from data_pipeline.loader import LoaderConfig, SampleTransform
    from vrefer_jax.text.tokenizer import load_tokenizer

    one = samples.train_samples(render.make_video(5, "train", 0, CFG), "videos/train/v", np.random.default_rng(1), CFG)
    cfg3 = dataclasses.replace(CFG, turns_per_sample=3)
    multi = samples.train_samples(render.make_video(5, "train", 0, cfg3), "videos/train/v", np.random.default_rng(1), cfg3)
    assert [len(m["conversations"]) // 2 for m in multi] == [3, 3, len(one) - 6][: len(multi)]
    pairs = lambda ss: sorted((c[0]["value"].removeprefix("<video>\n"), c[1]["value"])
                              for s_ in ss for c in zip(s_["conversations"][::2], s_["conversations"][1::2]))
    assert pairs(one) == pairs(multi)  # same turns, regrouped
    for i, m in enumerate(multi):
        humans = [t["value"] for t in m["conversations"][::2]]
        assert humans[0].startswith("<video>\n") and not any("<video>" in h for h in humans[1:])
        assert sum(h.count("<region>") for h in humans) == len(m["annotation"]) == len(schema.parse_sample(m, i).objects)
    root = str(tmp_path)
    dataset.generate(root, seed=5, train_videos=2, eval_videos=1, cfg=cfg3, vocab_size=600)
    train = json.load(open(os.path.join(root, "train.json")))
    rep = convert.convert(train, str(tmp_path / "rec"), media_root=root, num_shards=1, progress=False,
                          config=convert.ConvertConfig(num_frames=4, image_size=28, image_format="png"))
    assert rep["written"] == len(train) and rep["num_skipped"] == 0
    tok = load_tokenizer(os.path.join(root, "tokenizer.json"))
    lc = LoaderConfig(image_size=28, grid=4, num_frames=4, seq_len=512, max_region_frames=8, max_objects=10,
                      max_object_frames=5, batch_size=1, pad_token_id=0)
    ex = SampleTransform(lc, tok)(records.RecordReader(str(tmp_path / "rec"))[0])
    supervised = tok.decode([int(t) for t in ex["labels"] if t >= 0])
    first = train[0]
    for t in first["conversations"][1::2]:
        assert t["value"] in supervised
    assert int(ex["object_valid"].sum()) == len(first["annotation"])


def test_mp4_media_converts(tmp_path):
    cfg = scene.SynthConfig(num_frames=12, size=64, media="mp4", mask_frames=1)
    dataset.generate(str(tmp_path), seed=2, train_videos=2, eval_videos=0, cfg=cfg, tokenizer=False)
    train = json.load(open(tmp_path / "train.json"))
    assert all(len(obj) == 1 for s in train for obj in s["annotation"])  # single-frame mode
    rep = convert.convert(train, str(tmp_path / "rec"), media_root=str(tmp_path), num_shards=1,
                          config=convert.ConvertConfig(num_frames=8, image_size=0), progress=False)
    assert rep["num_skipped"] == 0 and rep["written"] == len(train)


def test_tokenizer(data):
    from vrefer_jax.text import HFTokenizer

    root, train, _, _, _ = data
    tok = HFTokenizer.from_file(root)
    assert tok.eos_id == tok.token_to_id("<|im_end|>") and tok.pad_id == tok.token_to_id("<|endoftext|>")
    text = train[0]["conversations"][0]["value"].split("\n", 1)[1]
    ids = tok.encode(text)
    assert ids.count(tok.region_id) == text.count("<region>") >= 1
    for sp in tokenizer.SPECIAL_TOKENS:
        assert tok.encode(sp) == [tok.token_to_id(sp)]
    assert tok.decode(ids, skip_special_tokens=False) == text
    ratio = len(ids) / len(text.encode())
    print(f"vocab {tok.vocab_size}, {len(ids)} tokens for {len(text)} bytes ({ratio:.2f} tokens/byte)")
    assert tok.vocab_size <= 600 and ratio < 0.35  # trained merges, not raw bytes


def test_score_description(data):
    _, _, _, bd, _ = data
    for e in bd:
        assert attribute_score.score_description(e["caption"], e["attributes"])["score"] == 1.0, e["caption"]
    gt = {"colour": "red", "shape": "circle", "motion": "left"}
    assert attribute_score.score_description("A red circle moving left.", gt)["score"] == 1.0
    detailed = "A small red disc that moves towards the left, from the top-right."
    assert attribute_score.score_description(detailed, gt)["score"] == 1.0
    wrong = attribute_score.score_description("A blue circle moving left.", gt)
    assert wrong["colour"] == 0.0 and wrong["score"] == pytest.approx(2 / 3)
    assert attribute_score.score_description("A red or blue circle moving left.", gt)["colour"] == 0.0
    assert attribute_score.score_description("A red circle moving right, near the left edge.", gt)["motion"] == 0.0
    assert attribute_score.score_description("", gt)["score"] == 0.0
    agg = attribute_score.score_descriptions([e["caption"] for e in bd], bd)
    assert agg["score"] == 1.0


def test_cli_and_config_errors(tmp_path, capsys):
    assert dataset.main(["--out", str(tmp_path), "--train-videos", "1", "--eval-videos", "1", "--no-tokenizer",
                     "--num-frames", "32", "--size", "128"]) == 0
    assert json.loads(capsys.readouterr().out)["train_videos"] == 1
    assert len(os.listdir(tmp_path / "videos" / "train" / "train_000000")) == 32
    assert dataset.main(["--out", str(tmp_path / "k"), "--train-videos", "2", "--eval-videos", "2", "--no-tokenizer",
                     "--question-kinds", "shape, size", "--captions-per-video", "0"]) == 0
    capsys.readouterr()
    train = json.load(open(tmp_path / "k" / "train.json"))
    assert {s["type"] for s in train} <= {"Basic Questions", "Relationship Questions"} and train
    with pytest.raises(ValueError):
        dataset.main(["--out", str(tmp_path / "x"), "--question-kinds", "hue"])
    with pytest.raises(ValueError):
        scene.SynthConfig(num_frames=33)
    with pytest.raises(ValueError):
        scene.SynthConfig(size=256)
    for bad in (dict(question_kinds=("hue",)), dict(question_kinds=()), dict(travel=(0.5, 0.2)),
                dict(min_speed_ratio=0.5)):
        with pytest.raises(ValueError):
            scene.SynthConfig(**bad)


def test_question_kinds(data):
    """Every Bench-Q entry names what it asks (`kind`), consistent with its type and wording."""
    _, _, bq, _, _ = data
    words = {"colour": "What colour", "shape": "What shape", "direction": "In which direction",
             "position": "relative to", "size": "larger or smaller", "speed": "moves faster",
             "exit edge": "which edge", "future position": "which part of the frame"}
    assert set(words) == set(scene.KIND_TYPES)
    for e in bq:
        assert words[e["kind"]] in e["Question"], e
        assert e["type"] == scene.KIND_TYPES[e["kind"]], e
    assert {"colour", "direction", "future position"} <= {e["kind"] for e in bq}


def test_question_kinds_select_what_is_asked():
    """`question_kinds` decides what is asked (a type with none of its kinds is not asked);
    `min_speed_ratio` and `travel` shape the speed questions and the tracks."""
    default = scene.SynthConfig()
    assert set(default.question_kinds) == set(scene.KIND_TYPES) - {"shape", "size", "speed"}
    only = scene.SynthConfig(question_kinds=("shape", "speed"), min_speed_ratio=2.0, travel=(0.4, 0.9))
    kinds, types = set(), set()
    for i in range(30):
        v = render.make_video(4, "train", i, only)
        for tr in v.tracks:  # travel share of the free span (clipped start keeps it exact)
            free = 64 - 2 * (tr.radius + 1)
            assert 0.4 - 1e-6 <= tr.speed * 15 / free <= 0.9 + 1e-6
        for q in questions.make_questions(v, np.random.default_rng(i), only):
            kinds.add(q["kind"])
            types.add(q["type"])
            if q["kind"] == "speed":
                sp = sorted(v.tracks[k].speed for k in q["objects"])
                assert sp[1] / sp[0] >= 2.0
    assert kinds == {"shape", "speed"} and types == {"Basic Questions", "Reasoning Questions"}


def test_named_questions_and_scene_tint():
    """`named_questions` repeats a question naming its objects by colour (no region, no mask),
    with the same answer; `scene_tint` casts red rightwards and blue downwards over the background
    (and the objects with `tint_objects`); both off keeps the default videos and turns."""
    base = dataclasses.replace(CFG, turns_per_sample=1)
    named = dataclasses.replace(base, named_questions=1.0)
    video = render.make_video(7, "train", 0, named)
    plain = samples.train_samples(render.make_video(7, "train", 0, base), "v", np.random.default_rng(2), base)
    both = samples.train_samples(video, "v", np.random.default_rng(2), named)
    by_name = [s for s in both if not s["annotation"]]
    assert by_name and len(both) == len(plain) + len(by_name)
    colours = {t.colour for t in video.tracks}
    for s in by_name:
        q, a = s["conversations"][0]["value"], s["conversations"][1]["value"]
        assert "<region>" not in q and "What colour" not in q
        names = re.findall(r"the (\w+) object", q)
        assert names and set(names) <= colours
        # the same question by mask is in the set, with the same answer
        twin = [p for p in both if p["annotation"] and p["conversations"][1]["value"] == a
                and re.sub(r"<object\d>\[?<region>\]?", "X", p["conversations"][0]["value"]) == re.sub(r"the \w+ object", "X", q)]
        assert twin
    with pytest.raises(ValueError, match="named_questions"):
        scene.SynthConfig(named_questions=1.5)
    flat = render.make_video(7, "train", 0, base).frames[0].astype(int)
    tinted = render.make_video(7, "train", 0, dataclasses.replace(base, scene_tint=40.0)).frames[0].astype(int)
    bg = ~render.make_video(7, "train", 0, base).masks[:, 0].any(0)
    d = tinted - flat
    assert np.all(d[..., 1][bg] == 0)  # green untouched
    left, right = d[:, :8, 0][bg[:, :8]], d[:, -8:, 0][bg[:, -8:]]
    top, bottom = d[:8, :, 2][bg[:8]], d[-8:, :, 2][bg[-8:]]
    assert left.mean() < -25 and right.mean() > 25 and top.mean() < -25 and bottom.mean() > 25
    # `tint_objects`: the same cast on the objects' own pixels (background pixels as before, up to the
    # order of noise and rounding); without it an object keeps its colour exactly
    video = render.make_video(7, "train", 0, base)
    lit = render.make_video(7, "train", 0, dataclasses.replace(base, scene_tint=40.0, tint_objects=True))
    assert np.array_equal(lit.masks, video.masks)
    obj = video.masks[:, 0].any(0)
    assert np.array_equal(tinted[obj], flat[obj])
    lit_d = lit.frames[0].astype(int) - flat
    S = flat.shape[1]
    expect_r = np.rint(40.0 * ((np.arange(S) + 0.5) / S * 2 - 1))
    cols = np.nonzero(obj)[1]
    rows = np.nonzero(obj)[0]
    unclipped = (flat[obj][:, 0] + expect_r[cols] >= 0) & (flat[obj][:, 0] + expect_r[cols] <= 255)
    assert np.abs(lit_d[obj][:, 0] - expect_r[cols])[unclipped].max() <= 1
    assert np.all(lit_d[obj][:, 1] == 0)
    assert np.corrcoef(lit_d[obj][:, 2], rows)[0, 1] > 0.9 or np.ptp(rows) == 0
    assert np.abs(lit_d[..., 0][bg] - d[..., 0][bg]).max() <= 1


def test_vl3_bench_d_prompt_before_the_video():
    """With the VRVL3 protocol a conversation opening with the Bench-D prompt has it before
    `<video>`, as VRVL3's Bench-D script asks (`bench_formats.parse_bench_d`); every other first
    turn, and every VideoRefer-7B one, starts with `<video>`."""
    from data_pipeline.bench_formats import BENCH_D_PROMPT, VL3_BENCH_D_PROMPT

    seen = {"videorefer": 0, "vl3": 0}
    for protocol in seen:
        cfg = dataclasses.replace(CFG, turns_per_sample=1, prompt_protocol=protocol)
        for i in range(3):
            for s in samples.train_samples(render.make_video(7, "train", i, cfg), "v", np.random.default_rng(i), cfg):
                first = s["conversations"][0]["value"]
                assert first.count("<video>") == 1
                if protocol == "vl3" and first.startswith(VL3_BENCH_D_PROMPT):
                    assert first == VL3_BENCH_D_PROMPT + "\n<video>"
                    seen[protocol] += 1
                else:
                    assert first.startswith("<video>\n"), first
                    seen[protocol] += first == "<video>\n" + BENCH_D_PROMPT
    assert seen == {"videorefer": 3, "vl3": 3}
