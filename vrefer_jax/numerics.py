"""Numeric helpers shared by the host (data pipeline) and the device (models), with no dependency
on either: the models and the data pipeline both import from here, never from each other.

* `bilinear_weights`: PyTorch's `F.interpolate(mode="bilinear", align_corners=False)` along one
  axis as a matrix; the region encoder resizes masks on the device with it and the loader's
  `masks.grid_masks` uses its support to resize them on the host.
"""

from __future__ import annotations

import numpy as np


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
