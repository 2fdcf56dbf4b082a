"""Sequence packing, both families: a packed row computes exactly what its samples compute alone.

What must hold (tiny configs, fp32): per-segment logits of a packed row equal each sample run alone,
and so do the loss (sum and count over supervised tokens) and the gradients; attention never
crosses segments (perturbing one segment's inputs leaves the others' logits unchanged); with the
blockwise attention too. The loaders pack deterministically, within the row budgets, every sample
exactly once per epoch, and a restored iterator continues exactly (mid-window included)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from data_helpers import save_tiny_tokenizer, tiny_record, write_records
from data_pipeline import loader
from data_pipeline import packing as packing_lib
from vrefer_jax import batch as batch_lib
from vrefer_jax import packed_batch
from vrefer_jax import vl3_batch
from vrefer_jax.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX, VIDEO_TOKEN_INDEX, model_config_from_gin
from vrefer_jax.models import videorefer
from vrefer_jax.models.videorefer import VideoRefer
from vrefer_jax.text import HFTokenizer
from vrefer_jax.training.loss import cross_entropy_sum

flags.FLAGS.mark_as_parsed()
ROOT = os.path.join(os.path.dirname(__file__), "..")
TINY = os.path.join(ROOT, "configs/models/tiny.gin")


# ----------------------------------------------------------------------------- FFD


def test_first_fit_decreasing_respects_every_budget():
    rng = np.random.default_rng(0)
    sizes = [dict(L=int(rng.integers(5, 60)), K=int(rng.integers(0, 3))) for _ in range(40)]
    budget = dict(L=100, K=4)
    rows, used = packing_lib.first_fit_decreasing(sizes, budget, "L")
    assert sorted(i for r in rows for i in r) == list(range(40))
    for r, u in zip(rows, used):
        for k in budget:
            assert sum(sizes[i][k] for i in r) == u[k] <= budget[k]
    # first fit: when an item went to row b, every earlier row a could not take it
    rank = {i: r for r, i in enumerate(sorted(range(40), key=lambda i: -sizes[i]["L"]))}
    for b in range(len(rows)):
        for i in rows[b]:
            for a in range(b):
                before = [j for j in rows[a] if rank[j] < rank[i]]
                assert any(sum(sizes[j][k] for j in before) + sizes[i][k] > budget[k] for k in budget)
    assert len(rows) <= -(-sum(s["L"] for s in sizes) // 100) + 2  # near the lower bound
    with pytest.raises(ValueError, match="over the row budget"):
        packing_lib.first_fit_decreasing([dict(L=101, K=0)], budget, "L")


# ----------------------------------------------------------------------------- VideoRefer-7B model


def _example(rng, cfg, sid, n_text, n_objects, modality="video", T=4):
    """A host `Example` in the contract: text ids around one placeholder and `n_objects` <region>s,
    random frames / masks, labels on the answer part."""
    S, g = cfg.vision.image_size, cfg.vision.grid
    ids = list(rng.integers(1, 500, size=n_text))
    if modality != "text":
        ids.insert(2, VIDEO_TOKEN_INDEX if modality == "video" else IMAGE_TOKEN_INDEX)
        for k in range(n_objects):
            ids.insert(4 + k, cfg.region_token_id)
    labels = [IGNORE_INDEX] * (len(ids) // 2) + list(rng.integers(1, 500, size=len(ids) - len(ids) // 2))
    frames = rng.standard_normal((T, S, S, 3)).astype(np.float32)
    if modality == "image":
        frames[:] = frames[:1]
    elif modality == "text":
        frames[:] = 0
    n_obj = n_objects if modality != "text" else 0
    F = max(1, n_obj)
    region_frames = rng.standard_normal((F, S, S, 3)).astype(np.float32)
    obj_frames, masks = [], []
    for k in range(n_obj):
        m = int(rng.integers(1, 3))
        obj_frames.append([int(x) for x in rng.integers(0, F, size=m)])
        mk = np.zeros((m, g, g), bool)
        for j in range(m):
            y, x = rng.integers(0, g - 1, size=2)
            mk[j, y:y + 2, x:x + 2] = True
        masks.append(mk)
    return batch_lib.Example(sid, ids, frames, region_frames if n_obj else region_frames[:0], obj_frames, masks, labels)


@pytest.fixture(scope="module")
def vr():
    import flax

    cfg = model_config_from_gin([TINY])
    init = jax.jit(lambda r: VideoRefer(cfg).init(r, videorefer.dummy_batch(cfg), out_len=16))  # jitted: fast
    params = flax.linen.meta.unbox(init(jax.random.key(0))["params"])
    rng = np.random.default_rng(1)
    exs = [_example(rng, cfg, "a", 21, 2), _example(rng, cfg, "b", 9, 0, "text"),
           _example(rng, cfg, "c", 15, 1, "image"), _example(rng, cfg, "d", 30, 3)]
    return cfg, params, exs


def _alone(cfg, exs, out_len=96):
    """Each sample alone in its own row of one batch (rows never interact: the batch computes what
    the samples compute one by one, in one compile)."""
    b = batch_lib.stack([batch_lib.pad_example(ex, seq_len=40, region_frames=3, objects=3, object_frames=2,
                                               mask_size=cfg.vision.grid, pad_token_id=0) for ex in exs])
    b.pop("sample_ids")
    return b, out_len


def _packed(cfg, exs, out_len=256, P=3):
    row = packed_batch.pack_examples(exs, seq_len=96, videos=P, region_frames=8, objects=8, object_frames=2,
                                  mask_size=cfg.vision.grid, pad_token_id=0)
    b = batch_lib.stack([row])
    names = list(b.pop("sample_ids"))
    return b, out_len, names


def _loss_and_grad(model, kernel):
    """(params, batch, out_len) -> ((loss sum, (count, logits, segment_ids, positions)), grads)."""
    def f(p, b, n):
        hidden, inputs = model.apply({"params": p}, b, n, return_hidden=True)
        total, count = cross_entropy_sum(hidden, kernel(p), inputs["labels"], segment_ids=inputs["segment_ids"])
        logits = model.apply({"params": p}, hidden, method=type(model).logits)
        return total, (count, logits, inputs["segment_ids"], inputs["positions"])
    return jax.jit(jax.value_and_grad(f, has_aux=True), static_argnums=2)


def _assert_packed_equals_alone(run, params, packed, n_packed, alone, n_alone, n_samples):
    """Per-segment logits, positions, loss sum / count and gradients of the packed row against the
    samples alone (row s of `alone` is segment s + 1 of the packed row)."""
    (t_p, (c_p, lg_p, seg_p, pos_p)), g_p = run(params, packed, n_packed)
    (t_a, (c_a, lg_a, seg_a, _)), g_a = run(params, alone, n_alone)
    seg_p, pos_p = np.asarray(seg_p[0]), np.asarray(pos_p[0])
    for s in range(n_samples):
        mine = np.asarray(seg_a[s]) == 1
        assert (seg_p == s + 1).sum() == mine.sum() > 0
        np.testing.assert_array_equal(pos_p[seg_p == s + 1], np.arange(mine.sum()))  # positions restart
        np.testing.assert_allclose(np.asarray(lg_p[0])[seg_p == s + 1], np.asarray(lg_a[s])[mine], atol=2e-5, rtol=1e-5)
    assert int(c_p) == int(c_a) > 0  # the same supervised tokens: none across a segment boundary
    np.testing.assert_allclose(float(t_p), float(t_a), rtol=1e-5)
    leaves_a = jax.tree_util.tree_leaves(g_a)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_p), leaves_a):
        assert float(jnp.abs(a - b).max()) <= 1e-4 * (float(jnp.abs(b).max()) + 1e-6), jax.tree_util.keystr(path)
    assert max(float(jnp.abs(x).max()) for x in leaves_a) > 0


def _with_impl(cfg, impl, block):
    return cfg.replace(text=dataclasses.replace(cfg.text, attention_impl=impl, attention_block=block))


@pytest.mark.parametrize("impl", ["dense", pytest.param("xla_blockwise", marks=pytest.mark.slow)])
def test_videorefer_packed_row_equals_samples_alone(vr, impl):
    cfg, params, exs = vr
    cfg = _with_impl(cfg, impl, 32)
    model = VideoRefer(cfg)
    packed, out_len, names = _packed(cfg, exs)
    assert names == ["a+b+c+d"] and packed["frames"].shape[:2] == (1, 3)  # 3 videos/images, text takes no slot
    batch_lib.validate(cfg, packed, out_len, names)
    alone, n_alone = _alone(cfg, exs)
    run = _loss_and_grad(model, lambda p: p["lm_head"]["kernel"])
    _assert_packed_equals_alone(run, params, packed, out_len, alone, n_alone, len(exs))


def test_videorefer_no_attention_across_segments(vr):
    """Perturb segment 2 (text ids, its image's pixels, its object's mask): segments 1 and 3 keep
    their logits to the bit with dense attention, and blockwise too."""
    cfg, params, exs = vr
    rng = np.random.default_rng(5)
    for impl in ("dense", "xla_blockwise"):
        c = _with_impl(cfg, impl, 16)
        model = VideoRefer(c)
        trio = [exs[0], exs[2], exs[3]]
        base, out_len, _ = _packed(c, trio)
        pert = {k: v.copy() for k, v in base.items()}
        seg_in = base["segment_ids"][0] == 2
        text = seg_in & (base["input_ids"][0] >= 0) & (base["input_ids"][0] != c.region_token_id)
        pert["input_ids"][0, text] = rng.integers(1, 500, size=int(text.sum()))
        pert["frames"][0, 1] += rng.standard_normal(pert["frames"][0, 1].shape).astype(np.float32)
        fwd = jax.jit(lambda p, b: model.apply({"params": p}, b, out_len))
        (l0, i0), (l1, i1) = fwd(params, base), fwd(params, pert)
        segs = np.asarray(i0["segment_ids"][0])
        np.testing.assert_array_equal(segs, np.asarray(i1["segment_ids"][0]))
        other = (segs == 1) | (segs == 3)
        np.testing.assert_array_equal(np.asarray(l0[0])[other], np.asarray(l1[0])[other])
        assert np.abs(np.asarray(l0[0])[segs == 2] - np.asarray(l1[0])[segs == 2]).max() > 1e-3


def test_pack_examples_contract_and_checks(vr):
    cfg, _, exs = vr
    row = packed_batch.pack_examples(exs, seq_len=96, videos=3, region_frames=8, objects=8, object_frames=2,
                                  mask_size=cfg.vision.grid, pad_token_id=0)
    n = [len(e.input_ids) for e in exs]
    np.testing.assert_array_equal(row["segment_ids"][: sum(n)], np.repeat([1, 2, 3, 4], n))
    assert (row["segment_ids"][sum(n):] == 0).all()
    # objects in row order, their frames shifted into the row's region frames
    f0 = np.cumsum([0] + [e.region_frames.shape[0] for e in exs])
    k = 0
    for i, e in enumerate(exs):
        for fr in e.object_frames:
            assert row["object_frames"][k, : len(fr)].tolist() == [x + f0[i] for x in fr]
            k += 1
    assert row["object_valid"].sum() == k
    np.testing.assert_array_equal(row["frames"][2], exs[3].frames)  # slot 2 = the row's third placeholder
    with pytest.raises(ValueError, match="a\\+b\\+c\\+d: videos needs 3 but the row holds 2"):
        packed_batch.pack_examples(exs, seq_len=96, videos=2, region_frames=8, objects=8, object_frames=2,
                                mask_size=cfg.vision.grid, pad_token_id=0)
    # a row whose second sample puts its <region> before its own video is refused, naming the segment
    bad = batch_lib.Example("z", [5, 6, cfg.region_token_id, VIDEO_TOKEN_INDEX, 7], exs[0].frames,
                            exs[0].region_frames[:1], [[0]], [exs[0].object_masks[0][:1]], [IGNORE_INDEX] * 5)
    b = batch_lib.stack([packed_batch.pack_examples([exs[1], bad], seq_len=40, videos=2, region_frames=2, objects=2,
                                                 object_frames=2, mask_size=cfg.vision.grid, pad_token_id=0)])
    with pytest.raises(batch_lib.BatchError, match=r"b\+z \(segment 2\): every <region> must come after"):
        batch_lib.validate(cfg, b, 96, list(b["sample_ids"]))


# ----------------------------------------------------------------------------- VideoRefer-7B loader


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return HFTokenizer.from_file(save_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """30 tiny video records whose questions run from short to long (1 to 3 objects)."""
    d = tmp_path_factory.mktemp("packrecs")
    recs = []
    for i in range(30):
        k = 1 + i % 3
        q = " ".join(["<region>"] * k) + " " + " ".join(["word"] * (2 + (7 * i) % 23)) + f" {i}?"
        recs.append(tiny_record(f"s{i}", i, "p", masks_per_object=(1,) * k, question=q))
    write_records(str(d / "p-0.tfrecord"), recs)
    return str(d)


def _pcfg(tok, **kw):
    mcfg = model_config_from_gin([TINY], [f"ModelConfig.region_token_id = {tok.region_id}"])
    base = dict(batch_size=2, seq_len=320, image_size=8, grid=4, num_frames=4, max_region_frames=6, max_objects=8,
                max_object_frames=1, seed=5, num_epochs=1, num_shards=1, shard_index=0, pack=True, pack_window=7,
                pack_videos=3, max_expanded_len=360, drop_remainder=False)
    base.update(kw)
    return mcfg, loader.LoaderConfig.for_model(mcfg, **base)


def _rows(it):
    out = []
    for b in it:
        out.append([str(s) for s in b["sample_ids"]])
    return out


def test_loader_packs_every_sample_once_within_budgets(records, tok):
    mcfg, cfg = _pcfg(tok)
    it = loader.make_loader(records, cfg, tok)
    seen, rows = [], 0
    for b in it:
        ids = [str(s) for s in b["sample_ids"]]
        assert b["frames"].shape == (len(ids), 3, 4, 8, 8, 3) and b["input_ids"].shape == (len(ids), 320)
        batch_lib.check_batch(b["input_ids"], b["segment_ids"], b["object_frames"], b["object_valid"],
                              region_token_id=mcfg.region_token_id, num_video_tokens=cfg.num_video_tokens,
                              region_token_num=4, out_len=360, num_region_frames=6, sample_ids=ids, num_videos=3)
        for r, name in enumerate(ids):
            parts = name.split(packed_batch.PACK_SEPARATOR)
            assert int(b["segment_ids"][r].max()) == len(parts)
            seen += parts
            rows += 1
    assert sorted(seen) == sorted(f"s{i}" for i in range(30))  # each once
    assert rows <= 30 * 0.6, rows  # several samples per row
    assert sum(it.skipped.values()) == 0


def test_loader_packing_deterministic_and_resumes_mid_window(records, tok):
    _, cfg = _pcfg(tok, num_epochs=2, drop_remainder=True)
    ref = _rows(loader.make_loader(records, cfg, tok))
    assert ref == _rows(loader.make_loader(records, cfg, tok))
    assert ref != _rows(loader.make_loader(records, _pcfg(tok, num_epochs=2, drop_remainder=True, seed=6)[1], tok))
    for k in (1, 2, 5):
        it = loader.make_loader(records, cfg, tok)
        head = [[str(s) for s in next(it)["sample_ids"]] for _ in range(k)]
        state = json.loads(json.dumps(it.get_state()))
        it2 = loader.make_loader(records, cfg, tok)
        it2.set_state(state)
        assert head + _rows(it2) == ref, k


def test_loader_packing_skips_what_no_row_holds(records, tok):
    _, cfg = _pcfg(tok, seq_len=80, overflow="skip", max_expanded_len=None)
    it = loader.make_loader(records, cfg, tok)
    kept = [s for r in _rows(it) for name in r for s in name.split("+")]
    assert it.skipped["input_ids"] > 0 and len(kept) + it.skipped["input_ids"] == 30


# ----------------------------------------------------------------------------- VRVL3


@pytest.fixture(scope="module")
def vl3(tmp_path_factory):
    from data_pipeline.synthetic import dataset, scene
    from data_pipeline.vl3 import loader as vl3_loader
    from vrefer_jax.config import TextConfig
    from vrefer_jax.main_job import vl3_tokenizer
    from vrefer_jax.text.tokenizer import load_tokenizer
    from vrefer_jax.vl3_config import NaViTConfig, VL3Config

    d = str(tmp_path_factory.mktemp("vl3pack"))
    dataset.generate(d, seed=0, train_videos=6, eval_videos=1, vocab_size=400,
                     cfg=scene.SynthConfig(size=56, mask_frames=2, turns_per_sample=1, prompt_protocol="vl3"))
    tok = load_tokenizer(vl3_tokenizer(d, os.path.join(d, "vl3_tokenizer")))
    cfg = VL3Config(vision=NaViTConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1),
                    text=TextConfig(vocab_size=416, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1),
                    mm_max_length=64, region_token_num=4, image_token_id=tok.token_to_id("<image>"),
                    region_token_id=tok.token_to_id("<REGION>"), pad_token_id=tok.pad_id)
    sizes = dict(seq_len=384, max_patches=1024, max_visual_tokens=96, max_regions=8, max_region_cells=32)
    lcfg = loader.LoaderConfig(batch_size=2, **sizes, shuffle=False, num_shards=1, shard_index=0, fps=1.0,
                               max_frames=8, pack=True, pack_window=4, num_epochs=1)
    path = os.path.join(d, "train.json")
    tr = vl3_loader.VL3SampleTransform(lcfg, cfg, tok, [d])
    entries = json.load(open(path))
    exs = [tr((0, i, e))["_item"] for i, e in enumerate(entries[:3])]
    return dict(cfg=cfg, tok=tok, exs=exs, path=path, lcfg=lcfg, sizes=sizes)


def _vl3_pad(cfg, ex, L, N, V, R, C):
    b = batch_lib.stack([vl3_batch.pad_example(ex, L=L, N=N, V=V, R=R, C=C, Q=cfg.region_token_num,
                                               pad_token_id=cfg.pad_token_id, with_labels=True)])
    b.pop("sample_ids")
    return b


@pytest.mark.parametrize("impl", ["dense", pytest.param("xla_blockwise", marks=pytest.mark.slow)])
def test_vl3_packed_row_equals_samples_alone(vl3, impl):
    import flax

    from vrefer_jax import families
    from vrefer_jax.models.vl3.model import VideoReferVL3

    cfg = _with_impl(vl3["cfg"], impl, 64)
    fam = families.get("videorefer_videollama3")
    init = jax.jit(lambda r: fam.module(cfg).init(r, fam.dummy_batch(cfg)))
    params = flax.linen.meta.unbox(init(jax.random.key(0))["params"])
    exs = vl3["exs"]
    Q = cfg.region_token_num
    sz = {k: sum(e.sizes()[k] for e in exs) for k in ("L", "N", "V", "R")}
    C = max(e.sizes()["C"] for e in exs)
    row = vl3_batch.pad_example(vl3_batch.pack_examples(exs, Q=Q), L=sz["L"] + 5, N=sz["N"], V=sz["V"], R=sz["R"],
                                C=C, Q=Q, pad_token_id=cfg.pad_token_id, with_labels=True)
    packed = batch_lib.stack([row])
    names = list(packed.pop("sample_ids"))
    assert names == ["+".join(e.sample_id for e in exs)]
    fam.validate(cfg, packed, None, names)
    big = {k: max(e.sizes()[k] for e in exs) for k in ("L", "N", "V", "R")}
    alone = batch_lib.stack([vl3_batch.pad_example(e, L=big["L"] + 3, N=big["N"], V=big["V"], R=big["R"], C=C, Q=Q,
                                                   pad_token_id=cfg.pad_token_id, with_labels=True) for e in exs])
    alone.pop("sample_ids")
    run = _loss_and_grad(VideoReferVL3(cfg), fam.output_embedding)
    _assert_packed_equals_alone(run, params, packed, None, alone, None, len(exs))


def test_vl3_loader_packs_and_resumes(vl3):
    from data_pipeline.vl3 import loader as vl3_loader
    from vrefer_jax import families

    cfg, tok, lcfg = vl3["cfg"], vl3["tok"], vl3["lcfg"]
    fam = families.get("videorefer_videollama3")
    mk = lambda c: vl3_loader.make_loader([vl3["path"]], c, tok, cfg)  # noqa: E731
    lcfg = dataclasses.replace(lcfg, num_epochs=2, shuffle=True, pack_window=3, drop_remainder=False)
    ref = []
    seen = []
    for b in mk(lcfg):
        names = [str(s) for s in b["sample_ids"]]
        fam.validate(cfg, {k: v for k, v in b.items() if k != "sample_ids"}, None, names)
        ref.append(names)
        seen += [s for n in names for s in n.split("+")]
    assert len(seen) == 2 * len(set(seen)) and any("+" in n for r in ref for n in r)  # 2 epochs, packed
    for k in (1, 2):
        it = mk(lcfg)
        head = [[str(s) for s in next(it)["sample_ids"]] for _ in range(k)]
        it2 = mk(lcfg)
        it2.set_state(json.loads(json.dumps(it.get_state())))
        assert head + [[str(s) for s in b["sample_ids"]] for b in it2] == ref


def test_videorefer_packed_row_equals_samples_alone_with_lora(vr):
    """LoRA adapters (non-zero B) act per token: a packed row still equals its samples alone."""
    import flax

    from vrefer_jax.config import LoraConfig

    cfg0, _, exs = vr
    cfg = cfg0.replace(text=dataclasses.replace(cfg0.text, lora=LoraConfig(rank=4, alpha=8.0)))
    init = jax.jit(lambda r: VideoRefer(cfg).init(r, videorefer.dummy_batch(cfg), out_len=16))
    params = flax.linen.meta.unbox(init(jax.random.key(0))["params"])
    keys = iter(jax.random.split(jax.random.key(3), 64))
    n_b = [0]

    def nonzero_b(path, x):
        if jax.tree_util.keystr(path).endswith("['lora_b']"):
            n_b[0] += 1
            return 0.1 * jax.random.normal(next(keys), x.shape, x.dtype)
        return x

    params = jax.tree_util.tree_map_with_path(nonzero_b, params)
    assert n_b[0] > 0  # the adapters exist and now change the model
    packed, out_len, _ = _packed(cfg, exs)
    alone, n_alone = _alone(cfg, exs)
    run = _loss_and_grad(VideoRefer(cfg), lambda p: p["lm_head"]["kernel"])
    _assert_packed_equals_alone(run, params, packed, out_len, alone, n_alone, len(exs))
