"""data_pipeline.loader: contract batches, pixel/mask semantics, caps (incl. the expanded length and
skips at the end of a stream), shuffle/shard, resume, Orbax, mixtures, convert -> loader end to end
('pad' aspect, original-resolution records)."""

import dataclasses
import json
import os
import re

import av
import numpy as np
import pytest
from absl import flags
from PIL import Image

from data_helpers import box as _box, conv as _conv, rle as _rle, save_tiny_tokenizer, tiny_record, write_records
from data_pipeline import convert, loader, records, video as V
from data_pipeline import masks as masks_lib
from vrefer_jax import batch as batch_lib
from vrefer_jax import distributed
from vrefer_jax.config import IGNORE_INDEX, model_config_from_gin
from vrefer_jax.models.mask_ops import resize_masks_np
from vrefer_jax.text import HFTokenizer, build_training_example

flags.FLAGS.mark_as_parsed()
ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return HFTokenizer.from_file(save_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def mcfg(tok):
    return model_config_from_gin([os.path.join(ROOT, "configs/models/tiny.gin")],
                                 [f"ModelConfig.region_token_id = {tok.region_id}"])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Converter output over a synthetic mp4, an image and a text-only sample (PNG: exact pixels)."""
    root = tmp_path_factory.mktemp("media")
    with av.open(str(root / "v.mp4"), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(20):
            img = np.zeros((48, 64, 3), np.uint8)
            img[..., 0], img[..., 1] = 10 * i, np.arange(64)[None] * 3
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    Image.fromarray((np.random.RandomState(0).rand(30, 50, 3) * 255).astype(np.uint8)).save(root / "img.png")
    m1, m2, mi = _box(48, 64, 5, 10, 30, 40), _box(48, 64, 20, 30, 48, 64), _box(30, 50, 2, 3, 20, 25)
    entries = [
        {"id": "two", "video": "v.mp4", "conversations": _conv("Compare <region> and <region>.", "Same."),
         "annotation": [{"7": {"segmentation": _rle(m1)}, "2": {"segmentation": _rle(m1)}},
                        {"12": {"segmentation": _rle(m2)}}]},
        {"id": "img", "image": "img.png", "conversations": _conv("What is <region>?", "A box.", "<image>"),
         "annotation": [{"0": {"segmentation": _rle(mi)}}]},
        {"id": "txt", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {"id": "three", "video": "v.mp4", "conversations": _conv("<region> <region> <region>?"),
         "annotation": [{"1": {"segmentation": _rle(m1)}}, {"2": {"segmentation": _rle(m2)}},
                        {"3": {"segmentation": _rle(m1)}}]},
    ]
    cfg = convert.ConvertConfig(num_frames=4, image_size=30, image_format="png", allow_text_only=True)
    out = str(root / "out")
    report = convert.convert(entries, out, media_root=str(root), num_shards=1, workers=0, config=cfg,
                             source="t.json", progress=False)
    assert report["written"] == 4, report
    return out, {"two": (m1, m2), "img": mi}


def _cfg(mcfg, **kw):
    base = dict(batch_size=2, seq_len=64, max_region_frames=3, max_objects=3, max_object_frames=2,
                shuffle=False, num_epochs=1, num_shards=1, shard_index=0)
    base.update(kw)
    return loader.LoaderConfig.for_model(mcfg, **base)


def test_contract_pixels_masks_tokens(converted, tok, mcfg):
    out, ref = converted
    cfg = _cfg(mcfg)
    it = loader.make_loader(out, cfg, tok)
    batches = list(it)
    assert len(batches) == 2
    recs = {r.sample_id: r for r in records.RecordReader(out)}
    by_id = {}
    T, S, g = mcfg.num_frames, mcfg.vision.image_size, mcfg.vision.grid
    for b in batches:
        shapes = {k: (v.shape, v.dtype) for k, v in b.items() if k != "sample_ids"}
        assert shapes == {
            "input_ids": ((2, 64), np.int32), "labels": ((2, 64), np.int32), "segment_ids": ((2, 64), np.int32),
            "frames": ((2, T, S, S, 3), np.float32), "region_frames": ((2, 3, S, S, 3), np.float32),
            "object_frames": ((2, 3, 2), np.int32), "object_masks": ((2, 3, 2, g, g), np.bool_),
            "object_valid": ((2, 3), np.bool_)}
        out_len = 64 + batch_lib.model_video_tokens(mcfg) + 3 * 4
        batch_lib.validate(mcfg, b, out_len, sample_ids=list(b["sample_ids"]))
        for i, sid in enumerate(b["sample_ids"]):
            by_id[str(sid)] = {k: v[i] for k, v in b.items()}
    assert sorted(by_id) == ["img", "three", "two", "txt"]

    # Pixels: identical to transformers' SiglipImageProcessor on the stored frames (exact).
    from transformers import SiglipImageProcessor

    proc = SiglipImageProcessor(do_resize=False, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    two = by_id["two"]
    raw = recs["two"].decode_frames()
    hf = proc(list(raw), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    err = np.abs(two["frames"] - hf).max()
    print(f"\nframes vs SiglipImageProcessor: max abs {err:.3g}")
    assert err == 0
    np.testing.assert_array_equal(two["region_frames"][:3], V.SIGLIP_LUT[recs["two"].decode_region_frames()])
    # Masks: object k's masks in its key order, on the grid, `> 0` of the PyTorch-exact bilinear resize.
    m1, m2 = ref["two"]
    assert recs["two"].region_frame_indices == (2, 7, 12)
    np.testing.assert_array_equal(two["object_frames"], [[1, 0], [2, -1], [-1, -1]])
    np.testing.assert_array_equal(two["object_valid"], [True, True, False])
    np.testing.assert_array_equal(two["object_masks"][0, 0], resize_masks_np(m1, g, g) > 0)
    np.testing.assert_array_equal(two["object_masks"][1, 0], resize_masks_np(m2, g, g) > 0)
    assert not two["object_masks"][1, 1].any() and not two["object_masks"][2].any()
    # Tokens: build_training_example, right padded; segment ids mark real tokens.
    ids, labels = build_training_example(tok, recs["two"].conversations, "<video>")
    n = len(ids)
    np.testing.assert_array_equal(two["input_ids"][:n], ids)
    np.testing.assert_array_equal(two["labels"][:n], labels)
    assert (two["input_ids"][n:] == mcfg.pad_token_id).all() and (two["labels"][n:] == IGNORE_INDEX).all()
    assert two["segment_ids"][:n].all() and not two["segment_ids"][n:].any()
    # Image: repeated T times, region frame = the image. Text only: zero frames, no objects.
    im = by_id["img"]
    assert all((im["frames"][t] == im["frames"][0]).all() for t in range(T))
    np.testing.assert_array_equal(im["region_frames"][0], im["frames"][0])
    np.testing.assert_array_equal(im["object_masks"][0, 0], resize_masks_np(ref["img"], g, g) > 0)
    assert -200 in im["input_ids"]
    tx = by_id["txt"]
    assert not tx["frames"].any() and not tx["region_frames"].any() and not tx["object_valid"].any()
    assert (tx["input_ids"] >= 0).all()


def test_caps_error_and_skip(converted, tok, mcfg):
    out, _ = converted
    with pytest.raises(loader.CapExceededError, match=r"sample three: objects needs 3 but the cap is 2"):
        list(loader.make_loader(out, _cfg(mcfg, max_objects=2), tok))
    with pytest.raises(loader.CapExceededError, match=r"input_ids needs \d+ but the cap is 20"):
        list(loader.make_loader(out, _cfg(mcfg, seq_len=20), tok))
    it = loader.make_loader(out, _cfg(mcfg, batch_size=1, max_objects=2, max_object_frames=1,
                                      overflow={"objects": "skip", "object_frames": "skip"}), tok)
    got = [str(b["sample_ids"][0]) for b in it]
    assert sorted(got) == ["img", "txt"]
    # records in order two, img, txt, three: "three" comes after the last example and is counted too
    assert it.skipped == {"input_ids": 0, "region_frames": 0, "objects": 1, "object_frames": 1, "expanded_len": 0}
    with pytest.raises(ValueError, match="unknown caps"):
        loader.LoaderConfig(batch_size=1, seq_len=8, overflow={"tokens": "skip"})


# ----------------------------------------------------------------------------- many small records


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """Two record sets (37 and 11 samples) of tiny 8x8 videos with one object each, written directly."""
    root = tmp_path_factory.mktemp("many")
    paths = []
    for name, n, shards in (("a", 37, 3), ("b", 11, 1)):
        d = root / name
        d.mkdir()
        for s in range(shards):
            write_records(str(d / f"{name}-{s}.tfrecord"),
                          [tiny_record(f"{name}{i}", i, name, question=f"What is <region> number {i}?")
                           for i in range(s, n, shards)])
        paths.append(str(d))
    return paths


def _ids(it, n=None):
    """Sample ids of the next n batches (all remaining with n=None), consuming no more than n."""
    out = []
    while n is None or len(out) < n:
        try:
            b = next(it)
        except StopIteration:
            break
        out.append([str(s) for s in b["sample_ids"]])
    return out


def _small(mcfg, **kw):
    base = dict(batch_size=3, seq_len=64, image_size=8, grid=4, num_frames=4, max_region_frames=1,
                max_objects=1, max_object_frames=1, seed=7, num_epochs=2, num_shards=1, shard_index=0)
    base.update(kw)
    return loader.LoaderConfig.for_model(mcfg, **base)


def test_shuffle_shard_epochs(many, tok, mcfg):
    a = many[0]
    full = sum(_ids(loader.make_loader(a, _small(mcfg), tok)), [])
    assert len(full) == 72  # 74 drawn, batch remainder dropped
    first, second = full[:37], sum(_ids(loader.make_loader(a, _small(mcfg, drop_remainder=False), tok)), [])[37:]
    assert sorted(first) == sorted(second) == sorted(f"a{i}" for i in range(37)) and first != second
    assert full == sum(_ids(loader.make_loader(a, _small(mcfg), tok)), [])  # deterministic
    assert full != sum(_ids(loader.make_loader(a, _small(mcfg, seed=8), tok)), [])
    # Three processes: disjoint, together the global shuffled stream (74 -> 72 = equal lengths).
    shards = [sum(_ids(loader.make_loader(a, _small(mcfg, batch_size=1, num_shards=3, shard_index=i), tok)), [])
              for i in range(3)]
    assert [len(s) for s in shards] == [24, 24, 24]
    glob_ = sum(_ids(loader.make_loader(a, _small(mcfg, batch_size=1), tok)), [])
    assert [x for k in range(24) for x in (shards[0][k], shards[1][k], shards[2][k])] == glob_[:72]


def test_resume_exact_in_process_and_workers(many, tok, mcfg):
    a = many[0]
    for workers in (0, 2):
        cfg = _small(mcfg, worker_count=workers)
        ref = _ids(loader.make_loader(a, cfg, tok))
        it = loader.make_loader(a, cfg, tok)
        head = _ids(it, 5)
        state = json.loads(json.dumps(it.get_state()))
        it.close()
        it2 = loader.make_loader(a, cfg, tok)
        it2.set_state(state)
        tail = _ids(it2)
        it2.close()
        assert head + tail == ref, workers
        print(f"\nresume with {workers} workers: {len(head)} + {len(tail)} batches == {len(ref)}")


def test_orbax_checkpoint_and_mixture(many, tok, mcfg, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    cfg = _small(mcfg, batch_size=4, num_epochs=None)
    it = loader.make_loader(many, cfg, tok, weights=[0.75, 0.25])
    head = _ids(it, 50)
    flat = sum(head, [])
    frac_b = sum(x.startswith("b") for x in flat) / len(flat)
    print(f"\nmixture 0.75/0.25: fraction of b = {frac_b:.3f} over {len(flat)} samples")
    assert abs(frac_b - 0.25) < 0.03
    # every b sample seen before any repeats (b is shuffled per epoch, 11 samples)
    bs = [x for x in flat if x.startswith("b")]
    assert sorted(bs[:11]) == sorted(f"b{i}" for i in range(11))

    mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"))
    mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    after = _ids(it, 6)
    it2 = loader.make_loader(many, cfg, tok, weights=[0.75, 0.25])
    mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
    assert _ids(it2, 6) == after


def test_fast_paths_are_exact():
    x = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(V.siglip_normalize(x), V.SIGLIP_LUT)
    rs = np.random.RandomState(0)
    worst = 0
    for h, w, g in [(720, 1280, 27), (48, 64, 4), (30, 50, 4), (27, 27, 27), (5, 9, 27), (481, 853, 27), (30, 30, 4)]:
        m = rs.rand(6, h, w) > 0.999  # sparse single pixels: the hardest case for `> 0`
        m[0] = False
        m[1, h // 3: h // 3 + 2, w // 4: w // 4 + 3] = True
        m[2] = rs.rand(h, w) > 0.5
        ref = resize_masks_np(m, g, g) > 0
        got = masks_lib.grid_masks(m, g)
        np.testing.assert_array_equal(got, ref, err_msg=f"{h}x{w}->{g}")
        worst = max(worst, int((got != ref).sum()))
    print(f"\ngrid_masks vs resize_masks_np > 0: {worst} differing cells")
    sq = masks_lib.pad_mask_to_square(np.ones((2, 5), bool))  # like expand2square: top = (5 - 2) // 2
    np.testing.assert_array_equal(sq.sum(1), [0, 5, 5, 0, 0])
    np.testing.assert_array_equal(masks_lib.pad_mask_to_square(np.ones((5, 2), bool)).sum(0), [0, 5, 5, 0, 0])


def test_to_global_on_mesh(converted, tok, mcfg):
    import jax
    from jax.sharding import Mesh

    out, _ = converted
    b = next(loader.make_loader(out, _cfg(mcfg, batch_size=4), tok))
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    g = distributed.to_global(b, mesh)
    assert g["frames"].shape == b["frames"].shape and len(g["frames"].sharding.device_set) == 4
    np.testing.assert_array_equal(np.asarray(g["object_masks"]), b["object_masks"])
    assert list(g["sample_ids"]) == list(b["sample_ids"])


# ----------------------------------------------------------------------------- caps: end of stream, expanded length


@pytest.fixture(scope="module")
def skippy(tmp_path_factory):
    """Nine records in order; s2, s7, s8 have two objects, s5 one object with two masks."""
    d = tmp_path_factory.mktemp("skippy")
    spec = {2: (1, 1), 5: (2,), 7: (1, 1), 8: (1, 1)}
    write_records(str(d / "k.tfrecord"), [tiny_record(f"s{i}", i, masks_per_object=spec.get(i, (1,)))
                                          for i in range(9)])
    return str(d)


def test_skips_at_the_end_of_the_stream_are_counted(skippy, tok, mcfg):
    cfg = _small(mcfg, batch_size=2, num_epochs=1, shuffle=False, overflow={"objects": "skip", "object_frames": "skip"})
    want = dict(dict.fromkeys(loader.CAPS, 0), objects=3, object_frames=1)
    # kept s0 s1 | s3 s4 | s6 (the dropped remainder); s2 skipped inside, s5 before s6, s7 s8 after it
    it = loader.make_loader(skippy, cfg, tok)
    assert _ids(it) == [["s0", "s1"], ["s3", "s4"]] and it.skipped == want
    assert _ids(it) == [] and it.skipped == want  # exhausted: stays so, nothing counted twice
    # The totals are in the state once the stream has ended ...
    end = json.loads(json.dumps(it.get_state()))
    assert end["skipped"] == want
    it2 = loader.make_loader(skippy, cfg, tok)
    it2.set_state(end)
    assert _ids(it2) == [] and it2.skipped == want
    # ... and a resume mid-stream neither loses nor repeats a count.
    it3 = loader.make_loader(skippy, cfg, tok)
    head = _ids(it3, 1)
    mid = json.loads(json.dumps(it3.get_state()))
    assert mid["skipped"] == dict.fromkeys(loader.CAPS, 0)
    it4 = loader.make_loader(skippy, cfg, tok)
    it4.set_state(mid)
    assert head + _ids(it4) == [["s0", "s1"], ["s3", "s4"]] and it4.skipped == want
    # Keeping the remainder: the last batch carries the skips before and after it.
    it5 = loader.make_loader(skippy, dataclasses.replace(cfg, drop_remainder=False), tok)
    assert _ids(it5) == [["s0", "s1"], ["s3", "s4"], ["s6"]] and it5.skipped == want
    # Grain worker processes: each worker's stream ends with its own counts-only batch.
    it6 = loader.make_loader(skippy, dataclasses.replace(cfg, worker_count=2), tok)
    got = _ids(it6)
    it6.close()
    assert sorted(sum(got, [])) == ["s0", "s1", "s3", "s4"] and it6.skipped == want


def _validate_worst(m, b) -> int:
    """`videorefer.validate`'s worst-case expanded length of a one-sample batch (its error at out_len 0)."""
    with pytest.raises(batch_lib.BatchError, match=r"expanded length up to \d+") as e:
        batch_lib.validate(m, b, 0, sample_ids=list(b["sample_ids"]))
    return int(re.search(r"up to (\d+)", str(e.value)).group(1))


def test_expanded_len_cap(converted, tok, mcfg):
    out, _ = converted
    assert loader.CAPS == ("input_ids", "region_frames", "objects", "object_frames", "expanded_len")
    with pytest.raises(ValueError, match="needs num_video_tokens and region_tokens_per_object"):
        loader.LoaderConfig(batch_size=1, seq_len=8, max_expanded_len=100)
    rec = {r.sample_id: r for r in records.RecordReader(out)}["two"]  # objects with 2 and 1 masks
    ids, _ = build_training_example(tok, rec.conversations, "<video>")
    m1 = model_config_from_gin([os.path.join(ROOT, "configs/models/tiny.gin")],
                               [f"ModelConfig.region_token_id = {tok.region_id}",
                                "ObjectEncoderConfig.region_token_num = 1"])
    for m, rtn in ((mcfg, 4), (m1, 1)):
        base = _cfg(m, batch_size=1)
        nvt = batch_lib.model_video_tokens(m)
        assert (base.num_video_tokens, base.region_tokens_per_object, base.max_expanded_len) == (nvt, rtn, None)
        assert _cfg(m, num_frames=2).num_video_tokens == batch_lib.model_video_tokens(m, 2)
        # The loader's bound is validate's, sample by sample (order: two, img, txt, three).
        worst = {str(b["sample_ids"][0]): _validate_worst(m, b) for b in loader.make_loader(out, base, tok)}
        assert list(worst) == ["two", "img", "txt", "three"]
        assert worst["two"] == len(ids) - 1 + nvt + min(rtn, 2) + min(rtn, 1) - 2
        print(f"\nregion_token_num {rtn}: expanded-length bounds {worst} ({nvt} video tokens)")
        cap = worst["three"]  # "two" and "img" (longer texts, fewer objects) are over it
        assert worst["txt"] < cap < min(worst["two"], worst["img"])
        with pytest.raises(loader.CapExceededError,
                           match=rf"sample two: expanded_len needs {worst['two']} but the cap is {cap}\b"):
            list(loader.make_loader(out, dataclasses.replace(base, max_expanded_len=cap), tok))
        skip = dataclasses.replace(base, max_expanded_len=cap, overflow={"expanded_len": "skip"})
        it = loader.make_loader(out, skip, tok)
        assert [str(b["sample_ids"][0]) for b in it] == ["txt", "three"]
        assert it.skipped == dict(dict.fromkeys(loader.CAPS, 0), expanded_len=2)
        at_bound = dataclasses.replace(base, max_expanded_len=max(worst.values()))  # the bound itself fits
        assert len(list(loader.make_loader(out, at_bound, tok))) == 4


# ----------------------------------------------------------------------------- convert -> loader, end to end


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A non-square 48x64 PNG frame folder (12 frames, dark smooth background) with a white box
    exactly on the object's mask, and a function converting one sample of it with a ConvertConfig."""
    root = tmp_path_factory.mktemp("wide")
    (root / "clip").mkdir()
    mask = _box(48, 64, 8, 16, 24, 40)
    yy, xx = np.mgrid[:48, :64]
    for i in range(12):
        img = np.stack([(xx + 2 * i) % 64, yy, np.full_like(xx, 30)], -1).astype(np.uint8)
        img[mask] = 255
        Image.fromarray(img).save(root / "clip" / f"{i:05d}.png")
    entries = [{"id": "wide", "video": "clip", "conversations": _conv("What is <region>?"),
                "annotation": [{"3": {"segmentation": _rle(mask)}, "9": {"segmentation": _rle(mask)}}]}]

    def conv(name, **kw):
        out = str(root / name)
        report = convert.convert(entries, out, media_root=str(root), num_shards=1, workers=0, progress=False,
                                 config=convert.ConvertConfig(num_frames=4, **kw))
        assert report["written"] == 1, report
        return out

    return root, mask, conv


def _one(out, cfg, tok):
    (b,) = list(loader.make_loader(out, cfg, tok))
    return {k: v[0] for k, v in b.items()}


def test_pad_aspect_end_to_end(wide, tok, mcfg):
    root, mask, conv = wide
    S, g = 32, 8
    out = conv("pad32", image_size=S, aspect="pad", image_format="png")
    x = _one(out, _cfg(mcfg, batch_size=1, image_size=S, grid=g, aspect="pad"), tok)
    rec = records.RecordReader(out)[0]
    assert rec.region_frame_indices == (3, 9) and rec.aspect == "pad"
    # Masks: zero padded like the frames, then on the grid.
    padded = masks_lib.pad_mask_to_square(mask)
    grid = masks_lib.grid_masks(padded, g)
    np.testing.assert_array_equal(grid, resize_masks_np(padded, g, g) > 0)
    np.testing.assert_array_equal(x["object_masks"][0], np.stack([grid, grid]))
    np.testing.assert_array_equal(x["object_frames"][0], [0, 1])
    assert not np.array_equal(grid, masks_lib.grid_masks(mask, g))  # the padding moves the object
    # Frames: SigLIP values of expand2square + bicubic of the source frames (exact with PNG).
    src = V.open_video(str(root / "clip")).get(rec.frame_indices + rec.region_frame_indices)
    np.testing.assert_array_equal(x["frames"], V.SIGLIP_LUT[np.stack(
        [V.resize_frame(src[i], S, "pad") for i in rec.frame_indices])])
    # Border: canvas rows 0:8 and 56:64 are the grey fill; output rows 0:2 and 30:32 see only them
    # (bicubic support of a 2x downscale: +-4 source rows).
    grey = np.float32((127 / 255 - 0.5) / 0.5)
    assert abs(V.SIGLIP_LUT[127] - grey) < 1e-7
    region = x["region_frames"][:2]
    for arr in (x["frames"], region):
        assert (arr[:, :2] == V.SIGLIP_LUT[127]).all() and (arr[:, -2:] == V.SIGLIP_LUT[127]).all()
        assert not (arr[:, 4:28] == V.SIGLIP_LUT[127]).all(axis=-1).any()  # no grey in the content rows
    # Frames and masks line up: the white object (> 0 after SigLIP, mean per grid cell) fills exactly
    # the mask's grid cells in both region frames.
    cells = region.reshape(2, g, S // g, g, S // g, 3).mean(axis=(2, 4, 5))
    np.testing.assert_array_equal(cells > 0, np.stack([grid, grid]))
    print(f"\npad aspect: object cells {int(grid.sum())}, min object-cell mean {cells[:, grid].min():.3f}, "
          f"max other-cell mean {cells[:, ~grid].max():.3f}")


def test_pad_aspect_from_model_config(wide, tok, mcfg):
    """A 'pad' checkpoint (`image_aspect_ratio`) makes the loader pad without being told; an explicit
    aspect still wins (and a mismatch with the stored records is a clear error)."""
    _, _, conv = wide
    S, g = 32, 8
    out = conv("pad32m", image_size=S, aspect="pad", image_format="png")
    pad_model = mcfg.replace(image_aspect_ratio="pad")
    cfg = _cfg(pad_model, batch_size=1, image_size=S, grid=g)
    assert cfg.aspect == "pad" and _cfg(mcfg, batch_size=1).aspect == "square"
    x, want = _one(out, cfg, tok), _one(out, _cfg(mcfg, batch_size=1, image_size=S, grid=g, aspect="pad"), tok)
    for k in want:
        np.testing.assert_array_equal(x[k], want[k], err_msg=k)
    with pytest.raises(ValueError, match="aspect 'pad'"):
        _one(out, _cfg(pad_model, batch_size=1, image_size=S, grid=g, aspect="square"), tok)


def test_original_resolution_records_match_direct_conversion(wide, tok, mcfg):
    _, _, conv = wide
    S, g = 32, 8
    for aspect in ("square", "pad"):
        cfg = _cfg(mcfg, batch_size=1, image_size=S, grid=g, aspect=aspect)
        direct = _one(conv(f"{aspect}{S}", image_size=S, aspect=aspect, image_format="png"), cfg, tok)
        out0 = conv(f"{aspect}0", image_size=0, aspect=aspect, image_format="png")
        rec0 = records.RecordReader(out0)[0]
        assert rec0.stored_size == 0 and rec0.decode_frames().shape == (4, 48, 64, 3)
        orig = _one(out0, cfg, tok)
        assert sorted(orig) == sorted(direct)
        for k in direct:  # PNG: the loader's resize of the stored original is the converter's, bit for bit
            np.testing.assert_array_equal(orig[k], direct[k], err_msg=f"{aspect} {k}")
    # JPEG: both are re-encoded, at different resolutions, so they only agree within a tolerance.
    cfg = _cfg(mcfg, batch_size=1, image_size=S, grid=g, aspect="pad")
    direct = _one(conv(f"jpeg{S}", image_size=S, aspect="pad", image_format="jpeg"), cfg, tok)
    orig = _one(conv("jpeg0", image_size=0, aspect="pad", image_format="jpeg"), cfg, tok)
    for k in ("frames", "region_frames"):
        d = np.abs(orig[k] - direct[k])
        print(f"\nJPEG q95, original-resolution vs direct S={S} ({k}): max abs {d.max():.4f}, mean {d.mean():.5f} "
              f"(SigLIP units; 1 uint8 level = {2 / 255:.4f})")
        assert d.mean() < 2 * 2 / 255 and d.max() < 16 * 2 / 255  # within 2 levels on average, 16 at worst
    for k in ("input_ids", "labels", "segment_ids", "object_frames", "object_masks", "object_valid"):
        np.testing.assert_array_equal(orig[k], direct[k])
