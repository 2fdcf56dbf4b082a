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
from data_pipeline.synthetic import train_tokenizer
from vrefer_jax.config import model_config_from_gin
from vrefer_jax.inference import cli
from vrefer_jax.inference import generate as gen_lib
from vrefer_jax.inference.predictor import Predictor, default_generation
from vrefer_jax.inference.requests import RequestError, request_to_sample
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
    n = gen_lib.compiled_count()["videorefer"]
    extra = dict(REQS[0], id="again", question="Where does <region> go after the red square moves?", frame=7)
    pred.answer(samples(world, [extra]), world["root"])
    assert gen_lib.compiled_count()["videorefer"] == n


def test_cli_orbax_checkpoint(world, tmp_path, capsys):
    from vrefer_jax.checkpoints import cli as ckpt_cli

    ckpt = str(tmp_path / "ckpt")
    ckpt_cli.save_imported(ckpt, world["cfg"], world["params"], None, world["tok_dir"])
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
