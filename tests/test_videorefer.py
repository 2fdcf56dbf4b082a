"""The composite model: splice placement on a mixed batch, count checks, dtypes, 7B shapes."""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vrefer_jax.checkpoints import key_map
from vrefer_jax.checkpoints import videorefer_keys as keys
from vrefer_jax.config import (IGNORE_INDEX, IMAGE_TOKEN_INDEX, VIDEO_TOKEN_INDEX, ModelConfig,
                               model_config_from_gin)
from vrefer_jax.models import videorefer
from vrefer_jax import batch as batch_lib
from vrefer_jax.batch import BatchError
from vrefer_jax.models.splice import splice
from vrefer_jax.models.videorefer import VideoRefer

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs" / "models"
TINY = str(CONFIGS / "tiny.gin")
OUT_LEN = 48


@functools.lru_cache(maxsize=None)
def tiny_cfg(**kw) -> ModelConfig:
    return model_config_from_gin([TINY]).replace(**kw)


def reference_splice(ids, labels, segs, text_emb, video, obj_tokens, counts, region_id, out_len):
    """The official splice, one sample at a time, as a plain loop over the ids."""
    B, E = ids.shape[0], text_emb.shape[-1]
    emb = np.zeros((B, out_len, E), np.float32)
    lab = np.full((B, out_len), IGNORE_INDEX, np.int64)
    for b in range(B):
        rows, labs, k = [], [], 0
        for i in np.flatnonzero(segs[b] > 0):
            if ids[b, i] in (IMAGE_TOKEN_INDEX, VIDEO_TOKEN_INDEX):
                rows += list(video[b])
                labs += [IGNORE_INDEX] * len(video[b])
            elif ids[b, i] == region_id:
                rows += list(obj_tokens[b, k, : counts[b, k]])
                labs += [IGNORE_INDEX] * int(counts[b, k])
                k += 1
            else:
                rows.append(text_emb[b, i])
                labs.append(labels[b, i])
        emb[b, : len(rows)] = np.stack(rows)
        lab[b, : len(labs)] = labs
    return emb, lab


def mixed_batch(cfg: ModelConfig, rng: np.random.Generator):
    """4 rows: video + 2 single-frame objects; video + 1 multi-frame object (7 frames, 5 of them
    identical, so the token merge ties); image + 1 object; text only."""
    B, L, T, S = 4, 24, cfg.num_frames, cfg.vision.image_size
    F, K, M, H, W = 8, 2, 8, 20, 36  # full-resolution non-square masks, resized on the device
    reg = cfg.region_token_id
    ids = rng.integers(1, 200, size=(B, L)).astype(np.int32)
    segs = np.zeros((B, L), np.int32)
    labels = rng.integers(1, 200, size=(B, L)).astype(np.int32)
    obj_frames = np.full((B, K, M), -1, np.int32)
    obj_masks = np.zeros((B, K, M, H, W), bool)
    valid = np.zeros((B, K), bool)
    # row 0: video, two objects on the same single frame
    ids[0, [2, 9, 14]] = [VIDEO_TOKEN_INDEX, reg, reg]
    segs[0, :20] = 1
    obj_frames[0, :, 0] = 0
    valid[0] = True
    # row 1: video, one object on 7 frames
    ids[1, [1, 6]] = [VIDEO_TOKEN_INDEX, reg]
    segs[1, :16] = 1
    obj_frames[1, 0, :7] = [0, 1, 2, 3, 4, 5, 6]
    valid[1, 0] = True
    # row 2: image, one object
    ids[2, [0, 5]] = [IMAGE_TOKEN_INDEX, reg]
    segs[2, :12] = 1
    obj_frames[2, 0, 0] = 0
    valid[2, 0] = True
    # row 3: text only
    segs[3, :22] = 1
    for b, k in zip(*np.nonzero(valid)):
        for m in range(int((obj_frames[b, k] >= 0).sum())):
            y0, x0 = rng.integers(0, H // 2), rng.integers(0, W // 2)
            obj_masks[b, k, m, y0:y0 + H // 2, x0:x0 + W // 2] = True
    frames = rng.standard_normal((B, T, S, S, 3)).astype(np.float32)
    frames[2] = frames[2, :1]  # an image is repeated to T frames
    frames[3] = 0  # text-only: a zero video, never spliced in
    region_frames = rng.standard_normal((B, F, S, S, 3)).astype(np.float32)
    region_frames[1, 2:6] = region_frames[1, 1]  # 5 identical frames: 4 sims tie at the top
    obj_masks[1, 0, 2:6] = obj_masks[1, 0, 1]
    region_frames[2, 0] = frames[2, 0]
    return dict(input_ids=ids, labels=labels, segment_ids=segs, frames=frames,
                region_frames=region_frames, object_frames=obj_frames, object_masks=obj_masks,
                object_valid=valid)


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_cfg()
    params = videorefer.init_params(cfg, jax.random.key(0))
    return cfg, params


def test_splice_mixed_batch_places_every_vector(tiny):
    cfg, params = tiny
    model = VideoRefer(cfg)
    batch = mixed_batch(cfg, np.random.default_rng(0))
    batch_lib.validate(cfg, batch, OUT_LEN)
    out = jax.jit(lambda p, b: model.apply({"params": p}, b, OUT_LEN, method=VideoRefer.embed_inputs))(params, batch)

    # The pieces, computed separately through the same sub-modules.
    def pieces(m, b):
        feats, rfeats = m.encode_visual(b["frames"], b["region_frames"])
        video = m.encode_video(feats)
        tok, cnt = m.encode_objects(rfeats, b["object_frames"], b["object_masks"], b["object_valid"])
        return m.embed_tokens(b["input_ids"]), video, tok, cnt

    text_emb, video, tok, cnt = jax.jit(lambda p, b: model.apply({"params": p}, b, method=pieces))(params, batch)
    cnt = np.asarray(cnt)
    # single-frame objects -> 1 token; the 7-frame object: 4 tied sims, r = 3 → 7 - 4 = 3 tokens
    assert cnt[0].tolist() == [1, 1] and cnt[2, 0] == 1 and cnt[3].tolist() == [0, 0]
    assert cnt[1, 0] == 3, cnt
    exp_emb, exp_lab = reference_splice(
        batch["input_ids"], batch["labels"], batch["segment_ids"], np.asarray(text_emb),
        np.asarray(video), np.asarray(tok), cnt, cfg.region_token_id, OUT_LEN)
    np.testing.assert_array_equal(np.asarray(out["inputs_embeds"]), exp_emb)
    np.testing.assert_array_equal(np.asarray(out["labels"]), exp_lab)
    nv = video.shape[1]
    lengths = [20 - 3 + nv + 2, 16 - 2 + nv + cnt[1, 0], 12 - 2 + nv + 1, 22]
    np.testing.assert_array_equal(np.asarray(out["lengths"]), lengths)
    for b, n in enumerate(lengths):
        np.testing.assert_array_equal(np.asarray(out["positions"][b, :n]), np.arange(n))
        np.testing.assert_array_equal(np.asarray(out["segment_ids"][b]), np.arange(OUT_LEN) < n)


def test_splice_packed_rows_restart_positions():
    """Two samples packed in one row keep their segments; positions restart per segment."""
    E, nv = 3, 4
    ids = np.array([[5, VIDEO_TOKEN_INDEX, 7, 9, VIDEO_TOKEN_INDEX, 11, 99, 0]], np.int32)
    segs = np.array([[1, 1, 1, 2, 2, 2, 2, 0]], np.int32)
    labels = np.arange(8, dtype=np.int32)[None] + 100
    text = np.arange(8 * E, dtype=np.float32).reshape(1, 8, E)
    video = -np.arange(1, nv * E + 1, dtype=np.float32).reshape(1, nv, E)
    obj = np.ones((1, 1, 4, E), np.float32) * 42
    emb, lab, seg, pos, n = splice(jnp.asarray(text), ids, labels, segs, video, obj,
                                   np.array([[2]], np.int32), region_token_id=99, out_len=16)
    assert int(n[0]) == 3 + nv + 4 + nv - 1  # 99 is a region id with count 2 → 2 rows
    np.testing.assert_array_equal(np.asarray(seg[0]), [1] * (2 + nv) + [2] * (4 + nv) + [0] * 2)
    np.testing.assert_array_equal(np.asarray(pos[0, : 2 + nv]), np.arange(2 + nv))
    np.testing.assert_array_equal(np.asarray(pos[0, 2 + nv: 6 + 2 * nv]), np.arange(4 + nv))
    np.testing.assert_array_equal(np.asarray(emb[0, 1: 1 + nv]), video[0])
    np.testing.assert_array_equal(np.asarray(emb[0, 4 + 2 * nv: 6 + 2 * nv]), obj[0, 0, :2])
    assert np.asarray(lab[0, 0]) == 100 and (np.asarray(lab[0, 1: 1 + nv]) == IGNORE_INDEX).all()


@pytest.mark.parametrize("edit, message", [
    (lambda b: b["input_ids"].__setitem__((0, 15), 511), "3 <region> tokens in the text but 2 objects"),
    (lambda b: b["input_ids"].__setitem__((0, 14), 7), "1 <region> tokens in the text but 2 objects"),
    (lambda b: b["object_valid"].__setitem__((3, 0), True), "0 <region> tokens in the text but 1 objects"),
    (lambda b: (b["input_ids"].__setitem__((1, 1), 7), b["input_ids"].__setitem__((1, 8), VIDEO_TOKEN_INDEX)),
     "must come after"),
    (lambda b: b["object_frames"].__setitem__((1, 0, 1), 9), "not a valid prefix"),
    (lambda b: b["input_ids"].__setitem__((2, 3), VIDEO_TOKEN_INDEX), "2 <video>/<image> placeholders"),
])
def test_count_mismatches_raise_naming_the_sample(edit, message):
    cfg = tiny_cfg()
    batch = mixed_batch(cfg, np.random.default_rng(1))
    edit(batch)
    names = ["vid-a", "vid-b", "img-c", "txt-d"]
    with pytest.raises(BatchError, match=message) as e:
        batch_lib.validate(cfg, batch, OUT_LEN, sample_ids=names)
    assert any(n in str(e.value) for n in names)


def test_overflow_of_static_length_raises():
    cfg = tiny_cfg()
    batch = mixed_batch(cfg, np.random.default_rng(2))
    with pytest.raises(BatchError, match="sample #0: expanded length up to"):
        batch_lib.validate(cfg, batch, out_len=20)


def test_forward_no_recompile_and_bf16(tiny):
    cfg, params = tiny
    model = VideoRefer(cfg)
    fwd = jax.jit(lambda p, b: model.apply({"params": p}, b, OUT_LEN)[0])
    rng = np.random.default_rng(3)
    b1, b2 = mixed_batch(cfg, rng), mixed_batch(cfg, rng)
    b2["object_frames"][1, 0, :7] = [0, 1, 2, 5, 6, 7, 3]  # different frames → different counts
    l1, l2 = fwd(params, b1), fwd(params, b2)
    assert fwd._cache_size() == 1
    assert l1.shape == (4, OUT_LEN, cfg.text.vocab_size) and np.isfinite(l1).all() and np.isfinite(l2).all()
    # bf16 compute with the same fp32 params: close to fp32 (loose, bf16 has 8 mantissa bits)
    bf = VideoRefer(cfg.replace(dtype="bfloat16"))
    l_bf = jax.jit(lambda p, b: bf.apply({"params": p}, b, OUT_LEN)[0])(params, b1)
    assert l_bf.dtype == jnp.float32
    err = float(jnp.max(jnp.abs(l_bf - l1)))
    scale = float(jnp.max(jnp.abs(l1)))
    print(f"bf16 vs fp32 logits: max abs err {err:.3g} (max |logit| {scale:.3g})")
    assert err < 0.1 * scale


def test_remat_switch_same_loss_and_grads(tiny):
    cfg, params = tiny
    batch = mixed_batch(cfg, np.random.default_rng(4))

    def loss_fn(p, c):
        logits, inp = VideoRefer(c).apply({"params": p}, batch, OUT_LEN)
        lab = inp["labels"][:, 1:]
        lp = jax.nn.log_softmax(logits[:, :-1])
        nll = -jnp.take_along_axis(lp, jnp.maximum(lab, 0)[..., None], -1)[..., 0]
        return jnp.sum(jnp.where(lab >= 0, nll, 0)) / jnp.maximum(jnp.sum(lab >= 0), 1)

    l0, g0 = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, cfg)))(params)
    l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, cfg.replace(remat_policy="full"))))(params)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g0, g1)
    # the tower is frozen: exactly zero gradient; the region encoder and LLM learn
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree_util.tree_leaves(g0["vision_tower"]))
    assert float(jnp.abs(g0["region_encoder"]["feat_linear_0"]["kernel"]).max()) > 0
    # train_vision_tower lets gradients into every tower layer the model uses; the rest is unchanged
    g2 = jax.jit(jax.grad(lambda p: loss_fn(p, cfg.replace(train_vision_tower=True))))(params)
    assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree_util.tree_leaves(g2["vision_tower"]["embeddings"]))
    assert float(jnp.abs(g2["vision_tower"]["encoder"]["layers"]["mlp"]["fc1"]["kernel"]).max()) > 0
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                           g0["llm"], g2["llm"])


def test_scan_unroll_same_loss_and_grads(tiny):
    """`scan_unroll` changes only how the layer loops are emitted: same parameter tree, loss and
    gradients."""
    cfg, params = tiny
    batch = mixed_batch(cfg, np.random.default_rng(6))

    def loss_fn(p, c):
        logits, inp = VideoRefer(c).apply({"params": p}, batch, OUT_LEN)
        lab = inp["labels"][:, 1:]
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), jnp.maximum(lab, 0)[..., None], -1)[..., 0]
        return jnp.sum(jnp.where(lab >= 0, nll, 0)) / jnp.maximum(jnp.sum(lab >= 0), 1)

    l0, g0 = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, cfg)))(params)
    for unroll in (100,):
        c = cfg.replace(scan_unroll=unroll)
        assert jax.tree.map(lambda x: x.shape, videorefer.abstract_params(c)) == jax.tree.map(lambda x: x.shape, params)
        l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, c)))(params)
        np.testing.assert_allclose(l0, l1, rtol=1e-6)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g0, g1)


def test_7b_abstract_init_matches_checkpoint_parameter_count():
    """eval_shape of the 7B config allocates nothing; the count matches the released checkpoint."""
    cfg = model_config_from_gin([str(CONFIGS / "videorefer_7b.gin")])
    shapes = videorefer.abstract_params(cfg)
    parts = {k: videorefer.count_params(v) for k, v in shapes.items()}
    # Figures from the checkpoint layout (reference §6.2): Qwen2-7B at vocab 151647 (embeddings +
    # 28 layers + norm, and the untied lm_head), STC v35 projector, region encoder, SigLIP's
    # first 26 layers + embeddings.
    assert parts["llm"] + parts["lm_head"] == 7_612_627_456
    assert parts["mm_projector"] == 376_889_248
    assert parts["region_encoder"] == 16_980_992
    assert parts["vision_tower"] == 397_745_440
    total = sum(parts.values())
    assert total == 8_404_243_136
    # The checkpoint also stores SigLIP's layer 26, post_layernorm and the MAP head (unused by the
    # model): 15,239,504 + 2,304 + 15,238,352 = 30,480,160 → 8,434,723,296 stored parameters,
    # the 16.87 GB of fp16 shards.
    rules = keys.videorefer_rules(cfg)
    key_map.check_rules_cover(rules, shapes)
    hf_total = 0
    for r in rules:
        shp = key_map.get_path(shapes, r.flax).shape
        hf_total += int(np.prod(key_map.hf_shape(r, shp))) * (shp[0] if r.stacked else 1)
    assert hf_total == total
    print(f"VideoRefer-7B parameters in the Flax tree: {total:,} "
          f"(+30,480,160 unused SigLIP tensors = 8,434,723,296 in the checkpoint)")


def test_initializer_range_sets_the_decoder_and_object_encoder_init():
    """`TextConfig.initializer_range` is the std of every decoder kernel, the embedding, the
    lm_head and the object encoder's MLP; the tower and the connector keep their own inits."""
    import dataclasses

    base = tiny_cfg()
    wide = base.replace(text=dataclasses.replace(base.text, initializer_range=0.1))
    p0, p1 = (videorefer.init_params(c, jax.random.key(0)) for c in (base, wide))
    leaf = lambda p, *path: np.asarray(functools.reduce(lambda t, k: t[k], path, p))  # noqa: E731
    scaled = [("llm", "embed_tokens", "embedding"), ("lm_head", "kernel"),
              ("llm", "layers", "self_attn", "q_proj", "kernel"), ("llm", "layers", "mlp", "down_proj", "kernel"),
              ("region_encoder", "feat_linear_0", "kernel"), ("region_encoder", "feat_linear_2", "kernel")]
    for path in scaled:
        a, b = leaf(p0, *path), leaf(p1, *path)
        np.testing.assert_allclose(a.std(), 0.02, rtol=0.15, err_msg=str(path))
        np.testing.assert_allclose(b.std(), 0.1, rtol=0.15, err_msg=str(path))
    for part in ("vision_tower", "mm_projector"):
        for a, b in zip(jax.tree_util.tree_leaves(p0[part]), jax.tree_util.tree_leaves(p1[part])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sharded_init_and_forward_on_8_fake_devices(tiny):
    """Every parameter's logical names resolve through the rules table onto a (2, 2, 2) mesh; the
    sharded forward equals the single-device one."""
    import flax.linen as nn
    from jax.sharding import Mesh, PartitionSpec as P

    from vrefer_jax.sharding import logical_axis_rules

    cfg, params = tiny
    assert jax.device_count() >= 8, "conftest sets 8 fake CPU devices"
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    rules = logical_axis_rules()
    model = VideoRefer(cfg)
    batch = mixed_batch(cfg, np.random.default_rng(5))
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), batch, OUT_LEN))["params"]
    specs = nn.get_partition_spec(boxed)
    # every leaf carries names (a PartitionSpec with one entry per dimension)
    for path, leaf in key_map.flatten_paths(nn.meta.unbox(boxed)).items():
        spec = key_map.get_path(specs, path)
        assert isinstance(spec, P) and len(spec) == len(leaf.shape), (path, spec)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        sharded = jax.jit(lambda p: p, out_shardings=shardings)(params)
        logits = jax.jit(lambda p, b: model.apply({"params": p}, b, OUT_LEN)[0])(sharded, batch)
    gate = sharded["llm"]["layers"]["mlp"]["gate_proj"]["kernel"]
    assert gate.sharding.spec == P(None, "fsdp", "tensor")
    assert sharded["lm_head"]["kernel"].sharding.spec == P("fsdp", "tensor")
    ref = jax.jit(lambda p, b: model.apply({"params": p}, b, OUT_LEN)[0])(params, batch)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=1e-4, rtol=1e-4)
