"""VRVL3 end to end at a tiny size: samples (an image with 2 regions, a video with one object on 2
frames, a text-only question) -> `preprocess` -> batches -> the model -> generation.

What must hold: every batch passes the contract's checks; a row's logits do not depend on the other
rows of its batch (mixed modalities, padding to a bigger bucket); the predictor gives the same
tokens batched as alone, on one device as on an 8-device mesh; no recompilation within a bucket;
the region rows carry the regions (zeroing them changes the answer's logits)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_helpers import box, rle
from data_pipeline import schema
from data_pipeline.vl3 import preprocess as pre
from vrefer_jax import families, vl3_batch
from vrefer_jax.config import TextConfig
from vrefer_jax.inference import generate as gen_lib
from vrefer_jax.inference.predictor import Predictor
from vrefer_jax.inference.sampling import GenerationConfig
from vrefer_jax.text import vl3_prompt
from vrefer_jax.vl3_config import NaViTConfig, VL3Config

FAMILY = "videorefer_videollama3"


def _write_video(path, n=12, fps=4, w=84, h=56):
    """A moving bright square on a dark ground (so frame-difference pruning keeps some tokens and
    drops the static ones)."""
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            img = np.full((h, w, 3), 30, np.uint8)
            x = 4 + 5 * i % (w - 20)
            img[10:30, x:x + 16] = (220, 60, 40)
            for p in s.encode(__import__("av").VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from PIL import Image

    from test_vl3_prompt import _bpe

    root = tmp_path_factory.mktemp("vl3media")
    tok_dir = tmp_path_factory.mktemp("vl3tok")
    _bpe().save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}))
    tok = vl3_prompt.load_vl3_tokenizer(str(tok_dir))
    _write_video(root / "v.mp4")
    img = np.random.default_rng(0).integers(0, 255, (70, 98, 3), np.uint8)
    Image.fromarray(img).save(root / "i.png")

    cfg = VL3Config(
        vision=NaViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        text=TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                        tie_word_embeddings=True),
        mm_max_length=48, image_token_id=tok.token_to_id("<image>"),
        region_token_id=tok.token_to_id("<REGION>"), pad_token_id=tok.pad_id)
    params = families.get(FAMILY).init_params(cfg, jax.random.key(0))
    raw = [
        {"id": "img2", "image": "i.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat is <region> next to <region>?"},
                           {"from": "gpt", "value": "a cat"}],
         "annotation": [{"0": {"segmentation": rle(box(70, 98, 5, 5, 30, 40))}},
                        {"0": {"segmentation": rle(box(70, 98, 40, 60, 43, 62))}}]},
        {"id": "vid1", "video": "v.mp4",
         "conversations": [{"from": "human", "value": "<video>\nWhere does <region> go?"},
                           {"from": "gpt", "value": "right"}],
         "annotation": [{"2": {"segmentation": rle(box(56, 84, 10, 14, 30, 30))},
                         "6": {"segmentation": rle(box(56, 84, 10, 34, 30, 50))}}]},
        {"id": "txt", "conversations": [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "hello"}]},
    ]
    samples = [schema.parse_sample(r, i, allow_text_only=True) for i, r in enumerate(raw)]
    gen = GenerationConfig(max_new_tokens=6, eos_token_ids=(tok.eos_id,), pad_token_id=tok.pad_id)
    return dict(root=str(root), tok=tok, tok_dir=str(tok_dir), cfg=cfg, params=params, samples=samples, gen=gen)


def _batch(world, rows, dims=None):
    cfg = world["cfg"]
    sizes = [r.sizes() for r in rows]
    dims = dims or {k: max(1, *(s[k] for s in sizes)) for k in vl3_batch.SIZE_KEYS}
    b = vl3_batch.stack([vl3_batch.pad_example(r, **dims, Q=cfg.region_token_num, pad_token_id=cfg.pad_token_id)
                         for r in rows])
    ids = list(b.pop("sample_ids"))
    families.get(FAMILY).validate(cfg, b, sample_ids=ids)
    return b


def _logits(world, batch):
    model = families.get(FAMILY).module(world["cfg"])
    out, _ = jax.jit(lambda p, b: model.apply({"params": p}, b))(world["params"], batch)
    return np.asarray(out)


def test_preprocess_gives_exact_rows(world):
    cfg = world["cfg"]
    img, vid, txt = (pre.preprocess(s, world["root"], cfg, world["tok"], training=True) for s in world["samples"])
    # image: 2 regions, video: one object on 2 frames -> 2 regions, text: none
    assert len(img.region_num_cells) == 2 and len(vid.region_num_cells) == 2 and len(txt.region_num_cells) == 0
    for ex in (img, vid, txt):
        n_reg = int((ex.input_ids == cfg.region_token_id).sum())
        assert n_reg == sum(min(cfg.region_token_num, int(c)) for c in ex.region_num_cells)
        assert int((ex.input_ids == cfg.image_token_id).sum()) == len(ex.visual_patches)
        assert (ex.labels[ex.input_ids == cfg.image_token_id] == -100).all()
    # the video: fps 1 over 3 s of frames; a static background is pruned after the first frame
    t = vid.meta["tokens_per_image"]
    assert len(t) == vid.meta["num_frames"] >= 2 and t[0] > max(t[1:])
    assert img.meta["tokens_per_image"] == [len(img.visual_patches)]
    # a large mask reaches k-means (> Q cells) with a seeded start: the same on every call
    again = pre.preprocess(world["samples"][0], world["root"], cfg, world["tok"], training=True)
    np.testing.assert_array_equal(again.region_init, img.region_init)
    assert img.region_num_cells.max() > cfg.region_token_num


def test_mixed_batch_rows_equal_each_alone(world):
    """An image with 2 regions, a video with 1 object on 2 frames and a text-only row in one batch:
    each row's logits equal that sample's alone (max abs err <= 1e-4)."""
    rows = [pre.preprocess(s, world["root"], world["cfg"], world["tok"], training=True) for s in world["samples"]]
    mixed = _logits(world, _batch(world, rows))
    for b, r in enumerate(rows):
        alone = _logits(world, _batch(world, [r]))[0]
        n = len(r.input_ids)
        err = np.abs(mixed[b, :n] - alone[:n]).max()
        assert err <= 1e-4, (r.sample_id, err)


def test_region_rows_carry_the_regions(world):
    """Zeroing the region tokens (the ablation) changes the logits after the first region row and
    nowhere before it."""
    cfg = world["cfg"]
    r = pre.preprocess(world["samples"][0], world["root"], cfg, world["tok"], training=True)
    b = _batch(world, [r])
    a = _logits(world, b)[0]
    model = families.get(FAMILY).module(cfg.replace(zero_object_tokens=True))
    z = np.asarray(model.apply({"params": world["params"]}, b)[0])[0]
    first = int(np.flatnonzero(r.input_ids == cfg.region_token_id)[0])
    np.testing.assert_allclose(a[:first], z[:first], atol=1e-5)  # jit vs eager: rounding only
    assert np.abs(a[first:len(r.input_ids)] - z[first:len(r.input_ids)]).max() > 1e-4


def test_bad_batches_are_refused_naming_the_sample(world):
    r = pre.preprocess(world["samples"][0], world["root"], world["cfg"], world["tok"], training=True)
    b = _batch(world, [r])
    bad = {k: v.copy() for k, v in b.items()}
    rows = np.flatnonzero(bad["region_index"][0] >= 0)
    bad["region_index"][0, rows[:2]] = bad["region_index"][0, rows[:2]][::-1]  # two tokens swapped
    with pytest.raises(vl3_batch.BatchError, match="img2.*REGION"):
        families.get(FAMILY).validate(world["cfg"], bad, sample_ids=["img2"])
    bad = {k: v.copy() for k, v in b.items()}
    bad["visual_index"][0, np.flatnonzero(bad["visual_index"][0] >= 0)[0]] = -1
    with pytest.raises(vl3_batch.BatchError, match="img2"):
        families.get(FAMILY).validate(world["cfg"], bad, sample_ids=["img2"])


@pytest.fixture(scope="module")
def predictor(world):
    return Predictor(world["cfg"], world["params"], world["tok"], generation=world["gen"])


def test_predictor_batched_equals_alone_and_reuses_programs(world, predictor):
    ss = world["samples"]
    alone = [predictor.answer([s], world["root"])[0] for s in ss]
    n = gen_lib._generate_multimodal._cache_size()
    assert predictor.answer(ss, world["root"], batch_size=3) == alone
    compiled = gen_lib._generate_multimodal._cache_size()
    assert compiled <= n + 1
    # the same bucket again (other samples, same padded sizes): no new program
    predictor.answer(ss[::-1], world["root"], batch_size=3)
    assert gen_lib._generate_multimodal._cache_size() == compiled


def test_sharded_predictor_gives_the_same_tokens(world, predictor):
    from vrefer_jax.sharding import MeshConfig, make_mesh

    ss = world["samples"]
    want = predictor.answer(ss, world["root"], batch_size=2)
    mesh = make_mesh(MeshConfig(2, 1, 4), jax.devices()[:8])
    sharded = Predictor(world["cfg"], world["params"], world["tok"], generation=world["gen"], mesh=mesh)
    assert len(sharded.params["llm"]["embed_tokens"]["embedding"].sharding.device_set) == 8
    assert sharded.answer(ss, world["root"], batch_size=2) == want


def test_training_step_runs_on_the_family(world):
    """The shared train step takes a VRVL3 config (tied head: the loss reads the embedding)."""
    from vrefer_jax.sharding import MeshConfig, logical_axis_rules, make_mesh
    from vrefer_jax.training import optimizer, step as step_lib, train_state

    cfg = world["cfg"]
    rows = [pre.preprocess(s, world["root"], cfg, world["tok"], training=True) for s in world["samples"][:2]]
    batch = _batch(world, rows)
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    rules = logical_axis_rules()
    tx, sched = optimizer.make_optimizer(optimizer.OptimizerConfig(
        learning_rate=1e-3, warmup_ratio=0.0, trainable=("mm_projector", "region_encoder", "llm")), 10)
    sh = train_state.state_shardings(cfg, tx, mesh, rules)
    state = train_state.create_state(cfg, tx, sh, seed=0, params=jax.tree.map(jnp.array, world["params"]))
    run = step_lib.make_train_step(cfg, step_lib.StepConfig(out_len=batch["input_ids"].shape[1]), tx, sched,
                                   ("mm_projector", "region_encoder", "llm"), mesh, rules, sh,
                                   {k: v.ndim for k, v in batch.items()})
    losses = []
    for _ in range(3):
        state, m = run(state, batch)
        losses.append(float(m["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_bench_q_and_d_with_the_vl3_protocols(world, predictor, tmp_path):
    """Bench-Q (frame folders at 3 fps sampled at fps 1: frames 1, 4 -> "Time 0.3s", "Time 1.3s")
    and Bench-D (prompt before the frames) through the shared runner with the real VRVL3 predictor."""
    import argparse

    from test_eval_bench_q import make_bench
    from vrefer_jax.evaluation import bench_d, bench_q, cli

    media = str(tmp_path / "media")
    entries = make_bench(media, n=3)
    fam = families.get(FAMILY)
    args = argparse.Namespace(num_frames=None, fps=None, max_frames=None)
    predictor.configure(**cli.host_options(fam, "bench-q", args))
    items = bench_q.load(entries, "single", fam.bench_protocol)
    p = predictor.prepare(items[0], media)
    text = world["tok"].decode(p.input_ids, skip_special_tokens=False)
    assert "Time 0.3s:" in text and "Time 1.3s:" in text and "[<REGION>" in text and "[[" not in text
    assert p.meta["num_frames"] == 2
    res = bench_q.run(items, predictor, str(tmp_path / "q.jsonl"), media_root=media, batch_size=2)
    assert res.written == 3 and res.errors == 0
    rows = runner_rows(res.path)
    assert all(isinstance(r["pred"], str) for r in rows)

    d_items = bench_d.load([{"video": e["video"], "caption": "a thing", "frame_idx": 3, "annotation": e["annotation"][:1]}
                            for e in entries], "single", fam.bench_protocol)
    predictor.configure(**cli.host_options(fam, "bench-d", args))
    p = predictor.prepare(d_items[0], media)
    first_image = int(np.flatnonzero(p.input_ids == world["cfg"].image_token_id)[0])
    first_region = int(np.flatnonzero(p.input_ids == world["cfg"].region_token_id)[0])
    assert first_region < first_image  # text (with the region) before the frames
    assert p.meta["num_frames"] == 6  # fps 4 over a 3 fps folder: every frame
    res = bench_d.run(d_items, predictor, str(tmp_path / "d.jsonl"), media_root=media, batch_size=2)
    assert res.written == 3 and res.errors == 0
    predictor.configure(fps=1)


def runner_rows(path):
    return [json.loads(line) for line in open(path)]


def test_block_attention_predictor_equals_dense(world, predictor):
    """`vision_attention_chunk`: the predictor lays each sample out in blocks (no frame or crop
    crosses one) and answers as the dense encoder does."""
    ss = world["samples"]
    blocked = Predictor(world["cfg"].replace(vision_attention_chunk=128), world["params"], world["tok"],
                        generation=world["gen"])
    batch, _ = blocked.make_batch([blocked.prepare(s, world["root"]) for s in ss])
    assert batch["patches"].shape[1] % 128 == 0
    assert blocked.answer(ss, world["root"], batch_size=3) == predictor.answer(ss, world["root"], batch_size=3)


def test_bf16_weight_cast_leaves_loss_and_gradients_unchanged(world):
    """The train step's one-time bf16 cast of the matmul weights (`precision.cast_weights`) equals
    VRVL3's layers casting the fp32 weights themselves, tied LM head included."""
    from vrefer_jax.models import precision
    from vrefer_jax.training.loss import cross_entropy_sum

    fam = families.get(FAMILY)
    cfg = world["cfg"].replace(dtype="bfloat16")
    rows = [pre.preprocess(s, world["root"], cfg, world["tok"], training=True) for s in world["samples"][:2]]
    batch = {k: jnp.asarray(v) for k, v in _batch(world, rows).items()}
    model = fam.module(cfg)

    def loss(p, cast):
        p = precision.cast_weights(p, cfg.compute_dtype) if cast else p
        hidden, inp = model.apply({"params": p}, batch, return_hidden=True)
        s, c = cross_entropy_sum(hidden, fam.output_embedding(p), inp["labels"], compute_dtype=cfg.compute_dtype,
                                 segment_ids=inp["segment_ids"])
        return s / c

    params = jax.tree.map(jnp.asarray, world["params"])
    (l0, g0), (l1, g1) = (jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, c) for c in (False, True))
    assert float(l0) == float(l1) and np.isfinite(float(l0))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree_util.tree_leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9, err_msg=jax.tree_util.keystr(path))
