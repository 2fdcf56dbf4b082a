"""Mask operations of the region encoder, as pure functions (model and host-side data loader).

* `bilinear_weights` / `resize_masks` / `resize_masks_np`: PyTorch's
  `F.interpolate(mode="bilinear", align_corners=False)` (no antialias) as two small matrices, so a
  resize is two matmuls. `jax.image.resize` is not a substitute: it antialiases when downsampling.
* `mask_pool`: the official `MaskPooling` (binarise `> 0`, masked mean with `+1e-8`).
* `token_merge`: the official temporal merge of an object's per-frame vectors, including its tie
  behaviour, with static shapes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_HI = jax.lax.Precision.HIGHEST
_NORM_EPS = 1e-12  # F.normalize
_POOL_EPS = 1e-8  # MaskPooling denominator


# ----------------------------------------------------------------------------- resize


def bilinear_weights(in_len: int, out_len: int) -> np.ndarray:
    """[out_len, in_len] float32 matrix of 1-D bilinear interpolation (align_corners=False).

    Row i holds weight 1 - w1 at i0 and w1 at i1, where src = max((i + 0.5) * in/out - 0.5, 0),
    i0 = floor(src), i1 = min(i0 + 1, in - 1), w1 = src - i0.

    Rounding follows PyTorch's kernels: scale = in/out rounded to float32, then
    src = fma(scale, i + 0.5, -0.5) rounded once to float32 (the CUDA and the AVX2 CPU builds both
    contract this to a fused multiply-add). Emulated exactly here in float64 (the product of a
    24-bit scale and i + 0.5 is exact). This matters: it decides which weights are exactly zero,
    i.e. the `> 0` binarisation downstream, and w1's last bits at large input sizes.
    """
    if in_len < 1 or out_len < 1:
        raise ValueError(f"lengths must be positive, got in_len={in_len}, out_len={out_len}")
    scale = np.float64(np.float32(in_len) / np.float32(out_len))
    dst = np.arange(out_len, dtype=np.float64) + 0.5
    src = np.maximum((scale * dst - 0.5).astype(np.float32), np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_len - 1)
    i1 = np.minimum(i0 + 1, in_len - 1)
    w1 = np.minimum(src - i0.astype(np.float32), np.float32(1.0))
    w0 = np.float32(1.0) - w1
    out = np.zeros((out_len, in_len), np.float32)
    rows = np.arange(out_len)
    np.add.at(out, (rows, i0), w0)  # add: i0 == i1 at the last input index
    np.add.at(out, (rows, i1), w1)
    return out


def resize_masks(masks: jax.Array, out_h: int, out_w: int) -> jax.Array:
    """Bilinear resize of masks [..., H, W] (bool or float) -> float32 [..., out_h, out_w].

    jit-able for any leading dims; binarise the result with `> 0` where a mask is needed.
    """
    h, w = masks.shape[-2:]
    wh = jnp.asarray(bilinear_weights(h, out_h))
    ww = jnp.asarray(bilinear_weights(w, out_w))
    x = masks.astype(jnp.float32)
    x = jnp.einsum("...hw,qw->...hq", x, ww, precision=_HI)
    return jnp.einsum("ph,...hq->...pq", wh, x, precision=_HI)


def resize_masks_np(masks: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """NumPy twin of `resize_masks` for the host: [..., H, W] -> float32 [..., out_h, out_w]."""
    masks = np.asarray(masks)
    h, w = masks.shape[-2:]
    x = masks.astype(np.float32) @ bilinear_weights(w, out_w).T
    return bilinear_weights(h, out_h) @ x


# ----------------------------------------------------------------------------- pooling


def mask_pool_weights(masks: jax.Array) -> jax.Array:
    """Per-cell pooling weights [..., g, g] fp32: (mask > 0) / (number of cells + 1e-8)."""
    m = (masks > 0).astype(jnp.float32)
    return m / (jnp.sum(m, axis=(-2, -1), keepdims=True) + _POOL_EPS)


def mask_pool(feats: jax.Array, masks: jax.Array) -> jax.Array:
    """Official `MaskPooling`: feats [..., g, g, C] fp32, masks [..., g, g] -> pooled [..., C] fp32.

    Masked mean over the grid with denominator `count + 1e-8`; an empty mask gives exact zeros.
    """
    w = mask_pool_weights(masks)
    return jnp.einsum("...hw,...hwc->...c", w, feats.astype(jnp.float32), precision=_HI)


# ----------------------------------------------------------------------------- token merge


def token_merge(x: jax.Array, valid: jax.Array, max_tokens: int) -> tuple[jax.Array, jax.Array]:
    """Official temporal token merge of one object, with static shapes.

    Args:
      x: [M, C] fp32 per-frame vectors; the n = sum(valid) valid rows must come first.
      valid: [M] bool.
      max_tokens: R (`region_token_num`).
    Returns:
      tokens [R, C] fp32 (rows >= count are zero) and count (int32 scalar).

    If n <= R every valid row is kept. Otherwise, with r = n - R, the adjacent cosine similarities
    sim[i] = cos(x[i], x[i+1]) (L2 normalisation with eps 1e-12, so zero rows give exactly 0) are
    compared with kth, their r-th largest value: each pair with sim[i] >= kth is merged, runs of
    merged pairs form one group, and each group becomes the unweighted mean of its raw vectors.
    Hence count = n - #{sim >= kth}, which is below R when several sims tie at kth.
    jit- and vmap-able: no data-dependent shapes, no loops over tokens.
    """
    x = x.astype(jnp.float32)
    valid = valid.astype(bool)
    m_len = x.shape[0]
    if m_len < max(max_tokens, 2):  # pad (invalid rows) so that the output is [R, C], >= 1 pair
        pad = max(max_tokens, 2) - m_len
        x = jnp.pad(x, ((0, pad), (0, 0)))
        valid = jnp.pad(valid, (0, pad))
        m_len += pad
    n = jnp.sum(valid.astype(jnp.int32))
    r = n - max_tokens

    # The similarities only pick the groups (a discrete choice): no gradient, and none through the
    # norm of a zero row, whose sqrt derivative would be NaN.
    xs = jax.lax.stop_gradient(x)
    norm = jnp.sqrt(jnp.sum(xs * xs, axis=-1, keepdims=True))
    xn = xs / jnp.maximum(norm, _NORM_EPS)
    sim = jnp.sum(xn[:-1] * xn[1:], axis=-1)  # [M-1]
    pair_ok = jnp.arange(m_len - 1) < n - 1
    ranked = jnp.sort(jnp.where(pair_ok, sim, -jnp.inf))[::-1]  # descending
    kth = ranked[jnp.clip(r - 1, 0, m_len - 2)]
    merged = (r > 0) & pair_ok & (sim >= kth)  # pair (i, i+1) joins one group

    # group id of row j = number of group boundaries before it
    gid = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(1 - merged.astype(jnp.int32))])
    onehot = (gid[None, :] == jnp.arange(max_tokens)[:, None]) & valid[None, :]  # [R, M]
    onehot = onehot.astype(jnp.float32)
    sums = jnp.einsum("rm,mc->rc", onehot, x, precision=_HI)
    sizes = jnp.sum(onehot, axis=-1, keepdims=True)
    tokens = sums / jnp.maximum(sizes, 1.0)
    count = n - jnp.sum(merged.astype(jnp.int32))
    return tokens, count.astype(jnp.int32)
