"""The batch contract (`vrefer_jax.batch`): one module owns the fields, the expanded length, padding
and the host checks (the import rules that keep it below the models: tests/test_layering.py)."""

import pathlib

import numpy as np
import pytest

from vrefer_jax import batch as batch_lib
from vrefer_jax.config import IGNORE_INDEX, VIDEO_TOKEN_INDEX, model_config_from_gin

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "models" / "tiny.gin")


def _example(sid="s", n_ids=5, F=2, objects=((0, 1), (1,)), g=3, T=2, S=4):
    ids = [1, VIDEO_TOKEN_INDEX, 7, 7, 2][:n_ids]
    return batch_lib.Example(sid, ids, np.ones((T, S, S, 3), np.float32), np.ones((F, S, S, 3), np.float32),
                             [list(o) for o in objects], [np.ones((len(o), g, g), bool) for o in objects],
                             labels=[IGNORE_INDEX] * (n_ids - 1) + [2])


def test_pad_and_stack():
    ex = _example()
    row = batch_lib.pad_example(ex, seq_len=8, region_frames=4, objects=3, object_frames=2, mask_size=3,
                                pad_token_id=9)
    b = batch_lib.stack([row, row])
    assert set(batch_lib.BATCH_KEYS) <= set(b) and list(b["sample_ids"]) == ["s", "s"]
    shapes = batch_lib.field_shapes(B=2, L=8, T=2, S=4, F=4, K=3, M=2, G=3)
    assert {k: (b[k].shape, b[k].dtype) for k in batch_lib.BATCH_KEYS} == {k: (s, np.dtype(d)) for k, (s, d) in shapes.items()}
    assert b["input_ids"][0].tolist() == [1, VIDEO_TOKEN_INDEX, 7, 7, 2, 9, 9, 9]
    assert b["segment_ids"][0].tolist() == [1] * 5 + [0] * 3 and b["labels"][0, 5:].tolist() == [IGNORE_INDEX] * 3
    assert b["object_frames"][0].tolist() == [[0, 1], [1, -1], [-1, -1]]
    assert b["object_valid"][0].tolist() == [True, True, False]
    assert b["object_masks"][0, 1, 1].sum() == 0 and b["region_frames"][0, 2:].sum() == 0
    # inference examples have no labels field
    no_lab = batch_lib.pad_example(batch_lib.Example("t", [1], ex.frames, ex.region_frames[:0], [], []),
                                   seq_len=2, region_frames=1, objects=1, object_frames=1, mask_size=3, pad_token_id=0)
    assert "labels" not in no_lab and no_lab["object_masks"].shape == (1, 1, 3, 3)


@pytest.mark.parametrize("size, value", [("seq_len", 4), ("region_frames", 1), ("objects", 1), ("object_frames", 1)])
def test_pad_never_truncates(size, value):
    kw = dict(seq_len=8, region_frames=4, objects=3, object_frames=2)
    kw[size] = value
    with pytest.raises(ValueError, match=rf"sample s: {size} needs \d+ but the padded size is {value}"):
        batch_lib.pad_example(_example(), **kw, mask_size=3, pad_token_id=0)


def test_one_expanded_length_for_checks_and_dummy_batch():
    cfg = model_config_from_gin([TINY])
    nv = batch_lib.model_video_tokens(cfg)
    R = cfg.object_encoder.region_token_num
    ids = [5, VIDEO_TOKEN_INDEX, cfg.region_token_id, 6, cfg.region_token_id]
    n = batch_lib.expanded_length(ids, [1, R + 3], region_token_id=cfg.region_token_id, num_video_tokens=nv,
                                  region_token_num=R)
    assert n == 2 + nv + 1 + R  # 2 text ids, the video tokens, min(1, R) + min(R + 3, R) object tokens
    ex = batch_lib.Example("x", ids, np.zeros((cfg.num_frames, 4, 4, 3), np.float32),
                           np.zeros((1, 4, 4, 3), np.float32), [[0], [0] * (R + 3)],
                           [np.ones((1, 2, 2), bool), np.ones((R + 3, 2, 2), bool)])
    b = batch_lib.stack([batch_lib.pad_example(ex, seq_len=8, region_frames=1, objects=2, object_frames=R + 3,
                                               mask_size=2, pad_token_id=0)])
    batch_lib.validate(cfg, b, out_len=n)  # exactly the bound fits
    with pytest.raises(batch_lib.BatchError, match=rf"sample #0: expanded length up to {n} exceeds"):
        batch_lib.validate(cfg, b, out_len=n - 1)
    from vrefer_jax.models import videorefer

    d = videorefer.dummy_batch(cfg, batch_size=2, seq_len=6)
    assert set(d) == set(batch_lib.BATCH_KEYS) and d["object_frames"].min() == -1
    assert d["labels"].max() == IGNORE_INDEX and (d["input_ids"][:, 0] == VIDEO_TOKEN_INDEX).all()
    a = videorefer.dummy_batch(cfg, batch_size=2, seq_len=6, abstract=True)
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (v.shape, v.dtype) for k, v in d.items()}
