"""Mask operations of the region encoder, as pure functions (the host-side mask resize is
`data_pipeline.masks.grid_masks`; both use `vrefer_jax.numerics.bilinear_weights`).

* `bilinear_weights` / `resize_masks` / `resize_masks_np`: PyTorch's
  `F.interpolate(mode="bilinear", align_corners=False)` (no antialias) as two small matrices, so a
  resize is two matmuls. `jax.image.resize` is not a substitute: it antialiases when downsampling.
* `mask_pool`: the official `MaskPooling` (binarise `> 0`, masked mean with `+1e-8`).
* `token_merge`: the official temporal merge of an object's per-frame vectors, including its tie
  behaviour (similarities rounded as PyTorch does, `adjacent_cosine`), with static shapes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vrefer_jax.numerics import bilinear_weights  # shared with the host-side mask resize

_HI = jax.lax.Precision.HIGHEST
_NORM_EPS = 1e-12  # F.normalize
_POOL_EPS = 1e-8  # MaskPooling denominator
_LANES = 8  # float32 lanes of the vectorised loops in PyTorch's CPU reduction kernels (see _torch_*)


# ----------------------------------------------------------------------------- resize


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
    """NumPy twin of `resize_masks`: [..., H, W] -> float32 [..., out_h, out_w]. A reference oracle
    (tests check the device resize and the data side's `masks.grid_masks` against it)."""
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
    A reference oracle: the object encoder pools with `mask_pool_weights` in one einsum; tests
    check both against the official formula.

    Masked mean over the grid with denominator `count + 1e-8`; an empty mask gives exact zeros.
    """
    w = mask_pool_weights(masks)
    return jnp.einsum("...hw,...hwc->...c", w, feats.astype(jnp.float32), precision=_HI)


# ----------------------------------------------------------------------------- token merge
#
# The merge compares adjacent cosine similarities with their r-th largest value, so for duplicated
# or static frames (all similarities 1 up to rounding) the grouping is decided by the last bit of
# each similarity. The official code computes them in fp32 as
#   sim = torch.sum(F.normalize(x1) * F.normalize(x2), -1),  F.normalize(v) = v / max(||v||, 1e-12),
# and the last bits depend on the order of the fp32 additions. The helpers below add in PyTorch's
# CPU kernel order (an 8-lane vectorised loop, ATen `norm` fast path and `cascade_sum`), written
# out as a static sequence of fp32 adds, so that the similarities, and hence the groupings, match
# the official ones bit for bit. Products are rounded on their own (`_product`): an FMA would round
# once where PyTorch's loops round twice. Checked against PyTorch on CPU (tests); exact when C is a
# multiple of 8 (SigLIP's 1152 and every config here): the scalar tail of ATen's norm loop is
# compiled with FMA, which is not reproduced. The official CUDA kernels add in yet another order,
# so on exact near-ties no port matches every device.


def _product(a: jax.Array, b: jax.Array) -> jax.Array:
    """a * b rounded to fp32 even where the compiler fuses it into the add that follows (XLA always
    allows FMA contraction; PyTorch's loops round the product first). Adding `a * 0`, a signed
    zero, changes nothing but leaves no bare multiply-then-add to fuse."""
    return a * b + a * 0.0


def _lanes(v: jax.Array, i: int) -> jax.Array:
    return v[..., i * _LANES:(i + 1) * _LANES]


def _torch_sumsq(x: jax.Array) -> jax.Array:
    """sum(x**2, -1) in fp32, in the order of ATen's vectorised 2-norm over the last dimension:
    lane-wise accumulation of 8-wide blocks, the 8 lanes added in order, then the tail in order."""
    c = x.shape[-1]
    sq = _product(x, x)
    nb = c // _LANES
    acc = jnp.zeros(x.shape[:-1] + (_LANES,), jnp.float32)
    for b in range(nb):
        acc = acc + _lanes(sq, b)
    total = acc[..., 0]
    for j in range(1, _LANES):
        total = total + acc[..., j]
    for d in range(nb * _LANES, c):
        total = total + sq[..., d]
    return total


def _torch_sum(p: jax.Array) -> jax.Array:
    """sum(p, -1) in fp32, in the order of ATen's `cascade_sum` for a contiguous inner reduction:
    8-wide vectors summed as rows of 4 (ILP) with a 4-level cascade, leftovers into the first
    accumulator, the 4 accumulators added, then the scalar tail and the 8 lanes in order."""
    c = p.shape[-1]
    nv = c // _LANES
    rows = nv // 4
    zero = jnp.zeros(p.shape[:-1] + (_LANES,), jnp.float32)
    part = [zero] * 4
    if rows:  # multi_row_sum over `rows` rows of 4 vectors
        levels = 4
        power = max(4, (int(np.ceil(np.log2(rows))) if rows > 1 else 0) // levels)
        step, mask = 1 << power, (1 << power) - 1
        acc = [[zero] * 4 for _ in range(levels)]
        i = 0
        while i + step <= rows:
            for _ in range(step):
                acc[0] = [acc[0][k] + _lanes(p, 4 * i + k) for k in range(4)]
                i += 1
            for j in range(1, levels):
                acc[j] = [acc[j][k] + acc[j - 1][k] for k in range(4)]
                acc[j - 1] = [zero] * 4
                if i & (mask << (j * power)):
                    break
        while i < rows:
            acc[0] = [acc[0][k] + _lanes(p, 4 * i + k) for k in range(4)]
            i += 1
        for j in range(1, levels):
            acc[0] = [acc[0][k] + acc[j][k] for k in range(4)]
        part = acc[0]
    for v in range(rows * 4, nv):
        part[0] = part[0] + _lanes(p, v)
    for k in range(1, 4):
        part[0] = part[0] + part[k]
    total = jnp.zeros(p.shape[:-1], jnp.float32)
    for d in range(nv * _LANES, c):
        total = total + p[..., d]
    for j in range(_LANES):
        total = total + part[0][..., j]
    return total


def adjacent_cosine(x: jax.Array) -> jax.Array:
    """[M, C] fp32 -> [M-1] cos(x[i], x[i+1]) computed as the official merge does (F.normalize with
    eps 1e-12, elementwise product, sum), with PyTorch's fp32 addition order (see above)."""
    x = x.astype(jnp.float32)
    norm = jnp.maximum(jnp.sqrt(_torch_sumsq(x)), _NORM_EPS)
    # XLA rewrites `x / broadcast(norm)` as `x * broadcast(1 / norm)` (two roundings); a
    # denominator that is not a bare broadcast (plus a signed zero: exact, norm > 0) keeps a true
    # division, as F.normalize does.
    xn = x / (norm[..., None] + x * 0.0)
    return _torch_sum(_product(xn[:-1], xn[1:]))


def token_merge(x: jax.Array, valid: jax.Array, max_tokens: int) -> tuple[jax.Array, jax.Array]:
    """Official temporal token merge of one object, with static shapes.

    Args:
      x: [M, C] fp32 per-frame vectors; the n = sum(valid) valid rows must come first.
      valid: [M] bool.
      max_tokens: R (`region_token_num`).
    Returns:
      tokens [R, C] fp32 (rows >= count are zero) and count (int32 scalar).

    If n <= R every valid row is kept. Otherwise, with r = n - R, the adjacent cosine similarities
    sim[i] = cos(x[i], x[i+1]) (`adjacent_cosine`: L2 normalisation with eps 1e-12, so zero rows
    give exactly 0, and the official fp32 rounding, so near-ties break as there) are
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
    sim = adjacent_cosine(jax.lax.stop_gradient(x))  # [M-1]
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
