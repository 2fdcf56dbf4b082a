"""The VRVL3 vision encoder: SigLIP-NaViT (`damovl_encoder`, reference §3) on packed patches.

All images, video frames and region crops of a sample are packed into one patch sequence; each
gets its own segment id and attends only within itself (the official varlen flash attention with
`cu_seqlens`). Positions enter only through a 2D rotary embedding of every patch's (row, col) in
its own image; there is no position table. The encoder never merges: the 2x2 video merge and the
projector are in `projector.py`.

Inputs (per call; B = batch rows, N = packed patches, D = C * p * p, E = hidden_size):
  patches  [B, N, D] float   normalised pixels, each patch flattened in (C, py, px) order
  segments [B, N] int32      0 = padding; equal positive ids = one image / frame / crop
  coords   [B, N, 2] int32   (row, col) of the patch in its image: the RoPE positions (§3.3)
Output: [B, N, E] after `post_layernorm` (activation_batch, activation_patches, activation_vit_embed);
padding rows are finite and meaningless.

Attention is one segment-masked softmax over all N patches of a row ([B, H, N, N] scores), or, with
`attention_chunk` P > 0, the same softmax within each aligned block of P patches ([B * N/P, H, P, P]):
identical results whenever no segment crosses a block boundary (the host lays samples out so:
`vl3_batch.chunk_example`), at P / N of the score memory.

Parameter tree (mirrors the official `vision_model.*`; logical axis names in brackets):
  embeddings/patch_embedding/kernel  [p, p, C, E]  (vit_patch_h, vit_patch_w, vit_channels, vit_embed)
  embeddings/patch_embedding/bias    [E]           (vit_embed)
  encoder/layers/...                 leading [L] axis (layers), the same leaves as `siglip.py`:
    layer_norm{1,2}/{scale,bias}, self_attn/{q,k,v,out}_proj/{kernel,bias}, mlp/fc{1,2}/{kernel,bias}
  post_layernorm/{scale,bias}        [E]           (norm)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vrefer_jax.models import layers
from vrefer_jax.models.qwen2 import apply_rotary
from vrefer_jax.models.siglip import SiglipMLP
from vrefer_jax.sharding import constrain
from vrefer_jax.vl3_config import NaViTConfig

Dtype = layers.Dtype

# [B, N, E] activations between blocks.
ACT_NAMES = ("activation_batch", "activation_patches", "activation_vit_embed")


def rope_2d_tables(coords: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """coords [B, N, 2] int (row, col) -> (cos, sin) [B, N, head_dim] fp32 (§3.3).

    A rotary embedding of dim head_dim / 2 (inv_freq[j] = theta^(-2j / (head_dim / 2)), head_dim / 4
    values) is applied to the row and to the column; the angles are concatenated (row first, then
    col) and tiled twice, for the rotate-half rotation over the whole head.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, half, 2, dtype=jnp.float32) / half))
    pos = coords.astype(jnp.float32)
    angles = jnp.concatenate([pos[..., 0:1] * inv_freq, pos[..., 1:2] * inv_freq], axis=-1)
    emb = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def segment_attention_mask(segments: jax.Array) -> jax.Array:
    """segments [B, N] int -> [B, 1, N, N] bool (True = may attend): block-diagonal over equal ids.

    Padding keys (segment 0) are hidden from every query; a padding query keeps only itself, so
    every kernel sees a non-empty row and returns finite values.
    """
    n = segments.shape[1]
    eye = jnp.eye(n, dtype=bool)[None]
    q, k = segments[:, :, None], segments[:, None, :]
    return ((q == k) & ((k != 0) | eye))[:, None]


class NaViTPatchEmbedding(nn.Module):
    """The official Conv2d(C -> E, kernel = stride = p) applied to single patches, i.e. an affine
    map of the (C, py, px)-ordered patch vector. patches [B, N, C*p*p] -> [B, N, E]."""

    cfg: NaViTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, patches: jax.Array) -> jax.Array:
        cfg = self.cfg
        p, c, e = cfg.patch_size, cfg.num_channels, cfg.hidden_size
        # HWIO like siglip's conv kernel, so the checkpoint's `conv` layout rule applies unchanged.
        kernel = self.param("kernel", nn.with_logical_partitioning(
            layers.default_kernel_init, ("vit_patch_h", "vit_patch_w", "vit_channels", "vit_embed")),
            (p, p, c, e), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vit_embed",)),
                          (e,), self.param_dtype)
        x = patches.astype(self.dtype).reshape(patches.shape[:2] + (c, p, p))
        y = jnp.einsum("bncyx,yxce->bne", x, kernel.astype(self.dtype))
        return y + bias.astype(self.dtype)


class NaViTEmbeddings(nn.Module):
    """Holds `patch_embedding` (no position table). patches [B, N, D] -> [B, N, E]."""

    cfg: NaViTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, patches: jax.Array) -> jax.Array:
        x = NaViTPatchEmbedding(self.cfg, self.dtype, self.param_dtype, name="patch_embedding")(patches)
        return constrain(x, ACT_NAMES)


def attention_mask(segments: jax.Array, chunk: int = 0) -> jax.Array:
    """segments [B, N] -> the mask `NaViTAttention` takes: [B, 1, N, N] (chunk 0), or per aligned
    block of `chunk` patches [B * N/chunk, 1, chunk, chunk] (rows of block k of row b at b * N/chunk + k)."""
    if not chunk:
        return segment_attention_mask(segments)
    B, N = segments.shape
    if N % chunk:
        raise ValueError(f"patch_segments: N = {N} patches is not a multiple of vision_attention_chunk {chunk}")
    return segment_attention_mask(segments.reshape(B * (N // chunk), chunk))


class NaViTAttention(nn.Module):
    """Segment-masked self-attention with 2D RoPE on q and k (in fp32).

    x [B, N, E], cos/sin [B, N, head_dim] fp32, mask from `attention_mask(segments, chunk)`:
    [B, 1, N, N] bool, or [B * N/chunk, 1, chunk, chunk] with `chunk` > 0 (attention within aligned
    blocks of `chunk` patches) -> [B, N, E].
    """

    cfg: NaViTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    chunk: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        cfg = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv_axes = ("vit_embed", "vit_heads", "vit_head_dim")
        shape = (cfg.num_attention_heads, cfg.head_dim)
        q = layers.dense(shape, qkv_axes, name="q_proj", **kw)(x)  # [B, N, H, hd]
        k = layers.dense(shape, qkv_axes, name="k_proj", **kw)(x)
        v = layers.dense(shape, qkv_axes, name="v_proj", **kw)(x)
        # The official rotation runs in fp32 and casts back to the activation dtype.
        q = apply_rotary(q.astype(jnp.float32), cos, sin).astype(self.dtype)
        k = apply_rotary(k.astype(jnp.float32), cos, sin).astype(self.dtype)
        B, N = x.shape[:2]
        if self.chunk:  # [B, N, H, hd] -> [B * N/P, P, H, hd]: each block attends within itself
            q, k, v = (t.reshape((B * (N // self.chunk), self.chunk) + shape) for t in (q, k, v))
        o = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=cfg.head_dim**-0.5, is_causal=False,
                                         implementation=self.attention_impl)
        o = o.reshape((B, N) + shape)
        return layers.dense(cfg.hidden_size, ("vit_heads", "vit_head_dim", "vit_embed"),
                            axis=(-2, -1), name="out_proj", **kw)(o)


class NaViTEncoderLayer(nn.Module):
    """Pre-LN block: h + attn(LN1(h)), then h + mlp(LN2(h)) (the MLP is siglip's: fc1, gelu-tanh, fc2).

    An `nn.scan` body: (h [B, N, E], mask, cos, sin) -> (h [B, N, E], None).
    """

    cfg: NaViTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    chunk: int = 0

    @nn.compact
    def __call__(self, h: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array):
        cfg = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ln = lambda name: layers.layer_norm(cfg.layer_norm_eps, "norm", name=name, **kw)  # noqa: E731
        h = h + NaViTAttention(cfg, attention_impl=self.attention_impl, chunk=self.chunk, name="self_attn", **kw)(
            ln("layer_norm1")(h), mask, cos, sin)
        # SiglipMLP reads only hidden_size / intermediate_size, which NaViTConfig has too.
        h = h + SiglipMLP(cfg, name="mlp", **kw)(ln("layer_norm2")(h))
        return constrain(h, ACT_NAMES), None


class NaViTLayers(nn.Module):
    """`cfg.num_hidden_layers` layers scanned over a leading `layers` param axis (the `encoder` scope)."""

    cfg: NaViTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    attention_impl: str | None = None
    chunk: int = 0

    @nn.compact
    def __call__(self, h: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        stack = nn.scan(
            layers.maybe_remat(NaViTEncoderLayer, self.remat_policy),
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),  # mask, cos, sin shared by all layers
            length=self.cfg.num_hidden_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        h, _ = stack(cfg=self.cfg, dtype=self.dtype, param_dtype=self.param_dtype,
                     attention_impl=self.attention_impl, chunk=self.chunk, name="layers")(h, mask, cos, sin)
        return h


class NaViTEncoder(nn.Module):
    """SigLIP-NaViT over packed patches -> post-LN output of the last layer (see the module docstring).

    Attributes:
      cfg: encoder sizes. dtype / param_dtype: compute / storage dtypes. remat_policy: see
        `layers.remat_policy`. attention_impl: `jax.nn.dot_product_attention(implementation=...)`;
        the kernel must accept a boolean mask. attention_chunk: 0, or attention within aligned blocks
        of that many patches (`VL3Config.vision_attention_chunk`; N must be a multiple of it).
    """

    cfg: NaViTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    attention_impl: str | None = None
    attention_chunk: int = 0

    @nn.compact
    def __call__(self, patches: jax.Array, segments: jax.Array, coords: jax.Array) -> jax.Array:
        cfg = self.cfg
        if patches.ndim != 3 or patches.shape[-1] != cfg.patch_dim:
            raise ValueError(f"patches must be [B, N, {cfg.patch_dim}] (C*p*p, (C, py, px) order), "
                             f"got {patches.shape}")
        if segments.shape != patches.shape[:2]:
            raise ValueError(f"segments must be [B, N] = {patches.shape[:2]}, got {segments.shape}")
        if coords.shape != patches.shape[:2] + (2,):
            raise ValueError(f"coords must be [B, N, 2] = {patches.shape[:2] + (2,)}, got {coords.shape}")
        if cfg.num_hidden_layers < 1:
            raise ValueError(f"num_hidden_layers must be >= 1, got {cfg.num_hidden_layers}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = NaViTEmbeddings(cfg, name="embeddings", **kw)(patches)
        cos, sin = rope_2d_tables(coords, cfg.head_dim, cfg.rope_theta)
        mask = attention_mask(segments, self.attention_chunk)
        h = NaViTLayers(cfg, remat_policy=self.remat_policy, attention_impl=self.attention_impl,
                        chunk=self.attention_chunk, name="encoder", **kw)(h, mask, cos, sin)
        h = layers.layer_norm(cfg.layer_norm_eps, "norm", name="post_layernorm", **kw)(h)
        return constrain(h, ACT_NAMES)
