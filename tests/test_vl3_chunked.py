"""VRVL3 block attention (`VL3Config.vision_attention_chunk`): the NaViT encoder attending within
aligned blocks of P patches equals the dense segment-masked attention when no segment crosses a
block; `vl3_batch.chunk_example` lays samples out so and `check_chunks` refuses other layouts."""

import jax
import numpy as np
import pytest

from vrefer_jax import families, vl3_batch
from vrefer_jax.config import TextConfig
from vrefer_jax.families.workloads import Workload, vl3_example
from vrefer_jax.models.vl3.vision import NaViTEncoder
from vrefer_jax.vl3_config import NaViTConfig, VL3Config

FAMILY = "videorefer_videollama3"


def _cfg(**kw):
    return VL3Config(
        vision=NaViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        text=TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
        image_token_id=508, region_token_id=511, pad_token_id=505, **kw)


# 3 frames of 4x6 patches (24 each), 2 regions of 12 cells in 8x8 crops (64 patches each)
WL = Workload(text_len=16, frames=3, frame_hw=(56, 84), regions=2, region_cells=12)


def _batch(ex, cfg):
    dims = ex.sizes()
    row = vl3_batch.pad_example(ex, **dims, Q=cfg.region_token_num, pad_token_id=cfg.pad_token_id, with_labels=False)
    row.pop("sample_id")
    return {k: v[None] for k, v in row.items()}


def test_encoder_blocks_equal_dense():
    """Same aligned patches, chunk 64 vs dense: every output row equal (fp32, max abs err <= 1e-5)."""
    cfg = _cfg(vision_attention_chunk=64)
    ex = vl3_example(cfg, WL)
    b = _batch(ex, cfg)
    assert b["patches"].shape[1] == 256  # frames 0-1 share block 0, frame 2 block 1, one crop per block
    vision = cfg.vision
    dense, blocked = NaViTEncoder(vision), NaViTEncoder(vision, attention_chunk=64)
    args = (b["patches"], b["patch_segments"], b["patch_coords"])
    params = dense.init(jax.random.key(1), *args)
    a = np.asarray(jax.jit(dense.apply)(params, *args))
    c = np.asarray(jax.jit(blocked.apply)(params, *args))
    err = np.abs(a - c).max()
    print("encoder max abs err", err)
    assert err <= 1e-5
    # a layout that crosses blocks gives different features: the test can fail
    shifted = {k: np.roll(v, 8, axis=1) for k, v in zip(("p", "s", "c"), args)}
    d = np.asarray(jax.jit(dense.apply)(params, shifted["p"], shifted["s"], shifted["c"]))
    e = np.asarray(jax.jit(blocked.apply)(params, shifted["p"], shifted["s"], shifted["c"]))
    assert np.abs(d - e).max() > 1e-3


def test_model_logits_blocked_equal_dense_unaligned():
    """The whole model: the dense model on the plain layout and the block model on the chunk layout
    (patches moved, indices remapped) give the same logits (max abs err <= 1e-4)."""
    cfg, cfg_c = _cfg(), _cfg(vision_attention_chunk=64)
    fam = families.get(FAMILY)
    plain, chunked = _batch(vl3_example(cfg, WL), cfg), _batch(vl3_example(cfg_c, WL), cfg_c)
    fam.validate(cfg, plain, plain["input_ids"].shape[1])
    fam.validate(cfg_c, chunked, chunked["input_ids"].shape[1])
    assert plain["patches"].shape[1] == 3 * 24 + 2 * 64 and chunked["patches"].shape[1] == 256
    params = fam.init_params(cfg, jax.random.key(0))
    a = np.asarray(jax.jit(lambda p, b: fam.module(cfg).apply({"params": p}, b)[0])(params, plain))
    c = np.asarray(jax.jit(lambda p, b: fam.module(cfg_c).apply({"params": p}, b)[0])(params, chunked))
    err = np.abs(a - c).max()
    print("logits max abs err", err, "scale", np.abs(a).max())
    assert err <= 1e-4


def test_chunk_layout_checks():
    cfg = _cfg()
    ex = vl3_example(cfg, WL)
    lay = vl3_batch.chunk_example(ex, 64)
    # every real patch moved with its segment and coordinates; indices follow
    for old, new in ((ex.visual_patches, lay.visual_patches), (ex.region_cells, lay.region_cells)):
        m = old >= 0
        np.testing.assert_array_equal(ex.patches[old[m]], lay.patches[new[m]])
        np.testing.assert_array_equal(ex.patch_coords[old[m]], lay.patch_coords[new[m]])
    assert (lay.patch_segments > 0).sum() == (ex.patch_segments > 0).sum()
    vl3_batch.check_chunks(lay.patch_segments[None], 64)
    with pytest.raises(vl3_batch.BatchError, match="sample s: patch segment 4 crosses"):
        vl3_batch.check_chunks(np.roll(lay.patch_segments, 8)[None], 64, sample_ids=["s"])
    with pytest.raises(ValueError, match="64 patches, more than vision_attention_chunk 32"):
        vl3_batch.chunk_example(ex, 32)
    with pytest.raises(ValueError, match="multiple of vision_attention_chunk"):
        NaViTEncoder(cfg.vision, attention_chunk=64).init(
            jax.random.key(0), ex.patches[None], ex.patch_segments[None], ex.patch_coords[None])
