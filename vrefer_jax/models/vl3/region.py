"""The VRVL3 region encoder on the device (reference §8.5, the official `MaskExtractor`).

Per region r of a sample, the host (`data_pipeline.vl3.regions`) has listed, for every on cell of
the crop's mask grid in raster order, the <= 4 crop patches (indices into the packed encoder output)
and the bilinear weights that make the cell's feature (`region_cells`, `region_weights`), the number
of cells (`region_num_cells`) and the k-means initial centroids (`region_init`, cell indices). Here:

1. `gather_cells`: features [B, N, E] -> cell vectors [B, R, C, E] (fp32), i.e. the official
   bilinear resize of the crop's features to the mask grid followed by masking.
2. `kmeans`: regions with more than Q cells -> Q centroids (the official `kmeans_fast`: squared
   Euclidean distances, first index on ties, an empty cluster keeps its centroid, stop when no
   centroid moves beyond allclose(atol 1e-6, rtol 1e-5), at most `iters` rounds; the output in the
   init order); regions with <= Q cells -> their cells in order, zero-padded to Q.
3. `RegionEncoder`: the two steps above in fp32 (the official pools in the mask's float dtype), then
   `feat_linear` = Linear(E -> H), exact GELU, Linear(H -> H) in the compute dtype; tokens
   [B, R, Q, H] and counts min(Q, cells) [B, R].

Static shapes everywhere: k-means is a fixed-trip `fori_loop` that freezes converged regions (so it
also differentiates); padded cells (c >= num_cells) never join a cluster.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vrefer_jax.models import connector, layers
from vrefer_jax.sharding import constrain

Dtype = layers.Dtype

CELL_NAMES = ("activation_batch", "activation_objects", None, "activation_vit_embed")  # [B, R, C|Q, E]
OUT_NAMES = ("activation_batch", "activation_objects", None, "activation_embed")  # [B, R, Q, H]
_HI = jax.lax.Precision.HIGHEST
KMEANS_ATOL, KMEANS_RTOL = 1e-6, 1e-5  # torch.allclose(centroids, new_centroids, atol=1e-6)


def gather_cells(features: jax.Array, cells: jax.Array, weights: jax.Array) -> jax.Array:
    """Blend the listed patches into one vector per cell.

    Args:
      features: [B, N, E] encoder output (activation_batch, activation_patches, activation_vit_embed).
      cells: [B, R, C, 4] int32 patch indices into N; -1 entries are ignored.
      weights: [B, R, C, 4] float32 blend weights.
    Returns:
      [B, R, C, E] float32 (activation_batch, activation_objects, -, activation_vit_embed):
      sum_k weights * features[cells]; cells with no patch are zero.
    """
    if features.ndim != 3:
        raise ValueError(f"features must be [B, N, E], got {features.shape}")
    if cells.ndim != 4 or cells.shape != weights.shape or cells.shape[0] != features.shape[0]:
        raise ValueError(f"region_cells {cells.shape} and region_weights {weights.shape} must both be "
                         f"[B, R, C, 4] with B = {features.shape[0]}")
    b, r, c, k = cells.shape
    valid = cells >= 0
    idx = jnp.where(valid, cells, 0).reshape(b, r * c * k)
    picked = jax.vmap(lambda f, i: f[i])(features, idx).reshape(b, r, c, k, -1).astype(jnp.float32)
    w = jnp.where(valid, weights, 0.0).astype(jnp.float32)
    return constrain(jnp.sum(picked * w[..., None], axis=3), CELL_NAMES)


def kmeans(x: jax.Array, num_cells: jax.Array, init: jax.Array, iters: int = 20) -> jax.Array:
    """Per region: Q k-means centroids of its cells, or the cells themselves when there are <= Q.

    Args:
      x: [B, R, C, E] cell vectors (computed in fp32); cells >= num_cells are padding.
      num_cells: [B, R] int, real cells per region (0 = empty slot).
      init: [B, R, Q] int, initial centroids as cell indices (used where num_cells > Q).
      iters: the official's 20 rounds at most.
    Returns:
      [B, R, Q, E] float32: centroid q started at cell init[q] (regions with more than Q cells), else
      cells 0 .. num_cells - 1 followed by zeros.
    """
    if x.ndim != 4 or num_cells.shape != x.shape[:2] or init.ndim != 3 or init.shape[:2] != x.shape[:2]:
        raise ValueError(f"kmeans: x [B, R, C, E] {x.shape}, region_num_cells [B, R] {num_cells.shape} "
                         f"and region_init [B, R, Q] {init.shape} do not fit")
    b, r, c, e = x.shape
    q = init.shape[-1]
    x = x.astype(jnp.float32)
    valid = jnp.arange(c) < num_cells[..., None]  # [B, R, C]
    start = jnp.take_along_axis(x, jnp.clip(init, 0, c - 1)[..., None], axis=2)  # [B, R, Q, E]

    def round_(_, carry):
        cent, done = carry
        # ||x - c||^2 from the differences (as the official), not the expanded form: no cancellation
        dist = jnp.sum(jnp.square(x[:, :, :, None, :] - cent[:, :, None, :, :]), axis=-1)  # [B, R, C, Q]
        member = (jnp.argmin(dist, axis=-1)[..., None] == jnp.arange(q)) & valid[..., None]
        count = jnp.sum(member, axis=2)  # [B, R, Q]
        total = jnp.einsum("brcq,brce->brqe", member.astype(jnp.float32), x, precision=_HI)
        new = jnp.where(count[..., None] > 0, total / jnp.maximum(count, 1)[..., None].astype(jnp.float32), cent)
        close = jnp.all(jnp.abs(cent - new) <= KMEANS_ATOL + KMEANS_RTOL * jnp.abs(new), axis=(-2, -1))
        done = done | close  # the official breaks before adopting the (converged) update
        return jnp.where(done[..., None, None], cent, new), done

    cent, _ = jax.lax.fori_loop(0, iters, round_, (start, jnp.zeros((b, r), bool)))
    xs = x if c >= q else jnp.pad(x, ((0, 0), (0, 0), (0, q - c), (0, 0)))
    first = jnp.where((jnp.arange(q) < num_cells[..., None])[..., None], xs[:, :, :q], 0.0)
    out = jnp.where((num_cells > q)[..., None, None], cent, first)
    return constrain(out, CELL_NAMES)


class RegionEncoder(nn.Module):
    """`region_encoder`: cells -> pooled vectors (fp32) -> `feat_linear` -> region tokens.

    Attributes:
      hidden_size: the LLM width H. num_tokens: Q (`region_token_num`, 10). kmeans_iters: 20.
    Parameters (HF `region_encoder.feat_linear.{0,2}`): feat_linear_0 kernel [E, H] ("conv_in",
    "conv_out"), bias ("conv_out",); feat_linear_2 kernel [H, H] ("conv_out", "conv_in"), bias
    ("conv_in",): built by `connector.mlp(x, 2, H, "feat_linear", ...)`, as the projector's readout.

    __call__(features [B, N, E], region_cells [B, R, C, 4], region_weights [B, R, C, 4],
    region_num_cells [B, R], region_init [B, R, Q]) -> (tokens [B, R, Q, H] in `dtype`
    (activation_batch, activation_objects, -, activation_embed), rows >= count zero;
    counts [B, R] int32 = min(Q, num_cells)).
    """

    hidden_size: int
    num_tokens: int = 10
    kmeans_iters: int = 20
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array, region_cells: jax.Array, region_weights: jax.Array,
                 region_num_cells: jax.Array, region_init: jax.Array) -> tuple[jax.Array, jax.Array]:
        q = self.num_tokens
        if region_init.shape[-1] != q:
            raise ValueError(f"region_init has {region_init.shape[-1]} entries per region, the encoder takes {q}")
        cells = gather_cells(features, region_cells, region_weights)
        pooled = kmeans(cells, region_num_cells, region_init, self.kmeans_iters)  # [B, R, Q, E] fp32
        b, r, _, e = pooled.shape
        y = pooled.astype(self.dtype).reshape(b, r * q, e)
        y = connector.mlp(y, 2, self.hidden_size, "feat_linear", self.dtype, self.param_dtype)
        counts = jnp.minimum(region_num_cells, q).astype(jnp.int32)
        keep = jnp.arange(q) < counts[..., None]  # the biases make padded rows nonzero
        y = jnp.where(keep[..., None], y.reshape(b, r, q, -1), jnp.zeros((), y.dtype))
        return constrain(y, OUT_NAMES), counts
