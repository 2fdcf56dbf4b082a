"""The VRVL3 training loader (`data_pipeline.vl3.loader`) on a small synthetic set (JSON + frame
folders): static padded shapes that pass the contract's checks, labels from `preprocess(training=True)`,
caps with named, counted skips (or an error naming the sample), mixtures of sample files,
length-grouped batches, determinism and exact resumption mid-window."""

import json
import os
import time

import numpy as np
import pytest

from data_pipeline.loader import VL3_CAPS, CapExceededError, LoaderConfig
from data_pipeline.synthetic import dataset, scene
from data_pipeline.vl3 import loader as vl3_loader
from vrefer_jax import families
from vrefer_jax.config import IGNORE_INDEX, TextConfig
from vrefer_jax.vl3_config import NaViTConfig, VL3Config

SIZES = dict(seq_len=512, max_patches=1280, max_visual_tokens=48, max_regions=16, max_region_cells=32)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from vrefer_jax.main_job import vl3_tokenizer
    from vrefer_jax.text.tokenizer import load_tokenizer

    d = str(tmp_path_factory.mktemp("vl3synth"))
    dataset.generate(d, seed=0, train_videos=12, eval_videos=1, vocab_size=400,
                     cfg=scene.SynthConfig(size=84, mask_frames=2, turns_per_sample=2, prompt_protocol="vl3"))
    tok = load_tokenizer(vl3_tokenizer(d, os.path.join(d, "vl3_tokenizer")))
    cfg = VL3Config(vision=NaViTConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1),
                    text=TextConfig(vocab_size=416, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1),
                    mm_max_length=64, region_token_num=4, image_token_id=tok.token_to_id("<image>"),
                    region_token_id=tok.token_to_id("<REGION>"), pad_token_id=tok.pad_id)
    entries = json.load(open(os.path.join(d, "train.json")))
    return dict(dir=d, json=os.path.join(d, "train.json"), tok=tok, cfg=cfg, n=len(entries))


def _lcfg(**kw):
    base = dict(batch_size=2, **SIZES, shuffle=True, seed=3, num_shards=1, shard_index=0, fps=1.0, max_frames=16,
                length_group_window=3, overflow="error")
    return LoaderConfig(**{**base, **kw})


def _ids(it, n):
    return [list(next(it)["sample_ids"]) for _ in range(n)]


def test_batches_are_static_and_valid(world):
    cfg, fam = world["cfg"], families.get("videorefer_videollama3")
    it = vl3_loader.make_loader([world["json"]], _lcfg(), world["tok"], cfg)
    t = time.perf_counter()
    batches = [next(it) for _ in range(4)]
    print(f"VRVL3 loader: {8 / (time.perf_counter() - t):.1f} samples/s (1 read thread)")
    for b in batches:
        ids = list(b.pop("sample_ids"))
        assert b["input_ids"].shape == (2, 512) and b["patches"].shape == (2, 1280, cfg.vision.patch_dim)
        assert b["visual_patches"].shape == (2, 48, 4) and b["region_cells"].shape == (2, 16, 32, 4)
        assert b["region_init"].shape == (2, 16, 4)
        fam.validate(cfg, b, 512, sample_ids=ids)
        sup = b["labels"] != IGNORE_INDEX
        assert sup.any(1).all()  # every row supervises its answers
        assert ((b["input_ids"] == cfg.region_token_id) & sup).sum() == 0  # region rows never supervised
        assert (b["region_num_cells"] > 0).sum(1).min() >= 1  # regions from the masks
    it.close()


def test_caps_skip_counted_or_error(world):
    cfg = world["cfg"]
    it = vl3_loader.make_loader([world["json"]], _lcfg(seq_len=300, overflow={"input_ids": "skip"}, num_epochs=1,
                                                       shuffle=False, length_group_window=1),
                                world["tok"], cfg)
    seen = []
    for b in it:
        assert (b["segment_ids"].sum(1) <= 300).all()
        seen += list(b["sample_ids"])
    assert it.skipped["input_ids"] > 0 and set(it.skipped) == set(VL3_CAPS)
    # every sample kept or skipped, but the dropped remainder (< one batch)
    assert world["n"] - 1 <= sum(it.skipped.values()) + len(seen) <= world["n"]
    with pytest.raises(CapExceededError, match="input_ids needs"):
        next(vl3_loader.make_loader([world["json"]], _lcfg(seq_len=300), world["tok"], cfg))
    with pytest.raises(ValueError, match="max_patches"):
        vl3_loader.make_loader([world["json"]], _lcfg(max_patches=None), world["tok"], cfg)


def test_length_grouping(world):
    """Within a window of W batches, each batch is a run of the window's examples sorted by length."""
    cfg = world["cfg"]
    grouped = vl3_loader.make_loader([world["json"]], _lcfg(num_epochs=1, length_group_window=3), world["tok"], cfg)
    plain = vl3_loader.make_loader([world["json"]], _lcfg(num_epochs=1, length_group_window=1), world["tok"], cfg)
    g = [(list(b["sample_ids"]), b["segment_ids"].sum(1).tolist()) for b in grouped]
    p = [list(b["sample_ids"]) for b in plain]
    assert sorted(sum((x for x, _ in g), [])) == sorted(sum(p, []))  # the same samples
    window = g[:3]
    spans = sorted((min(lens), max(lens)) for _, lens in window)
    for (lo1, hi1), (lo2, hi2) in zip(spans, spans[1:]):
        assert hi1 <= lo2  # no overlap: the window was sorted and cut
    assert [x for x, _ in g] != p  # grouping changed the batches


def test_deterministic_and_resumable_mid_window(world):
    cfg = world["cfg"]
    a = _ids(vl3_loader.make_loader([world["json"]], _lcfg(), world["tok"], cfg), 8)
    it = vl3_loader.make_loader([world["json"]], _lcfg(), world["tok"], cfg)
    assert _ids(it, 4) == a[:4]
    state = it.get_state()  # 4 batches: one into the second window of 3
    assert state["pipeline"]["emitted"] == 1
    it2 = vl3_loader.make_loader([world["json"]], _lcfg(), world["tok"], cfg)
    it2.set_state(json.loads(json.dumps(state)))  # the state is JSON (Grain checkpoints it so)
    assert _ids(it2, 4) == a[4:8]
    other = _ids(vl3_loader.make_loader([world["json"]], _lcfg(seed=4), world["tok"], cfg), 8)
    assert other != a


def test_mixture_of_sample_files(world, tmp_path):
    """Two files (the second a JSONL copy of a few samples, media resolved under media_root) mixed 1:1."""
    entries = json.load(open(world["json"]))[:3]
    for e in entries:
        e["id"] = "copy_" + e["id"]
    second = tmp_path / "more.jsonl"
    second.write_text("".join(json.dumps(e) + "\n" for e in entries))
    cfg = world["cfg"]
    it = vl3_loader.make_loader([world["json"], str(second)], _lcfg(media_root=world["dir"]), world["tok"], cfg,
                                weights=[1.0, 1.0])
    ids = sum(_ids(it, 6), [])
    n_copy = sum(i.startswith("copy_") for i in ids)
    assert 3 <= n_copy <= 9, ids
    with pytest.raises(ValueError, match="2 weights for 1"):
        vl3_loader.make_loader([world["json"]], _lcfg(), world["tok"], cfg, weights=[1.0, 1.0])
