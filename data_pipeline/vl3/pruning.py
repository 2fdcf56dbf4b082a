"""VRVL3 video token pruning by frame difference (reference §7), on the host.

The official model compares the normalised **pixel** patches (not features) of consecutive frames,
merge block by merge block, in the model dtype (bf16 for the released models):

  diff[t, v] = mean(|P_t[v] − P_{t−1}[v]|) · 255        t >= 1, over the d²·D values of block v
  keep[t, v] = diff[t, v] > threshold (0.1)             frame 0 keeps every block
  a frame that keeps nothing keeps its first block       (min_tokens = 1)

Every step is rounded to the compute dtype as PyTorch does it: the inputs are cast (round to
nearest even), the difference is rounded, the mean accumulates in float32 and is rounded once,
the product with 255 is rounded, and the threshold itself is cast to the dtype (PyTorch casts a
Python scalar to a bf16 tensor's dtype before comparing: bf16(0.1) = 0.10009765625). The float32
sum here is taken exactly (in float64, exact for bf16 values in [-2, 2]) before rounding to float32,
so it does not depend on summation order; PyTorch's own order can differ from it by a float32 ulp,
which moves a bf16 result only at a rounding tie (none in the tests).

Only video with more than one frame is pruned; images and one-frame videos keep all tokens (that is
also what `keep_mask` returns for T = 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_dtypes
import numpy as np

from data_pipeline.vl3.image_processing import ProcessedImage

THRESHOLD = 0.1
MIN_TOKENS = 1
DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}


def _dtype(dtype: str) -> np.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def frame_differences(frame_patches: np.ndarray, dtype: str = "bfloat16") -> np.ndarray:
    """float32 [T − 1, n_tokens]: `mean(|P_t − P_{t−1}|) · 255` per merge block for t = 1 .. T − 1, each
    value exactly representable in `dtype` (the official's `pixel_diff` before frame 0 is prepended).
    `frame_patches`: [T, n_tokens, d²·D] normalised pixel patches grouped by merge block."""
    x = np.asarray(frame_patches)
    if x.ndim != 3 or x.shape[0] < 1 or x.shape[2] < 1:
        raise ValueError(f"frame_patches must be [T, n_tokens, d*d*D] with T >= 1, got shape {x.shape}")
    dt = _dtype(dtype)
    f32 = np.float32
    out = np.empty((x.shape[0] - 1, x.shape[1]), f32)
    prev = x[0].astype(dt).astype(f32)  # the model-dtype inputs
    for t in range(1, x.shape[0]):  # frame by frame: a long video's patches are gigabytes
        cur = x[t].astype(dt).astype(f32)
        d = (cur - prev).astype(dt)  # rounded difference
        total = np.abs(d).astype(np.float64).sum(-1).astype(f32)  # float32 accumulation
        mean = (total / f32(x.shape[2])).astype(dt)
        out[t - 1] = (mean.astype(f32) * f32(255)).astype(dt).astype(f32)
        prev = cur
    return out


def keep_mask(frame_patches: np.ndarray, threshold: float = THRESHOLD, dtype: str = "bfloat16") -> np.ndarray:
    """bool [T, n_tokens]: which merged visual tokens survive frame-difference pruning (§7).

    `frame_patches`: [T, n_tokens, d²·D] normalised pixel patches grouped by merge block, as the
    device sees them (`group_frame_patches`); `dtype`: "bfloat16" (the released models) or
    "float32". Frame 0 keeps all; a later frame keeps the blocks whose difference to the previous
    frame exceeds `threshold` (cast to `dtype`), and its first block if it would keep none.
    """
    diff = frame_differences(frame_patches, dtype)
    thr = np.asarray(threshold, np.float32).astype(_dtype(dtype)).astype(np.float32)
    t, n = np.asarray(frame_patches).shape[:2]
    keep = np.ones((t, n), bool)
    keep[1:] = diff > thr
    empty = keep.sum(1) < MIN_TOKENS
    keep[empty, :MIN_TOKENS] = True
    return keep


def group_frame_patches(frames: Sequence[ProcessedImage]) -> np.ndarray:
    """[T, n_tokens, d²·D] float32: each frame's patches gathered by its merge groups, the layout
    `keep_mask` takes (the official's `view(n, (gh/d)·(gw/d), -1)` of the block-ordered patches).
    All frames must share one grid and downsampling, as the frames of one video do."""
    if not frames:
        raise ValueError("group_frame_patches needs at least one frame")
    g0, d0 = frames[0].grid, frames[0].downsampling
    for i, f in enumerate(frames):
        if f.grid != g0 or f.downsampling != d0:
            raise ValueError(f"frames[{i}] has grid {f.grid} at downsampling {f.downsampling}; frame 0 has {g0} "
                             f"at {d0} (frames of one video share one size)")
    return np.stack([f.patches[f.groups].reshape(len(f.groups), -1) for f in frames])
