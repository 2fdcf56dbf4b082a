"""VRVL3 spatial downsampling and the `mlp2x_gelu` projector (reference §6).

Downsampling: the official code un-blocks each frame's features to raster order and bilinearly
resizes `(gh, gw)` to `(gh / s, gw / s)` (align_corners False). With gh, gw multiples of s that is
a plain mean of each s x s block (s = 2 for video frames) and the identity for s = 1. Here the host
lists, for every visual token, the packed patches it averages (`visual_patches` of `vl3_batch`), so
the device does one gather and a masked mean, the same for any stride and any packing.

Projector: Linear(E_vis -> H), exact GELU, Linear(H -> H), biases, named `readout_0`, `readout_2`
(official `mm_projector.readout.{0,2}`), built with `connector.mlp`. The region encoder's MLP
(`feat_linear_0`, `feat_linear_2`, official `region_encoder.feat_linear.{0,2}`) has the same shape
and is the same module with `prefix="feat_linear"`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vrefer_jax.models import connector, layers
from vrefer_jax.sharding import constrain

Dtype = layers.Dtype

# merged visual tokens, still in the vision width
MERGED_NAMES = ("activation_batch", "activation_patches", "activation_vit_embed")
OUT_NAMES = connector.OUT_AXES  # (activation_batch, activation_length, activation_embed)


def merge_visual_tokens(features: jax.Array, visual_patches: jax.Array) -> jax.Array:
    """Mean of the listed patches per visual token.

    Args:
      features: [B, N, E] encoder output (activation_batch, activation_patches, activation_vit_embed).
      visual_patches: [B, V, W] int32, the patch indices (into N) averaged into token v; -1 entries
        are ignored. W = merge**2 (an image at stride 1 lists one patch); a row of all -1 (a padding
        token) gives zeros.
    Returns:
      [B, V, E] in the dtype of `features` (the mean is taken in fp32).
    """
    if features.ndim != 3:
        raise ValueError(f"features must be [B, N, E], got {features.shape}")
    if visual_patches.ndim != 3 or visual_patches.shape[0] != features.shape[0]:
        raise ValueError(f"visual_patches must be [B, V, W] with B = {features.shape[0]}, "
                         f"got {visual_patches.shape}")
    b, v, w = visual_patches.shape
    valid = visual_patches >= 0
    idx = jnp.where(valid, visual_patches, 0).reshape(b, v * w)
    picked = jax.vmap(lambda f, i: f[i])(features, idx).reshape(b, v, w, -1).astype(jnp.float32)
    total = jnp.sum(jnp.where(valid[..., None], picked, 0.0), axis=2)
    count = jnp.sum(valid, axis=2, keepdims=True).astype(jnp.float32)
    out = total / jnp.maximum(count, 1.0)
    return constrain(out.astype(features.dtype), MERGED_NAMES)


class MlpGeluProjector(nn.Module):
    """`mlp2x_gelu`: x [B, V, in_features] -> [B, V, out_features]
    (activation_batch, activation_length, activation_embed).

    Attributes:
      out_features: the LLM width H. prefix: names of the Linears, `{prefix}_0`, `{prefix}_2`
        ("readout" for `mm_projector`, "feat_linear" for the region encoder). depth: Linears.
    """

    out_features: int
    prefix: str = "readout"
    depth: int = 2
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 3:
            raise ValueError(f"projector input must be [B, V, C], got {x.shape}")
        y = connector.mlp(x, self.depth, self.out_features, self.prefix, self.dtype, self.param_dtype)
        return constrain(y, OUT_NAMES)
