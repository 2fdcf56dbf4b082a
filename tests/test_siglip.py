"""SigLIP vision tower vs `transformers.SiglipVisionModel` (tiny random fp32 config)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vrefer_jax.checkpoints import key_map
from vrefer_jax.checkpoints.key_map import KeyMappingError
from vrefer_jax.config import VisionConfig
from vrefer_jax.checkpoints.videorefer_keys import siglip_ignore_patterns as hf_ignore_patterns
from vrefer_jax.checkpoints.videorefer_keys import siglip_rules as hf_rules
from vrefer_jax.models.siglip import SiglipVisionTower

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.torch

# 30 is not a multiple of 7 (like 384 / 14): a 4x4 grid, the last 2 pixel rows/cols unseen.
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            image_size=30, patch_size=7, num_channels=3, layer_norm_eps=1e-6)


def _cfg(select_layer: int = -2) -> VisionConfig:
    return VisionConfig(**TINY, select_layer=select_layer)


@pytest.fixture(scope="module")
def ref():
    """Randomised torch model, its state dict under checkpoint names, inputs and hidden states."""
    torch.manual_seed(0)
    hf_cfg = transformers.SiglipVisionConfig(**TINY, hidden_act="gelu_pytorch_tanh",
                                             attn_implementation="eager")
    model = transformers.SiglipVisionModel(hf_cfg).eval()
    with torch.no_grad():  # non-trivial values everywhere, incl. norms, biases and positions
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.3)
        pixels = torch.rand(2, 3, 30, 30) * 2 - 1
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states
    # transformers 5 flattens SiglipVisionModel (no `vision_model` attribute); checkpoints (Google's
    # SigLIP, VideoRefer's stored tower) keep the `vision_model.` prefix the rules use.
    sd = {"vision_model." + k: v for k, v in key_map.torch_state_to_numpy(model.state_dict()).items()}
    return dict(sd=sd, pixels=pixels.permute(0, 2, 3, 1).numpy(),
                hidden=[h.numpy() for h in hidden])


def _shapes(model, pixels):
    return nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(pixels)))["params"]


def _load(cfg, model, ref, sd=None):
    sd = ref["sd"] if sd is None else sd
    return key_map.hf_to_flax(sd, hf_rules(cfg), _shapes(model, ref["pixels"]),
                              available=list(sd), ignore=hf_ignore_patterns(cfg))


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, pixels):
    return model.apply({"params": params}, pixels)


@pytest.mark.parametrize("select_layer", [-2, -1, 1, 0])
def test_parity_selected_hidden_state(ref, select_layer):
    cfg = _cfg(select_layer)
    model = SiglipVisionTower(cfg)
    params = _load(cfg, model, ref)
    n_layers = jax.tree.leaves(params["encoder"])[0].shape[0] if "encoder" in params else 0
    assert n_layers == cfg.num_layers_run  # only the layers that feed the selected state exist
    out = np.asarray(_apply(model, params, ref["pixels"]))
    want = ref["hidden"][select_layer]
    assert out.shape == want.shape == (2, cfg.num_patches, cfg.hidden_size)
    err = np.abs(out - want).max()
    print(f"siglip select_layer={select_layer}: max abs err {err:.3e} (|ref| max {np.abs(want).max():.2f})")
    assert err <= 1e-4


def test_round_trip_and_partitioning(ref):
    cfg = _cfg()
    model = SiglipVisionTower(cfg)
    params = _load(cfg, model, ref)
    back = key_map.flax_to_hf(params, hf_rules(cfg))
    # Everything except the skipped last layer, post_layernorm and head comes back bit-exact.
    expect = {k for k in ref["sd"] if ".layers.3." not in k and "post_layernorm" not in k
              and ".head." not in k}
    assert set(back) == expect
    for k in expect:
        np.testing.assert_array_equal(back[k], ref["sd"][k], err_msg=k)

    boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(ref["pixels"]))["params"]
    specs = jax.tree.map(tuple, nn.get_partition_spec(boxed),
                         is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    lay = specs["encoder"]["layers"]
    assert specs["embeddings"]["patch_embedding"]["kernel"] == ("vit_patch_h", "vit_patch_w", "vit_channels", "vit_embed")
    assert specs["embeddings"]["position_embedding"]["embedding"] == ("vit_pos", "vit_embed")
    assert lay["self_attn"]["q_proj"]["kernel"] == ("layers", "vit_embed", "vit_heads", "vit_head_dim")
    assert lay["self_attn"]["out_proj"]["kernel"] == ("layers", "vit_heads", "vit_head_dim", "vit_embed")
    assert lay["mlp"]["fc1"]["kernel"] == ("layers", "vit_embed", "vit_mlp")
    assert lay["layer_norm1"]["scale"] == ("layers", "norm")


def test_remat_grads_and_bf16(ref):
    cfg = _cfg()
    params = _load(cfg, SiglipVisionTower(cfg), ref)
    pixels = jnp.asarray(ref["pixels"])

    # remat only changes what the backward pass stores: same forward, finite gradients.
    remat = SiglipVisionTower(cfg, remat_policy="full")

    def loss(p):
        out = remat.apply({"params": p}, pixels)
        return jnp.mean(jnp.square(out)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    oerr = float(jnp.abs(out - _apply(SiglipVisionTower(cfg), params, pixels)).max())
    print(f"siglip remat=full vs none: max output diff {oerr:.3e}")
    assert oerr <= 1e-6
    assert all(bool(jnp.isfinite(g).all()) and bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads))

    out16 = _apply(SiglipVisionTower(cfg, dtype=jnp.bfloat16), params, pixels)
    assert out16.dtype == jnp.bfloat16
    want = ref["hidden"][-2]
    rel = np.abs(np.asarray(out16, np.float32) - want).max() / np.abs(want).max()
    print(f"siglip bf16 compute: max abs err / max |ref| = {rel:.3e}")
    assert np.isfinite(rel) and rel < 5e-2


def test_key_errors(ref):
    cfg = _cfg()
    model = SiglipVisionTower(cfg)
    gone = "vision_model.encoder.layers.1.mlp.fc1.bias"
    with pytest.raises(KeyMappingError, match=gone.replace(".", r"\.")):
        _load(cfg, model, ref, {k: v for k, v in ref["sd"].items() if k != gone})
    bad = "vision_model.encoder.layers.0.self_attn.q_proj.weight"
    with pytest.raises(KeyMappingError, match=bad.replace(".", r"\.")):
        _load(cfg, model, ref, {**ref["sd"], bad: np.zeros((32, 31), np.float32)})
    extra = "vision_model.encoder.extra.weight"  # not covered by a rule nor an ignore pattern
    with pytest.raises(KeyMappingError, match=extra.replace(".", r"\.")):
        _load(cfg, model, ref, {**ref["sd"], extra: np.zeros(3, np.float32)})


def test_input_checks():
    model = SiglipVisionTower(_cfg())
    with pytest.raises(ValueError, match="patch grid"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 35, 35, 3)))
    with pytest.raises(ValueError, match="NHWC"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 3, 30, 30)))


def test_position_init_sincos2d():
    """The demo tower's smooth position table: same key and shape as the learned one, the normal
    init's per-entry scale (times `position_init_scale`), and the first x / y columns monotone
    along their axis and constant along the other (so mean-pooled features carry position)."""
    from vrefer_jax.models.siglip import sincos_2d_table

    g, d = 5, 16
    t = sincos_2d_table(g, d, 1.0).reshape(g, g, d)  # [row, col, dim]
    assert np.all(np.diff(t[0, :, 0]) > 0) and np.allclose(t[:, :, 0], t[:1, :, 0])  # sin(x): rises with col
    assert np.all(np.diff(t[:, 0, 2 * (d // 4)]) > 0) and np.allclose(t[:, :, 8], t[:, :1, 8])  # sin(y)

    cfg = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       image_size=35, patch_size=7, position_init="sincos2d", position_init_scale=2.0)
    params = SiglipVisionTower(cfg).init(jax.random.key(0), jnp.zeros((1, 35, 35, 3)))["params"]
    table = np.asarray(nn.meta.unbox(params)["embeddings"]["position_embedding"]["embedding"])
    assert table.shape == (25, 32)
    np.testing.assert_allclose(table, sincos_2d_table(5, 32, 2.0 * 32**-0.5 * np.sqrt(2.0)), rtol=1e-6)
    np.testing.assert_allclose(np.sqrt(np.mean(table**2)), 2.0 * 32**-0.5, rtol=0.15)
    with pytest.raises(ValueError, match="position_init"):
        VisionConfig(position_init="learned")
    low = sincos_2d_table(g, d, 1.0, num_freqs=1)  # only k = 1 per axis: 4 columns, the rest zero
    np.testing.assert_array_equal(low[:, 4:], 0.0)
    np.testing.assert_allclose(low[:, :4], sincos_2d_table(g, d, 1.0)[:, [0, 4, 8, 12]])
    with pytest.raises(ValueError, match="num_freqs"):
        sincos_2d_table(g, d, 1.0, num_freqs=5)


def test_patch_init_scale():
    """`patch_init_scale` multiplies the patch conv's init std (0.02), nothing else."""
    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=35,
              patch_size=7)
    init = lambda c: nn.meta.unbox(SiglipVisionTower(c).init(jax.random.key(0), jnp.zeros((1, 35, 35, 3)))["params"])
    base, big = init(VisionConfig(**kw)), init(VisionConfig(**kw, patch_init_scale=3.0))
    k0, k1 = (np.asarray(p["embeddings"]["patch_embedding"]["kernel"]) for p in (base, big))
    np.testing.assert_allclose(k1, 3.0 * k0, rtol=1e-6)
    np.testing.assert_allclose(k0.std(), 0.02, rtol=0.05)
    rest = lambda p: jax.tree_util.tree_leaves({k: v for k, v in p.items() if k != "embeddings"})
    for a, b in zip(rest(base), rest(big)):
        np.testing.assert_array_equal(a, b)
    # disjoint: the patch conv starts at zero on the sincos table's channels, the table is zero elsewhere
    dis = VisionConfig(**kw, position_init="sincos2d", position_init_freqs=3, patch_init_disjoint=True)
    assert dis.position_channels == 12
    p = init(dis)["embeddings"]
    kernel, table = np.asarray(p["patch_embedding"]["kernel"]), np.asarray(p["position_embedding"]["embedding"])
    assert not kernel[..., :12].any() and kernel[..., 12:].std() > 0.01
    assert table[:, :12].std() > 0.01 and not table[:, 12:].any()
    for bad in (dict(patch_init_disjoint=True), dict(position_init="sincos2d", patch_init_disjoint=True)):
        with pytest.raises(ValueError, match="patch_init_disjoint"):
            VisionConfig(**kw, **bad)  # needs sincos2d, and free channels (default freqs fill all 32)
