"""Region (object) encoder: the official `MaskExtractor` with `mm_region_encoder_type='pooling'`.

Per object: each of its frames' masks pools the SigLIP features of that frame (masked mean over the
patch grid), the per-frame vectors are merged in time to at most `region_token_num` tokens
(`mask_ops.token_merge`), and `feat_linear` = Linear -> GELU(exact) -> Linear maps them to the LLM
width. Resize, pooling and merge run in fp32 as in the official code; `feat_linear` in `dtype`.

Objects are padded to static shapes: K object slots per sample, M frame slots per object, R token
slots per object; the real number of tokens per object is returned as `counts`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vrefer_jax.config import ObjectEncoderConfig
from vrefer_jax.models import layers, mask_ops, precision
from vrefer_jax.models.layers import dense
from vrefer_jax.sharding import constrain

Dtype = Any


class ObjectEncoder(nn.Module):
    """Mask pooling + temporal token merge + `feat_linear`.

    Attributes:
      cfg: `region_token_num` = R.
      vis_dim: SigLIP width C_vis (`mm_hidden_size`).
      out_dim: LLM width E (`hidden_size`).
      grid: patches per side g (P = g * g).

    Parameters (logical axes): feat_linear_0 kernel [C_vis, E] ("vit_embed", "mlp"), bias ("mlp",);
    feat_linear_2 kernel [E, E] ("mlp", "embed"), bias ("embed",) — column- then row-parallel.
    """

    cfg: ObjectEncoderConfig
    vis_dim: int
    out_dim: int
    grid: int
    init_std: float = layers.INIT_STD  # the LLM's initializer_range (HF inits the whole model with it)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        frame_feats: jax.Array,
        object_frames: jax.Array,
        object_masks: jax.Array,
        object_valid: jax.Array,
    ) -> tuple[jax.Array, jax.Array]:
        """Encode every object slot of the batch.

        Args:
          frame_feats: [B, F, P, C_vis] features of the annotated frames (P = g*g, row-major).
          object_frames: [B, K, M] int32, object k's frames in its own (annotation) order as indices
            into F; -1 = padding; valid entries first.
          object_masks: [B, K, M, h, w] bool/float masks; resized bilinearly to (g, g) when
            (h, w) != (g, g), then binarised with `> 0`.
          object_valid: [B, K] bool, which object slots are real.
        Returns:
          tokens [B, K, R, E] in `dtype` ("activation_batch", "activation_objects", None,
          "activation_embed"); rows >= count are zero. counts [B, K] int32 (0 for invalid objects).
        """
        B, F, P, C = frame_feats.shape
        g, R = self.grid, self.cfg.region_token_num
        if P != g * g or C != self.vis_dim:
            raise ValueError(f"frame_feats {frame_feats.shape} do not match grid {g} and vis_dim {self.vis_dim}")
        K, M = object_frames.shape[1:]

        masks = object_masks
        if masks.shape[-2:] != (g, g):
            masks = mask_ops.resize_masks(masks, g, g)
        weights = mask_ops.mask_pool_weights(masks).reshape(B, K, M, P)  # fp32, official MaskPooling

        # Pool against each slot's own frame without gathering [B, K, M, P, C] features: a one-hot
        # frame selector turns the gather + masked sum into one matmul over (frame, patch).
        select = (object_frames[..., None] == jnp.arange(F)).astype(jnp.float32)  # [B, K, M, F]
        weights = select[..., None] * weights[..., None, :]  # [B, K, M, F, P]
        pooled = jnp.einsum("bkmfp,bfpc->bkmc", weights, frame_feats.astype(jnp.float32),
                            precision=jax.lax.Precision.HIGHEST)  # [B, K, M, C] fp32

        slot_valid = (object_frames >= 0) & object_valid[..., None].astype(bool)  # [B, K, M]
        merge = jax.vmap(jax.vmap(lambda x, v: mask_ops.token_merge(x, v, R)))
        tokens, counts = merge(pooled, slot_valid)  # [B, K, R, C] fp32, [B, K]
        counts = jnp.where(object_valid, counts, 0).astype(jnp.int32)

        x = constrain(tokens.astype(self.dtype),
                      ("activation_batch", "activation_objects", None, "activation_vit_embed"))
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=nn.initializers.normal(self.init_std))
        x = dense(self.out_dim, ("vit_embed", "mlp"), name="feat_linear_0", **kw)(x)
        x = precision.f32_math(functools.partial(nn.gelu, approximate=False), x)
        x = constrain(x, ("activation_batch", "activation_objects", None, "activation_mlp"))
        x = dense(self.out_dim, ("mlp", "embed"), name="feat_linear_2", **kw)(x)
        keep = jnp.arange(R) < counts[..., None]  # [B, K, R]: the biases make padded rows nonzero
        x = jnp.where(keep[..., None], x, jnp.zeros((), x.dtype))
        x = constrain(x, ("activation_batch", "activation_objects", None, "activation_embed"))
        return x, counts
