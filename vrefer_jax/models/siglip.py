"""SigLIP vision tower (`SiglipVisionModel`), cut at VideoRefer's selected layer.

VideoRefer reads `hidden_states[select_layer]` (-2 for SigLIP-so400m: the output of layer 25 of
27, before any final norm), so only the first `cfg.num_layers_run` encoder layers are built;
the last layer, `post_layernorm` and the attention-pooling `head` are not.

Parameter tree (mirrors HF `vision_model.*`; logical axis names in brackets):
  embeddings/patch_embedding/kernel      [p, p, C, D]   (vit_patch_h, vit_patch_w, vit_channels, vit_embed)
  embeddings/patch_embedding/bias        [D]            (vit_embed)
  embeddings/position_embedding/embedding [P, D]        (vit_pos, vit_embed)
  encoder/layers/...                     leading [L] axis (layers) on every leaf:
    layer_norm{1,2}/{scale,bias}    [L, D]             (layers, norm)
    self_attn/{q,k,v}_proj/kernel   [L, D, H, hd]      (layers, vit_embed, vit_heads, vit_head_dim)
    self_attn/{q,k,v}_proj/bias     [L, H, hd]         (layers, vit_heads, vit_head_dim)
    self_attn/out_proj/kernel       [L, H, hd, D]      (layers, vit_heads, vit_head_dim, vit_embed)
    self_attn/out_proj/bias         [L, D]             (layers, vit_embed)
    mlp/fc1/{kernel,bias}           [L, D, F], [L, F]  (layers, vit_embed, vit_mlp)
    mlp/fc2/{kernel,bias}           [L, F, D], [L, D]  (layers, vit_mlp, vit_embed)
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vrefer_jax.config import VisionConfig
from vrefer_jax.models import layers, precision
from vrefer_jax.sharding import constrain

Dtype = layers.Dtype

# [N, P, D] activations between blocks.
ACT_NAMES = ("activation_frames", "activation_patches", "activation_vit_embed")


def sincos_2d_table(grid: int, dim: int, scale: float, num_freqs: int = 0) -> np.ndarray:
    """[grid * grid, dim] row-major table: for each axis, sin and cos of the normalised coordinate
    u in [0, 1] at frequencies k * pi / 2 (k = 1 .. num_freqs, default dim // 4), so the low-k
    columns vary slowly and nearly monotonically across the grid; zero-padded to `dim`, times
    `scale`."""
    n = num_freqs or dim // 4
    if not 1 <= n <= dim // 4:
        raise ValueError(f"num_freqs {num_freqs} must be in [1, {dim // 4}] for dim {dim}")
    u = np.linspace(0.0, 1.0, grid) if grid > 1 else np.zeros(1)
    yy, xx = (a.reshape(-1, 1) for a in np.meshgrid(u, u, indexing="ij"))
    ang = np.pi / 2 * np.arange(1, n + 1)
    cols = [np.sin(xx * ang), np.cos(xx * ang), np.sin(yy * ang), np.cos(yy * ang)]
    table = np.concatenate(cols + [np.zeros((grid * grid, dim - 4 * n))], axis=1)
    return (scale * table).astype(np.float32)


def _position_init(cfg: VisionConfig):
    std = cfg.hidden_size**-0.5  # HF's normal init for the table
    if cfg.position_init == "normal":
        return nn.initializers.normal(stddev=std * cfg.position_init_scale)

    def init(key, shape, dtype=jnp.float32):
        del key
        # sin/cos entries have RMS 1/sqrt(2): the nonzero ones get the normal init's per-entry scale.
        return jnp.asarray(sincos_2d_table(cfg.grid, shape[1], cfg.position_init_scale * std * np.sqrt(2.0),
                                           cfg.position_init_freqs), dtype)

    return init


def _patch_init(cfg: VisionConfig):
    base = nn.initializers.normal(stddev=layers.INIT_STD * cfg.patch_init_scale)
    if not cfg.patch_init_disjoint:
        return base

    def init(key, shape, dtype=jnp.float32):  # [p, p, C, D]: zero on the position table's channels
        return base(key, shape, dtype).at[..., : cfg.position_channels].set(0)

    return init


class SiglipEmbeddings(nn.Module):
    """Patch conv + learned position table.

    pixel_values [N, S, S, C] -> [N, P, D] (activation_frames, activation_patches,
    activation_vit_embed), P = grid**2 in row-major order (token = row * grid + col).
    """

    cfg: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg = self.cfg
        p = cfg.patch_size
        # VALID with stride p: trailing pixels that do not fill a patch are dropped (384 % 14 = 6),
        # exactly as torch's Conv2d does.
        x = nn.Conv(
            features=cfg.hidden_size,
            kernel_size=(p, p),
            strides=(p, p),
            padding="VALID",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(
                _patch_init(cfg),
                ("vit_patch_h", "vit_patch_w", "vit_channels", "vit_embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vit_embed",)),
            name="patch_embedding",
        )(pixel_values)
        n, gh, gw, d = x.shape
        x = x.reshape(n, gh * gw, d)
        pos = nn.Embed(
            num_embeddings=cfg.num_patches,
            features=cfg.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(_position_init(cfg), ("vit_pos", "vit_embed")),
            name="position_embedding",
        )(jnp.arange(cfg.num_patches))
        return constrain(x + pos[None], ACT_NAMES)


class SiglipAttention(nn.Module):
    """Bidirectional multi-head self-attention. x [N, P, D] -> [N, P, D]."""

    cfg: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv_axes = ("vit_embed", "vit_heads", "vit_head_dim")
        shape = (cfg.num_attention_heads, cfg.head_dim)
        # [N, P, H, hd] each: the layout dot_product_attention takes.
        q = layers.dense(shape, qkv_axes, name="q_proj", **kw)(x)
        k = layers.dense(shape, qkv_axes, name="k_proj", **kw)(x)
        v = layers.dense(shape, qkv_axes, name="v_proj", **kw)(x)
        o = jax.nn.dot_product_attention(
            q, k, v, scale=cfg.head_dim**-0.5, is_causal=False, implementation=self.attention_impl)
        return layers.dense(cfg.hidden_size, ("vit_heads", "vit_head_dim", "vit_embed"),
                            axis=(-2, -1), name="out_proj", **kw)(o)


class SiglipMLP(nn.Module):
    """fc1 -> tanh-approximate GELU (`gelu_pytorch_tanh`) -> fc2. x [N, P, D] -> [N, P, D]."""

    cfg: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.dense(self.cfg.intermediate_size, ("vit_embed", "vit_mlp"), name="fc1", **kw)(x)
        h = precision.f32_math(functools.partial(jax.nn.gelu, approximate=True), h)
        return layers.dense(self.cfg.hidden_size, ("vit_mlp", "vit_embed"), name="fc2", **kw)(h)


class SiglipEncoderLayer(nn.Module):
    """Pre-LN block: h + attn(LN1(h)), then h + mlp(LN2(h)).

    Written as an `nn.scan` body: h [N, P, D] -> (h [N, P, D], None).
    """

    cfg: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, h: jax.Array):
        cfg = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ln = lambda name: layers.layer_norm(cfg.layer_norm_eps, "norm", name=name, **kw)  # noqa: E731
        a = SiglipAttention(cfg, attention_impl=self.attention_impl, name="self_attn", **kw)(
            ln("layer_norm1")(h))
        h = h + a
        h = h + SiglipMLP(cfg, name="mlp", **kw)(ln("layer_norm2")(h))
        return constrain(h, ACT_NAMES), None


class SiglipEncoder(nn.Module):
    """`num_layers` encoder layers scanned over a leading `layers` param axis. h [N, P, D] -> same."""

    cfg: VisionConfig
    num_layers: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    attention_impl: str | None = None
    scan_unroll: int = 1

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        stack = nn.scan(
            layers.maybe_remat(SiglipEncoderLayer, self.remat_policy),
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.num_layers,
            unroll=min(self.scan_unroll, self.num_layers),
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        h, _ = stack(cfg=self.cfg, dtype=self.dtype, param_dtype=self.param_dtype,
                     attention_impl=self.attention_impl, name="layers")(h)
        return h


class SiglipVisionTower(nn.Module):
    """SigLIP vision tower returning HF `SiglipVisionModel(...).hidden_states[cfg.select_layer]`.

    Args (call):
      pixel_values: [N, S, S, C] float, NHWC, already SigLIP-normalised (values in [-1, 1]); any S
        with S // patch_size == cfg.grid (the trailing S % patch_size pixels are ignored).
    Returns:
      [N, P, D] in `dtype` (activation_frames, activation_patches, activation_vit_embed),
      P = cfg.num_patches in row-major patch order, no CLS token. With `cfg.num_layers_run == 0`
      (select_layer 0) this is the embedding output and no encoder is built.
    """

    cfg: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    attention_impl: str | None = None
    scan_unroll: int = 1  # layers per scan iteration (`ModelConfig.scan_unroll`)

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg = self.cfg
        if pixel_values.ndim != 4 or pixel_values.shape[-1] != cfg.num_channels:
            raise ValueError(f"pixel_values must be [N, S, S, {cfg.num_channels}] (NHWC), "
                             f"got {pixel_values.shape}")
        grid = (pixel_values.shape[1] // cfg.patch_size, pixel_values.shape[2] // cfg.patch_size)
        if grid != (cfg.grid, cfg.grid):
            raise ValueError(f"pixel_values {pixel_values.shape} give a {grid} patch grid; the "
                             f"position table is for {cfg.grid}x{cfg.grid} (image_size {cfg.image_size})")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = SiglipEmbeddings(cfg, name="embeddings", **kw)(pixel_values.astype(self.dtype))
        if cfg.num_layers_run > 0:  # a zero-length scan would create empty param stacks
            h = SiglipEncoder(cfg, cfg.num_layers_run, remat_policy=self.remat_policy,
                              attention_impl=self.attention_impl, scan_unroll=self.scan_unroll,
                              name="encoder", **kw)(h)
        return h
