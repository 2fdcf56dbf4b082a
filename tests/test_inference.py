"""Multimodal generation end to end on a tiny random VideoRefer with a tiny tokenizer: Predictor,
requests, the `vrefer-infer` CLI (Orbax checkpoint), bucketing and error reporting."""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from data_pipeline import masks as masks_lib
from data_pipeline.synthetic.tokenizer import train_tokenizer
from vrefer_jax.config import model_config_from_gin
from vrefer_jax.inference import cli
from vrefer_jax.inference import generate as gen_lib
from vrefer_jax.inference.predictor import Predictor, default_generation
from vrefer_jax.inference.request_files import PathPolicy, RequestError, request_to_sample
from vrefer_jax.models import videorefer
from vrefer_jax.text import load_tokenizer

TINY = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny.gin")
H, W, NF = 40, 56, 10  # non-square frames, 10 of them
CORPUS = ["What is <region> doing in the video? Describe <region> and compare it with <region>.",
          "The red square moves to the right. A blue circle stays still. Answer with the option's letter."] * 20


FLOORS = {"region_frames": 4, "objects": 2, "object_frames": 4}  # every test sample in one bucket


def random_params(cfg, seed=0):
    """Random weights from the parameter shapes (`init_params` runs the model eagerly: ~1 min)."""
    rng = np.random.default_rng(seed)
    shapes = videorefer.abstract_params(cfg)
    paths, treedef = jax.tree_util.tree_flatten_with_path(shapes)

    def leaf(path, x):
        name = str(path[-1])
        if "scale" in name:
            return jnp.asarray(1 + 0.1 * rng.standard_normal(x.shape), x.dtype)
        std = 1.0 if "embedding" in name else 0.15
        return jnp.asarray(std * rng.standard_normal(x.shape), x.dtype)

    return jax.tree_util.tree_unflatten(treedef, [leaf(p, x) for p, x in paths])


def write_mp4(path, frames):
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt, s.options = W, H, "yuv444p", {"crf": "10"}
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    tok_dir = root / "tok"
    train_tokenizer(CORPUS, str(tok_dir), vocab_size=320)
    tok = load_tokenizer(str(tok_dir))
    cfg = model_config_from_gin([TINY])
    cfg = cfg.replace(text=cfg.text.__class__(**{**cfg.text.__dict__, "vocab_size": len(tok)}),
                      region_token_id=tok.region_id, pad_token_id=tok.pad_id)
    params = random_params(cfg)
    # media: a frame folder with a moving square, an image, masks
    rng = np.random.default_rng(0)
    (root / "clip").mkdir()
    for t in range(NF):
        img = rng.integers(60, 120, (H, W, 3), np.uint8)
        img[10:22, 4 + 3 * t:16 + 3 * t] = (220, 30, 30)
        Image.fromarray(img).save(root / "clip" / f"{t:05d}.png")
    write_mp4(root / "clip.mp4", [np.asarray(Image.open(root / "clip" / f"{t:05d}.png")) for t in range(NF)])
    Image.fromarray(rng.integers(0, 255, (H, W, 3), np.uint8)).save(root / "photo.png")
    m = np.zeros((H, W), np.uint8)
    m[10:22, 4:16] = 255
    Image.fromarray(m).save(root / "mask0.png")
    m2 = np.zeros((H, W), bool)
    m2[10:22, 10:22] = True
    with open(root / "rle2.json", "w") as f:
        json.dump({"size": [H, W], "counts": masks_lib.encode_mask(m2).decode()}, f)
    gen = default_generation(tok, max_new_tokens=6)
    pred = Predictor(cfg, params, tok, num_frames=4, generation=gen, bucket_floors=FLOORS)
    return dict(root=str(root), tok_dir=str(tok_dir), tok=tok, cfg=cfg, params=params, pred=pred, gen=gen)


REQS = [
    {"id": "single", "video": "clip", "question": "What is <region> doing?", "frame": 2,
     "objects": [{"mask": "mask0.png"}]},
    {"id": "multi", "video": "clip", "question": "Compare <region> with <region>.",
     "objects": [{"frames": {"0": {"mask": "mask0.png"}, "4": {"box": [16, 10, 28, 22]}, "8": {"rle": "rle2.json"}}},
                 {"box": "3,3,20,30", "frame": 5}]},
    {"id": "image", "image": "photo.png", "question": "Describe <object7>.", "objects": [{"box": [0, 0, 10, 10]}]},
]


def samples(world, reqs=REQS):
    return [request_to_sample(r, i, world["root"]) for i, r in enumerate(reqs)]


def test_requests_become_samples(world):
    s = samples(world)
    assert s[0].objects[0].frames == (2,) and s[1].objects[0].frames == (0, 4, 8)
    assert s[2].conversations[0]["value"] == "<image>\nDescribe <object7> [<region>]."
    with pytest.raises(RequestError, match="field question: 2 <region>.*1 object"):
        request_to_sample({"id": "bad", "video": "clip", "question": "<region> vs <region>",
                           "objects": [{"mask": "mask0.png"}]}, 0, world["root"])
    with pytest.raises(RequestError, match=r"objects\[0\].box"):
        request_to_sample({"id": "b", "video": "clip", "question": "<region>", "objects": [{"box": [1, 2, 3]}]},
                          0, world["root"])


def test_answer_matches_teacher_forcing(world):
    """Greedy tokens = penalised argmax of a teacher-forced forward (no cache) over prompt + answer."""
    pred, cfg, params, gen = world["pred"], world["cfg"], world["params"], world["gen"]
    prep = [pred.prepare(s, world["root"]) for s in samples(world)]
    batch, out_len = pred.make_batch(prep[1:2])
    texts, out = pred.generate_batch(batch, out_len, return_output=True)
    toks = out.tokens[0, : out.lengths[0]].tolist()
    n, N = len(prep[1].input_ids), gen.max_new_tokens
    forced = dict(batch)
    ids = np.zeros((1, batch["input_ids"].shape[1] + N), np.int32)
    ids[0, :n], ids[0, n:n + len(toks)] = prep[1].input_ids, toks
    forced["input_ids"], forced["segment_ids"] = ids, (np.arange(ids.shape[1]) < n + len(toks))[None].astype(np.int32)
    fwd = jax.jit(lambda p, b: videorefer.VideoRefer(cfg).apply({"params": p}, b, out_len + N))
    logits, inputs = fwd(params, {k: v for k, v in forced.items()})
    L = int(inputs["lengths"][0]) - len(toks)  # expanded prompt length
    logits = np.asarray(logits[0, L - 1:L - 1 + len(toks)])
    ref = []
    for t in range(len(toks)):  # HF repetition penalty over the tokens generated so far
        x, seen = logits[t].copy(), list(set(toks[:t]))
        x[seen] = np.where(x[seen] < 0, x[seen] * gen.repetition_penalty, x[seen] / gen.repetition_penalty)
        ref.append(int(np.argmax(x)))
    print(f"\nmulti-frame sample: expanded prompt {L} (out_len {out_len}), tokens {toks}, forced {ref}")
    assert toks == ref and isinstance(texts[0], str)
    assert len(toks) == N or toks[-1] in gen.eos_token_ids


def test_batched_equals_single_and_buckets_reuse(world):
    pred = world["pred"]
    ss = samples(world)
    one = [pred.answer([s], world["root"])[0] for s in ss]
    both = pred.answer(ss, world["root"], batch_size=2)
    print("\nanswers:", one)
    assert one == both and len(set(one)) > 1  # the answers depend on the input
    # another single-frame question of a different length in the same bucket: nothing recompiles
    n = gen_lib._generate_multimodal._cache_size()
    extra = dict(REQS[0], id="again", question="Where does <region> go after the red square moves?", frame=7)
    pred.answer(samples(world, [extra]), world["root"])
    assert gen_lib._generate_multimodal._cache_size() == n


def test_cli_orbax_checkpoint(world, tmp_path, capsys):
    from vrefer_jax.checkpoints import store

    ckpt = str(tmp_path / "ckpt")
    store.save_imported(ckpt, world["cfg"], world["params"], None, world["tok_dir"])
    reqs = REQS + [{"id": "mismatch", "video": "clip", "question": "<region> and <region>?",
                    "objects": [{"mask": "mask0.png"}]}]
    with open(tmp_path / "reqs.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in reqs)
    out = tmp_path / "answers.jsonl"
    rc = cli.main(["--checkpoint", ckpt, "--requests", str(tmp_path / "reqs.jsonl"), "--output", str(out),
                   "--media-root", world["root"], "--num-frames", "4", "--max-new-tokens", "6", "--batch-size", "2"])
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert rc == 1 and [x["id"] for x in lines] == ["single", "multi", "image", "mismatch"]
    assert "field question" in lines[3]["error"]
    expected = world["pred"].answer(samples(world), world["root"])  # same default generation settings
    assert [x["answer"] for x in lines[:3]] == expected

    # single-request mode: mask PNG + RLE + box objects, single- and multi-frame, mp4 and frame folder
    root, pred = world["root"], world["pred"]
    base = ["--checkpoint", ckpt, "--num-frames", "4", "--max-new-tokens", "6"]
    folder, mp4 = ["--video", os.path.join(root, "clip")], ["--video", os.path.join(root, "clip.mp4")]
    argv = base + folder + ["--question", "What is <region> doing?", "--mask", f"{root}/mask0.png", "--frame", "2"]
    assert cli.main(argv, predictor=pred) == 0
    assert capsys.readouterr().out.strip() == expected[0]
    for video in (folder, mp4):
        argv = base + video + ["--question", "Compare <region> with <region>.",
                               "--mask", f"0={root}/mask0.png;4={root}/mask0.png", "--rle", f"8={root}/rle2.json",
                               "--box", "3,3,20,30", "--frame", "5"]
        assert cli.main(argv, predictor=pred) == 2  # --mask F=..;F=.. and --rle are 2 objects: 3 for 2 <region>
        argv = [a for a in argv if a != "--rle" and not a.startswith("8=")]
        assert cli.main(argv, predictor=pred) == 0
        argv = base + video + ["--question", "Is <region> red?", "--rle", f"0={root}/rle2.json;8={root}/rle2.json"]
        assert cli.main(argv, predictor=pred) == 0
    print("\nCLI answers:", capsys.readouterr().out.split("\n"))
    argv = base + folder + ["--question", "<region> and <region>?", "--mask", f"{root}/mask0.png"]
    assert cli.main(argv, predictor=pred) == 2
    err = capsys.readouterr().err
    assert "field question" in err and "2 <region>" in err


def test_load_hf_folder(world, tmp_path):
    """An official-layout HF folder (our export, fp32, tower stored in it) loads and answers the same."""
    from vrefer_jax.checkpoints.hf_export import export_videorefer

    hf_dir = str(tmp_path / "hf")
    export_videorefer(world["params"], world["cfg"], hf_dir, tokenizer_folder=world["tok_dir"], dtype="float32")
    pred = Predictor.load(hf_dir, use_stored_vision_tower=True, num_frames=4, bucket_floors=FLOORS)
    assert os.path.isfile(os.path.join(hf_dir, "generation_config.json"))
    assert pred.generation.repetition_penalty == 1.05 and not pred.generation.do_sample
    assert world["tok"].eos_id in pred.generation.eos_token_ids
    ss = samples(world)[:1]
    assert pred.answer(ss, world["root"], world["gen"]) == world["pred"].answer(ss, world["root"])


def _expand2square(img, background):
    """VideoLLaMA2 / VideoRefer `mm_utils.expand2square` (PIL)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, ((side - w) // 2, 0) if w < h else (0, (side - h) // 2))
    return out


def test_pad_checkpoint_pads_like_official(world, tmp_path):
    """A checkpoint with image_aspect_ratio 'pad' pads frames and masks by default, as the official
    code does: frames via `expand2square` with the processor's mean colour then SiglipImageProcessor
    (PIL bicubic, rescale, normalise); masks zero padded the same way, then the region encoder's
    `F.interpolate(bilinear) > 0` (a torch/PIL re-implementation here)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional

    cfg = world["cfg"].replace(image_aspect_ratio="pad")
    pred = Predictor(cfg, world["params"], world["tok"], num_frames=4, generation=world["gen"], bucket_floors=FLOORS)
    assert pred.aspect == "pad" and world["pred"].aspect == "square"
    S, g = cfg.vision.image_size, cfg.vision.grid
    mean = (0.5, 0.5, 0.5)  # SigLIP's image_mean
    frame = _expand2square(Image.open(os.path.join(world["root"], "clip", "00002.png")).convert("RGB"),
                           tuple(int(x * 255) for x in mean))
    x = np.asarray(frame.resize((S, S), Image.BICUBIC)).astype(np.float64) * (1 / 255)
    want_frame = (x.astype(np.float32) - np.float32(0.5)) / np.float32(0.5)
    mb = np.zeros((H, W), np.uint8)
    mb[30:40, 20:40] = 255  # near the bottom edge: padding moves it to other grid cells
    Image.fromarray(mb).save(os.path.join(world["root"], "mask_bottom.png"))
    req = {"id": "pad", "video": "clip", "question": "What is <region> doing?", "frame": 2,
           "objects": [{"mask": "mask_bottom.png"}]}
    m = torch.from_numpy(mb > 0).float()[None, None]
    h, w = m.shape[-2:]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    m = F.pad(m, (left, side - w - left, top, side - h - top))
    want_mask = (F.interpolate(m, size=(g, g), mode="bilinear", align_corners=False) > 0)[0, 0].numpy()

    for p in (pred, Predictor.load(_export_pad(world, cfg, tmp_path), use_stored_vision_tower=True, num_frames=4)):
        got = p.prepare(samples(world, [req])[0], world["root"])
        np.testing.assert_allclose(got.region_frames[0], want_frame, atol=1e-6)
        np.testing.assert_array_equal(got.object_masks[0][0], want_mask)
    sq = world["pred"].prepare(samples(world, [req])[0], world["root"])  # square squashes instead
    assert not np.array_equal(sq.object_masks[0][0], want_mask)
    assert np.abs(sq.region_frames[0] - want_frame).max() > 0.1


def _export_pad(world, cfg, tmp_path):
    from vrefer_jax.checkpoints.hf_export import export_videorefer

    d = str(tmp_path / "hf_pad")
    export_videorefer(world["params"], cfg, d, tokenizer_folder=world["tok_dir"], dtype="float32",
                      write_vision_tower=False)
    return d


# ----------------------------------------------------------------------------- hostile requests (issue #15)


def bomb_png(path, w=30000, h=30000):
    """A few hundred bytes of PNG declaring w x h pixels (a decompression bomb: Pillow reads the size
    from the header, the pixel data is never there)."""
    import struct
    import zlib

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(b"\0" * 4000)) + chunk(b"IEND", b""))


def run_requests(world, tmp_path, lines, *extra, name="reqs.jsonl", folder=None):
    """`vrefer-infer --requests` over raw `lines` with the shared predictor -> (rc, rows)."""
    path = pathlib.Path(folder or tmp_path) / name
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    out = tmp_path / (name + ".out")
    rc = cli.main(["--checkpoint", "unused", "--requests", str(path), "--output", str(out), "--num-frames", "4",
                   "--max-new-tokens", "6", *extra], predictor=world["pred"])
    return rc, [json.loads(x) for x in out.read_text().splitlines()]


def test_cli_bad_lines_get_one_error_row_each(world, tmp_path, capsys):
    """Item 13: unparsable / non-object lines, a non-integer frame, a decompression-bomb mask and a
    second media tag are one error row each (naming the line and the field); the good lines are
    still answered."""
    bomb_png(tmp_path / "bomb.png")
    Image.fromarray(np.full((H, W), 255, np.uint8)).save(tmp_path / "mask0.png")
    os.symlink(os.path.join(world["root"], "clip"), tmp_path / "clip")
    good = REQS[0]
    lines = [good,
             '{"id": "cut", "video": "clip"',
             "[1, 2]",
             dict(good, id="frame", frame="two"),
             dict(good, id="frames", objects=[{"frames": {"x": {"mask": "mask0.png"}}}]),
             dict(good, id="bomb", objects=[{"mask": "bomb.png"}]),
             dict(good, id="tag", question="Is <region> in the <video>?"),
             dict(good, id="again")]
    rc, rows = run_requests(world, tmp_path, lines, "--media-root", str(tmp_path))
    err = capsys.readouterr().err
    assert rc == 1 and len(rows) == 8
    assert [r.get("line") for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert rows[0]["answer"] == rows[7]["answer"] and "error" not in rows[0]
    assert rows[1]["reason"] == "bad_json" and rows[1]["error"].startswith("line 2: not valid JSON")
    assert rows[2]["reason"] == "bad_request" and "line 3: expected a JSON object" in rows[2]["error"]
    assert rows[3]["id"] == "frame" and "line 4" in rows[3]["error"] and "field frame:" in rows[3]["error"]
    assert rows[3]["reason"] == rows[4]["reason"] == "bad_frame_index"
    assert "field objects[0].frames:" in rows[4]["error"] and "'x'" in rows[4]["error"]
    assert rows[5]["reason"] == "image_too_large" and "field objects[0].mask" in rows[5]["error"]
    assert "line 7" in rows[6]["error"] and "field question: must not contain <video>" in rows[6]["error"]
    assert len(err.strip().splitlines()) == 6 and "Traceback" not in err


def test_mask_image_size_limit(world, tmp_path, capsys):
    """Item 13: the mask size limit is explicit (--max-image-pixels), checked before decoding."""
    from vrefer_jax.inference import request_files as req_lib

    with pytest.raises(req_lib.ImageTooLarge, match="2240 pixels, over the limit of 1000"):
        req_lib.read_mask(os.path.join(world["root"], "mask0.png"), max_pixels=1000)
    rc, rows = run_requests(world, tmp_path, [REQS[0]], "--media-root", world["root"], "--max-image-pixels", "1000")
    assert rc == 1 and rows[0]["reason"] == "image_too_large" and "line 1" in rows[0]["error"]
    assert "over the limit of 1000" in capsys.readouterr().err
    # single request: the oversized mask is one line on stderr, exit 2
    bomb_png(tmp_path / "bomb.png")
    argv = ["--checkpoint", "unused", "--video", os.path.join(world["root"], "clip"), "--question", "<region>?",
            "--mask", str(tmp_path / "bomb.png"), "--num-frames", "4"]
    assert cli.main(argv, predictor=world["pred"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "image_too_large" in err and "objects[0].mask" in err


def test_cli_user_errors_are_one_line(world, tmp_path, capsys):
    """Item 13: a missing checkpoint / requests file / unwritable output is one line, exit 2."""
    reqs = tmp_path / "r.jsonl"
    reqs.write_text(json.dumps(REQS[0]) + "\n")
    for argv in (["--checkpoint", str(tmp_path / "nope"), "--requests", str(reqs), "--media-root", world["root"]],
                 ["--checkpoint", str(tmp_path / "nope"), "--requests", str(tmp_path / "missing.jsonl")],
                 ["--checkpoint", "x", "--requests", str(reqs), "--output", str(tmp_path / "no" / "dir.jsonl")],
                 ["--checkpoint", str(tmp_path / "nope"), "--image", os.path.join(world["root"], "photo.png"),
                  "--question", "<region>?", "--box", "0,0,5,5"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("vrefer-infer: ") and "Traceback" not in err


def test_empty_mask_is_answered_with_a_warning(world, tmp_path, capsys):
    """Item 14: an all-zero mask is answered, with `warnings` in the row and a line on stderr."""
    Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / "empty.png")
    os.symlink(os.path.join(world["root"], "clip"), tmp_path / "clip")
    os.symlink(os.path.join(world["root"], "mask0.png"), tmp_path / "mask0.png")
    lines = [dict(REQS[0], objects=[{"mask": "empty.png"}]),
             dict(REQS[0], id="partly", objects=[{"frames": {"0": {"mask": "mask0.png"}, "4": {"mask": "empty.png"}}}]),
             REQS[0]]
    rc, rows = run_requests(world, tmp_path, lines, "--media-root", str(tmp_path))
    err = capsys.readouterr().err
    assert rc == 0 and all(isinstance(r["answer"], str) for r in rows)
    assert rows[0]["warnings"] == ["empty_mask: object 0"]
    assert rows[1]["warnings"] == ["empty_mask: object 0 frame 4"] and "warnings" not in rows[2]
    assert "line 1, request 'single': empty_mask: object 0" in err and "line 2" in err
    argv = ["--checkpoint", "unused", "--video", str(tmp_path / "clip"), "--question", "<region>?",
            "--mask", str(tmp_path / "empty.png"), "--num-frames", "4", "--max-new-tokens", "6"]
    assert cli.main(argv, predictor=world["pred"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() and "empty_mask: object 0" in out.err


def test_request_paths_stay_under_their_root(world, tmp_path):
    """Item 4: paths inside requests resolve under the root; `../` and absolute paths are refused
    (media_outside_root) unless absolute paths are allowed; command-line paths are the user's own."""
    from vrefer_jax.inference.request_files import PathPolicy

    root = world["root"]
    for name in ("clip", "mask0.png", "rle2.json", "photo.png"):
        os.symlink(os.path.join(root, name), tmp_path / name)
    base = {"id": "p", "video": "clip", "question": "<region>?", "objects": [{"mask": "mask0.png"}]}
    assert request_to_sample(base, 0, str(tmp_path)).media == "clip"
    outside = os.path.join(root, "clip")
    hostile = [({"video": "../clip"}, "video"), ({"video": outside}, "video"),
               ({"video": None, "image": "sub/../../photo.png"}, "image"),
               ({"objects": [{"mask": "../mask0.png"}]}, r"objects\[0\].mask"),
               ({"objects": [{"mask": os.path.join(root, "mask0.png")}]}, r"objects\[0\].mask"),
               ({"objects": [{"frames": {"0": {"rle": "../rle2.json"}}}]}, r"objects\[0\].frames\['0'\].rle")]
    for change, field in hostile:
        req = {k: v for k, v in {**base, **change}.items() if v is not None}
        with pytest.raises(RequestError, match=f"field {field}: media_outside_root") as e:
            request_to_sample(req, 0, str(tmp_path))
        assert e.value.reason == "media_outside_root"
    # absolute paths when allowed (relative ones are still confined)
    allow = PathPolicy(allow_absolute=True)
    assert request_to_sample({**base, "video": outside}, 0, str(tmp_path), policy=allow).media == outside
    with pytest.raises(RequestError, match="media_outside_root"):
        request_to_sample({**base, "video": "../clip"}, 0, str(tmp_path), policy=allow)
    # paths typed on the command line are not confined
    mine = {**base, "video": "../clip", "objects": [{"mask": "../mask0.png"}]}
    (tmp_path / "sub").mkdir()
    assert request_to_sample(mine, 0, str(tmp_path / "sub"), policy=PathPolicy(confine=False)).media == str(tmp_path / "clip")  # absolute


def test_cli_requests_root_and_absolute_paths(world, tmp_path):
    """Item 4 via the CLI: the root defaults to the requests file's folder; absolute paths need
    --allow-absolute-paths."""
    root = world["root"]
    absolute = dict(REQS[0], id="abs", video=os.path.join(root, "clip"))
    rc, rows = run_requests(world, tmp_path, [REQS[0], absolute], name="default_root.jsonl", folder=root)
    assert rc == 1 and "answer" in rows[0]  # relative paths: from the requests file's folder
    assert rows[1]["reason"] == "media_outside_root"
    assert "line 2" in rows[1]["error"] and "field video" in rows[1]["error"]
    rc, rows = run_requests(world, tmp_path, [REQS[0], absolute], "--allow-absolute-paths",
                            name="default_root.jsonl", folder=root)
    assert rc == 0 and rows[0]["answer"] == rows[1]["answer"]


def test_cli_default_num_frames_is_official():
    """Item 20: 8 frames by default, as the official mm_infer path (videorefer/constants.py NUM_FRAMES)."""
    a = cli.build_parser().parse_args(["--checkpoint", "c", "--video", "v.mp4", "--question", "<region>?"])
    from vrefer_jax import families

    # the flag is unset; the VideoRefer family's "infer" protocol supplies the official 8
    assert a.num_frames is None
    vr = families.get("videorefer")
    assert vr.host_options("infer", num_frames=a.num_frames) == {"num_frames": 8} == {"num_frames": cli.OFFICIAL_NUM_FRAMES}
    assert vr.host_options("infer", num_frames=16) == {"num_frames": 16}


def test_read_request_lines_keeps_bad_lines_in_place(tmp_path):
    """Item 13 (reader): every non-blank line / list item keeps its place; bad ones become BadLine."""
    from vrefer_jax.inference.request_files import BadLine, read_request_lines, read_requests

    p = tmp_path / "r.jsonl"
    p.write_text('[1, 2]\n\n{"id": "a"}\n{"id": \n"text"\n')
    got = read_request_lines(str(p))
    assert [w for w, _ in got] == ["line 1", "line 3", "line 4", "line 5"]
    assert got[1][1] == {"id": "a"} and all(isinstance(r, BadLine) for i, (_, r) in enumerate(got) if i != 1)
    assert [r.reason for _, r in got if isinstance(r, BadLine)] == ["bad_request", "bad_json", "bad_request"]
    with pytest.raises(ValueError, match="line 1: expected a JSON object"):
        read_requests(str(p))
    p.write_text('[{"id": "a"}, 3]')
    got = read_request_lines(str(p))
    assert [w for w, _ in got] == ["item 1", "item 2"] and isinstance(got[1][1], BadLine)


def test_predictor_media_paths_confined_unless_allowed(world):
    """Item 4 for benchmark samples (vrefer-eval): a sample's media path must stay inside
    media_root; `allow_absolute_media` (vrefer-eval --allow_absolute_media) reads absolute ones."""
    from data_pipeline import schema

    req = {**REQS[0], "video": os.path.join(world["root"], "clip")}
    s = request_to_sample(req, 0, world["root"], policy=PathPolicy(allow_absolute=True))
    assert os.path.isabs(s.media)
    with pytest.raises(schema.SampleError, match="media_outside_root"):
        world["pred"].prepare(s, world["root"])
    free = Predictor(world["cfg"], world["params"], world["tok"], num_frames=4, generation=world["gen"],
                     allow_absolute_media=True)
    rel = free.prepare(request_to_sample(REQS[0], 0, world["root"]), world["root"])
    np.testing.assert_array_equal(free.prepare(s, "/nonexistent").frames, rel.frames)


def test_predictor_batch_equals_loader_batch(world, tmp_path):
    """One host preprocessing path: the predictor's in-memory arrays are the ones the training loader
    gives for the same sample converted to lossless records (frames, region frames, masks, indices)."""
    import dataclasses

    from data_helpers import write_records
    from data_pipeline import convert, loader

    pred, cfg, tok = world["pred"], world["cfg"], world["tok"]
    seen_mask = False
    for aspect in ("square", "pad"):
        pred.configure(aspect=aspect)
        try:
            for s in samples(world):
                batch, _ = pred.make_batch([pred.prepare(s, world["root"])])
                T, F, K, M = (batch["frames"].shape[1], batch["region_frames"].shape[1],
                              *batch["object_frames"].shape[1:])
                answered = s if len(s.conversations) % 2 == 0 else dataclasses.replace(
                    s, conversations=(*s.conversations, {"from": "gpt", "value": "yes"}))  # training needs a reply
                conv = convert.ConvertConfig(num_frames=T if s.modality == "video" else 1,
                                             image_size=cfg.vision.image_size, aspect=aspect)
                path = write_records(str(tmp_path / f"{s.sample_id}-{aspect}.tfrecord"),
                                     [convert.build_record(answered, world["root"], conv)])
                lcfg = loader.LoaderConfig.for_model(cfg, batch_size=1, seq_len=256, num_frames=T, max_region_frames=F,
                                                     max_objects=K, max_object_frames=M, aspect=aspect, shuffle=False,
                                                     num_epochs=1)
                (want,) = list(loader.make_loader(path, lcfg, tok))
                for k in ("frames", "region_frames", "object_frames", "object_masks", "object_valid"):
                    assert batch[k].dtype == want[k].dtype, (s.sample_id, k)
                    np.testing.assert_array_equal(batch[k], want[k], err_msg=f"{s.sample_id} {aspect} {k}")
                assert (want["frames"] != 0).any() and want["object_valid"].any()
                seen_mask |= bool(want["object_masks"].any())
        finally:
            pred.configure(aspect=cfg.image_aspect_ratio)
    assert seen_mask  # the masks compared are not all empty


def test_predictor_preprocesses_in_memory(world, monkeypatch):
    """Inference encodes nothing: no PNG/JPEG round trip of the frames, no record."""
    from data_pipeline import records, video

    def refuse(*a, **k):
        raise AssertionError("the predictor must not encode or decode images")

    want = world["pred"].prepare(samples(world)[1], world["root"])
    monkeypatch.setattr(video, "encode_image", refuse)
    monkeypatch.setattr(video, "decode_image", refuse)
    monkeypatch.setattr(records.Record, "to_bytes", refuse)
    got = world["pred"].prepare(samples(world)[1], world["root"])
    np.testing.assert_array_equal(got.frames, want.frames)
    np.testing.assert_array_equal(got.region_frames, want.region_frames)
    assert got.input_ids == want.input_ids and got.object_frames == want.object_frames


@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 2, 2), (1, 4, 2)])
def test_sharded_predictor_gives_the_same_tokens(world, tmp_path, shape):
    """Serving on 8 fake devices (conftest): parameters placed by the logical-axis rules, the KV
    cache and activations constrained alike; the tokens equal one device's, both for a predictor
    built in memory and for `Predictor.load` restoring straight into the shardings."""
    from vrefer_jax.checkpoints import store
    from vrefer_jax.sharding import MeshConfig, make_mesh

    mesh = make_mesh(MeshConfig(*shape), jax.devices()[:8])
    pred = Predictor(world["cfg"], world["params"], world["tok"], num_frames=4, generation=world["gen"],
                     bucket_floors=FLOORS, mesh=mesh)
    embed = pred.params["llm"]["embed_tokens"]["embedding"]
    assert len(embed.sharding.device_set) == 8
    ss = samples(world)
    want = world["pred"].answer(ss, world["root"], batch_size=2)
    assert pred.answer(ss, world["root"], batch_size=2) == want
    ckpt = str(tmp_path / "ckpt")
    store.save_imported(ckpt, world["cfg"], world["params"], None, world["tok_dir"])
    loaded = Predictor.load(ckpt, mesh=mesh, num_frames=4, generation=world["gen"], bucket_floors=FLOORS)
    assert loaded.params["llm"]["embed_tokens"]["embedding"].sharding == embed.sharding
    assert loaded.answer(ss, world["root"], batch_size=2) == want


def test_cli_mesh(world, tmp_path, capsys):
    """`vrefer-infer --mesh`: the same answers as one device; a bad mesh is one line, exit 2."""
    from vrefer_jax.checkpoints import store

    ckpt = str(tmp_path / "ckpt")
    store.save_imported(ckpt, world["cfg"], world["params"], None, world["tok_dir"])
    (tmp_path / "reqs.jsonl").write_text(json.dumps(REQS[0]) + "\n")
    base = ["--checkpoint", ckpt, "--requests", str(tmp_path / "reqs.jsonl"), "--media-root", world["root"],
            "--num-frames", "4", "--max-new-tokens", "6"]
    assert cli.main(base + ["--output", str(tmp_path / "a.jsonl"), "--mesh", "data=1,fsdp=4,tensor=2"]) == 0
    got = json.loads((tmp_path / "a.jsonl").read_text())["answer"]
    assert got == world["pred"].answer(samples(world, [REQS[0]]), world["root"])[0]
    capsys.readouterr()
    assert cli.main(base + ["--mesh", "heads=8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--mesh" in err[0] and "unknown axes" in err[0]
