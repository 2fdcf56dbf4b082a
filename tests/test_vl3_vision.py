"""VRVL3 vision: SigLIP-NaViT encoder, 2x2 merge and `mlp2x_gelu` projector vs
`transformers.models.video_llama_3` (tiny random fp32 config), and the VRVL3 checkpoint key rules.

transformers' `VideoLlama3VisionModel` is the same network as the official `damovl_encoder` (patch
conv, 2D RoPE over head_dim / 2, per-frame attention, post-LN); its state dict lacks the
`vision_model.` level the official checkpoint has, so the test adds it. Its forward also un-blocks
and bilinearly downsamples (§6); the encoder output before that is read with a hook on
`post_layernorm`, and the downsampled output, through `VideoLlama3Projector`, is the reference for
`merge_visual_tokens` + `MlpGeluProjector`.
"""

import functools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vrefer_jax.checkpoints import key_map
from vrefer_jax.checkpoints.vl3_keys import mlp_rules, navit_rules, vl3_rules
from vrefer_jax.config import TextConfig
from vrefer_jax.models.qwen2 import LMHead, Qwen2Model
from vrefer_jax.models.vl3.projector import MlpGeluProjector, merge_visual_tokens
from vrefer_jax.models.vl3.vision import NaViTEncoder, rope_2d_tables
from vrefer_jax.vl3_config import NaViTConfig, VL3Config

torch = pytest.importorskip("torch")
vl3_hf = pytest.importorskip("transformers.models.video_llama_3.modeling_video_llama_3")
VisionConfigHF = pytest.importorskip("transformers").VideoLlama3VisionConfig

pytestmark = pytest.mark.torch

# head_dim 12: RoPE over 6 dims per axis (3 frequencies); theta 100 makes small grids rotate a lot.
TINY = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4, patch_size=4,
            num_channels=3, layer_norm_eps=1e-6)
THETA = 100.0
TEXT_H = 40
W = 4  # patches per visual token (merge 2)
N = 66  # packed patches per row (row 0 has 63 real, row 1 has 24)
# Per batch row: the images / frames / crops packed in it, (grid h, grid w, stride).
ROWS = [
    [(3, 5, 1), (4, 6, 2), (4, 6, 2)],  # an image, then two video frames
    [(2, 3, 1), (2, 4, 2), (5, 2, 1)],  # an image, a frame, a region-crop-like image
]


def _cfg() -> NaViTConfig:
    return NaViTConfig(**TINY, rope_theta=THETA)


def block_order(h: int, w: int, s: int) -> list[tuple[int, int]]:
    """(row, col) of every patch in the processor's order (§3.3 / §4.4), written out as loops."""
    out = []
    for bi in range(h // s):
        for bj in range(w // s):
            for r in range(s):
                for c in range(s):
                    out.append((bi * s + r, bj * s + c))
    return out


def pack(rows, n: int, rng):
    """Host-side packing: patches, segments, coords, visual_patches (V padded), per-row sizes."""
    d = _cfg().patch_dim
    b = len(rows)
    patches = np.zeros((b, n, d), np.float32)
    segs = np.zeros((b, n), np.int32)
    coords = np.zeros((b, n, 2), np.int32)
    tokens = [[] for _ in rows]
    spans = [[] for _ in rows]
    for i, row in enumerate(rows):
        off = 0
        for seg, (h, w, s) in enumerate(row, start=1):
            k = h * w
            patches[i, off:off + k] = rng.uniform(-1, 1, (k, d))
            segs[i, off:off + k] = seg
            coords[i, off:off + k] = block_order(h, w, s)
            for t in range(k // (s * s)):  # block-ordered: a token's patches are consecutive
                ids = list(range(off + t * s * s, off + (t + 1) * s * s))
                tokens[i].append(ids + [-1] * (W - len(ids)))
            spans[i].append((off, off + k))
            off += k
        # padding patches hold garbage: it must not leak into real outputs
        patches[i, off:] = rng.uniform(-1, 1, (n - off, d))
    v = max(len(t) for t in tokens) + 2  # + all -1 padding tokens in every row
    vp = np.full((b, v, W), -1, np.int32)
    for i, t in enumerate(tokens):
        vp[i, :len(t)] = t
    return dict(patches=patches, segments=segs, coords=coords, visual_patches=vp,
                n_real=[s[-1][1] for s in spans], v_real=[len(t) for t in tokens], spans=spans)


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(0)
    hf_cfg = VisionConfigHF(**TINY, hidden_act="gelu_pytorch_tanh",
                            rope_parameters={"rope_type": "axial", "rope_theta": THETA})
    hf_cfg._attn_implementation = "eager"
    model = vl3_hf.VideoLlama3VisionModel(hf_cfg).eval()
    proj = vl3_hf.VideoLlama3Projector(types.SimpleNamespace(
        vision_config=types.SimpleNamespace(hidden_size=TINY["hidden_size"]),
        text_config=types.SimpleNamespace(hidden_size=TEXT_H))).eval()
    with torch.no_grad():  # non-trivial values everywhere, incl. norm scales and biases
        for mod in (model, proj):
            for name, p in mod.named_parameters():
                if "norm" in name and name.endswith("weight"):
                    p.copy_(1.0 + 0.3 * torch.randn_like(p))
                else:
                    p.normal_(0.0, 0.2)
    batch = pack(ROWS, N, np.random.default_rng(0))
    captured = {}
    model.post_layernorm.register_forward_hook(lambda m, i, o: captured.__setitem__("enc", o.detach().clone()))
    enc, tok = [], []
    with torch.no_grad():
        for i, row in enumerate(ROWS):
            n = batch["n_real"][i]
            out = model(pixel_values=torch.from_numpy(batch["patches"][i, :n]),
                        grid_thw=torch.tensor([[1, h, w] for h, w, _ in row]),
                        merge_sizes=torch.tensor([s for _, _, s in row])).last_hidden_state
            enc.append(captured["enc"].numpy())
            tok.append(proj(out).numpy())
    vision_sd = {"vision_model." + k: v for k, v in key_map.torch_state_to_numpy(model.state_dict()).items()}
    proj_sd = key_map.torch_state_to_numpy(proj.state_dict())
    return dict(batch=batch, enc=enc, tok=tok, vision_sd=vision_sd, proj_sd=proj_sd)


def _inputs(batch):
    return tuple(jnp.asarray(batch[k]) for k in ("patches", "segments", "coords"))


def _shapes(module, *args):
    return nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *args))["params"]


@pytest.fixture(scope="module")
def params(ref):
    cfg = _cfg()
    sd = ref["vision_sd"]
    vis = key_map.hf_to_flax(sd, navit_rules(cfg), _shapes(NaViTEncoder(cfg), *_inputs(ref["batch"])),
                             available=list(sd))
    psd = ref["proj_sd"]
    proj = key_map.hf_to_flax(psd, mlp_rules(2, "readout.", "readout"),
                              _shapes(MlpGeluProjector(TEXT_H), jnp.zeros((1, 2, TINY["hidden_size"]))),
                              available=list(psd))
    return dict(vision=vis, proj=proj)


@functools.partial(jax.jit, static_argnums=0)
def _encode(model, params, patches, segments, coords):
    return model.apply({"params": params}, patches, segments, coords)


@jax.jit
def _project(params, features, visual_patches):
    merged = merge_visual_tokens(features, visual_patches)
    return MlpGeluProjector(TEXT_H).apply({"params": params}, merged), merged


def test_encoder_parity(ref, params):
    batch = ref["batch"]
    out = np.asarray(_encode(NaViTEncoder(_cfg()), params["vision"], *_inputs(batch)))
    assert out.shape == (2, N, TINY["hidden_size"])
    assert np.isfinite(out).all()  # padding rows included
    for i, want in enumerate(ref["enc"]):
        got = out[i, :batch["n_real"][i]]
        err = np.abs(got - want).max()
        print(f"navit row {i}: max abs err {err:.3e} (|ref| max {np.abs(want).max():.2f})")
        assert err <= 1e-4


def test_merge_and_projector_parity(ref, params):
    batch = ref["batch"]
    feats = _encode(NaViTEncoder(_cfg()), params["vision"], *_inputs(batch))
    tok, merged = _project(params["proj"], feats, jnp.asarray(batch["visual_patches"]))
    tok, merged = np.asarray(tok), np.asarray(merged)
    for i, want in enumerate(ref["tok"]):
        v = batch["v_real"][i]
        assert want.shape == (v, TEXT_H)
        err = np.abs(tok[i, :v] - want).max()
        print(f"merge+projector row {i}: {v} tokens, max abs err {err:.3e} (|ref| max {np.abs(want).max():.2f})")
        assert err <= 1e-4
        np.testing.assert_array_equal(merged[i, v:], 0.0)  # all -1 token rows give zeros


def test_merge_visual_tokens_mean():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(2, 7, 5)).astype(np.float32)
    vp = np.array([[[0, 1, 2, 3], [4, -1, -1, -1], [-1, -1, -1, -1]],
                   [[6, -1, 5, -1], [2, 2, 3, -1], [0, 1, -1, -1]]], np.int32)
    got = np.asarray(merge_visual_tokens(jnp.asarray(f), jnp.asarray(vp)))
    for b in range(2):
        for v in range(3):
            ids = [p for p in vp[b, v] if p >= 0]
            want = f[b, ids].mean(0) if ids else np.zeros(5)
            np.testing.assert_allclose(got[b, v], want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="visual_patches"):
        merge_visual_tokens(jnp.asarray(f), jnp.asarray(vp[0]))


def test_no_cross_segment_attention(ref, params):
    """Changing one frame's pixels (or the padding's) changes that frame's outputs only."""
    batch = ref["batch"]
    model = NaViTEncoder(_cfg())
    base = np.asarray(_encode(model, params["vision"], *_inputs(batch)))
    lo, hi = batch["spans"][0][1]  # row 0, the first video frame
    pert = dict(batch, patches=batch["patches"].copy())
    pert["patches"][0, lo:hi] += np.random.default_rng(2).normal(size=(hi - lo, _cfg().patch_dim))
    n0, n1 = batch["n_real"]
    pert["patches"][0, n0:] = 7.0  # padding
    pert["patches"][1, n1:] = -7.0
    out = np.asarray(_encode(model, params["vision"], *_inputs(pert)))
    assert np.abs(out[0, lo:hi] - base[0, lo:hi]).max(-1).min() > 1e-3  # every patch of that frame moved
    others = np.r_[0:lo, hi:n0]
    d_other = max(np.abs(out[0, others] - base[0, others]).max(), np.abs(out[1, :n1] - base[1, :n1]).max())
    print(f"perturbed frame: other segments' max change {d_other:.1e}")
    assert d_other <= 1e-6


def test_rope_tables():
    """§3.3 directly: angles row * inv_freq then col * inv_freq, tiled twice."""
    hd, theta = 12, THETA
    coords = jnp.asarray([[[0, 0], [2, 5], [7, 1]]], jnp.int32)
    cos, sin = (np.asarray(t) for t in rope_2d_tables(coords, hd, theta))
    inv = 1.0 / theta ** (np.arange(3) * 2 / 6)
    for n, (r, c) in enumerate([(0, 0), (2, 5), (7, 1)]):
        ang = np.concatenate([r * inv, c * inv])
        np.testing.assert_allclose(cos[0, n], np.cos(np.r_[ang, ang]), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(sin[0, n], np.sin(np.r_[ang, ang]), rtol=1e-6, atol=1e-6)


def test_remat_jit_and_partitioning(ref, params):
    batch, cfg = ref["batch"], _cfg()
    args = _inputs(batch)
    base = _encode(NaViTEncoder(cfg), params["vision"], *args)
    remat = NaViTEncoder(cfg, remat_policy="full")

    def loss(p):
        out = remat.apply({"params": p}, *args)
        return jnp.mean(jnp.square(out)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params["vision"])
    oerr = float(jnp.abs(out - base).max())
    print(f"navit remat=full vs none: max output diff {oerr:.3e}")
    assert oerr <= 1e-5  # same math, fused differently under value_and_grad
    assert all(bool(jnp.isfinite(g).all()) and bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads))

    boxed = jax.eval_shape(NaViTEncoder(cfg).init, jax.random.key(0), *args)["params"]
    specs = jax.tree.map(tuple, nn.get_partition_spec(boxed),
                         is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    lay = specs["encoder"]["layers"]
    assert specs["embeddings"]["patch_embedding"]["kernel"] == (
        "vit_patch_h", "vit_patch_w", "vit_channels", "vit_embed")
    assert specs["post_layernorm"]["scale"] == ("norm",)
    assert lay["self_attn"]["q_proj"]["kernel"] == ("layers", "vit_embed", "vit_heads", "vit_head_dim")
    assert lay["self_attn"]["out_proj"]["kernel"] == ("layers", "vit_heads", "vit_head_dim", "vit_embed")
    assert lay["mlp"]["fc2"]["kernel"] == ("layers", "vit_mlp", "vit_embed")
    assert {x.shape[0] for x in jax.tree.leaves(params["vision"]["encoder"])} == {cfg.num_hidden_layers}


def test_input_checks():
    model, d = NaViTEncoder(_cfg()), _cfg().patch_dim
    ok = (jnp.zeros((1, 4, d)), jnp.ones((1, 4), jnp.int32), jnp.zeros((1, 4, 2), jnp.int32))
    for i, bad, field in [(0, jnp.zeros((1, 4, d + 1)), "patches"), (1, jnp.ones((1, 5), jnp.int32), "segments"),
                          (2, jnp.zeros((1, 4, 3), jnp.int32), "coords")]:
        args = list(ok)
        args[i] = bad
        with pytest.raises(ValueError, match=field):
            jax.eval_shape(model.init, jax.random.key(0), *args)


# ----------------------------------------------------------------------------- the whole checkpoint


def _vl3_shapes(cfg: VL3Config):
    """The Flax tree the full VRVL3 model has (built here from its parts)."""
    v, t = cfg.vision, cfg.text
    tree = {
        "vision_encoder": _shapes(NaViTEncoder(v), jnp.zeros((1, 2, v.patch_dim)), jnp.ones((1, 2), jnp.int32),
                                  jnp.zeros((1, 2, 2), jnp.int32)),
        "mm_projector": _shapes(MlpGeluProjector(t.hidden_size), jnp.zeros((1, 2, v.hidden_size))),
        "region_encoder": _shapes(MlpGeluProjector(t.hidden_size, prefix="feat_linear"),
                                  jnp.zeros((1, 2, v.hidden_size))),
        # through `embed` too, so that the embedding table is created
        "llm": nn.meta.unbox(jax.eval_shape(functools.partial(
            Qwen2Model(t).init, method=lambda m, ids, pos, seg: m(m.embed(ids), pos, seg)),
            jax.random.key(0), jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, 3), jnp.int32),
            jnp.ones((1, 3), jnp.int32)))["params"],
    }
    if not t.tie_word_embeddings:
        tree["lm_head"] = _shapes(LMHead(t), jnp.zeros((1, 3, t.hidden_size)))
    return tree


@pytest.mark.parametrize("tied", [True, False])
def test_vl3_rules_cover_and_round_trip(tied):
    text = TextConfig(vocab_size=64, hidden_size=TEXT_H, intermediate_size=56, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    cfg = VL3Config(vision=_cfg(), text=text)
    shapes = _vl3_shapes(cfg)
    rules = vl3_rules(cfg)
    key_map.check_rules_cover(rules, shapes)
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
    sd = key_map.flax_to_hf(params, rules)
    E, p, H = TINY["hidden_size"], TINY["patch_size"], TEXT_H
    vm = "model.vision_encoder.vision_encoder.vision_model."
    expect_shapes = {
        vm + "embeddings.patch_embedding.weight": (E, 3, p, p),
        vm + "encoder.layers.2.self_attn.out_proj.weight": (E, E),
        vm + "encoder.layers.0.mlp.fc1.weight": (TINY["intermediate_size"], E),
        vm + "post_layernorm.bias": (E,),
        "model.mm_projector.readout.0.weight": (H, E),
        "model.mm_projector.readout.2.bias": (H,),
        "model.region_encoder.feat_linear.0.weight": (H, E),
        "model.region_encoder.feat_linear.2.weight": (H, H),
        "model.embed_tokens.weight": (64, H),
        "model.layers.1.self_attn.k_proj.weight": (20, H),
        "model.norm.weight": (H,),
    }
    for k, s in expect_shapes.items():
        assert sd[k].shape == s, k
    assert ("lm_head.weight" in sd) == (not tied)
    assert not any("position_embedding" in k for k in sd)
    n_vis = 2 + TINY["num_hidden_layers"] * 16 + 2
    assert sum(k.startswith(vm) for k in sd) == n_vis
    back = key_map.hf_to_flax(sd, rules, shapes, available=list(sd))
    jax.tree.map(np.testing.assert_array_equal, back, params)
