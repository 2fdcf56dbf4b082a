"""The VRVL3 region path on the host (reference §8): crop and zoom around each mask, the crop's mask
grid, the `<REGION>` token count, the cells the device pools, the k-means initialisation.

Per referred object (the official `resize_image_mask`, then `MaskExtractor` / `MaskPooling`):

1. `crop_and_zoom(frame, mask)` (§8.2-8.3): bounding box of the mask, enlarged by `margin` px and
   clipped to [0, H-1] x [0, W-1], then sliced END-EXCLUSIVE as the official does
   (`frame[r0:r1, c0:c1]`, r1 <= H-1): the frame's last row and column never enter a crop, and a
   mask touching them loses those pixels. Zoom from the whole-frame area a (pixels):
   ceil(sqrt(10 p^2 / a)); when that is 1 and a > 100 p^2, 1 / sqrt(a / (100 p^2)) (shrink so the
   mask covers ~100 patches); p = 14. The crop is resized to (ceil(h s / p) p, ceil(w s / p) p) with
   OpenCV's INTER_LINEAR (`resize_linear_u8`, bit-exact), the cropped mask to the crop's patch grid
   with torch's uint8 bilinear (`resize_mask_u8`, bit-exact) -> a 0/1 grid.
2. The crop goes through the image processor at d = 1 (`data_pipeline.vl3.image_processing`; the
   budget is divided by the number of masks at inference, not in training) and gets a patch grid
   (gh, gw): the mask grid, unless the crop is outside [min_pixels, budget] and is resized.
3. `region_cells(mask_grid, (gh, gw), patch_offset)`: for every on cell of the mask grid (raster
   order), the <= 4 crop patches and the bilinear weights that make its feature: the official
   resizes the crop's FEATURES to the mask grid when the grids differ (§8.5 step 1).
4. `region_tokens(crop, Q)`: tokens = min(Q, cells of the binarised grid) (our policy). The
   official counts int(sum(resized mask)), which is the same for uint8 masks but not for float
   masks (§8.3); the strict path raises `RegionCountMismatch` then, `parity=True` reproduces the
   official count and cells with a warning.
5. `kmeans_init(num_cells, Q, rng)`: the initial centroids of regions with more than Q cells, a
   seeded permutation prefix (the official draws an unseeded `torch.randperm`); `permutation=`
   injects a given one. `seeded_rng(sample_id, region)` seeds it from the sample id.
6. `pack_regions(...)`: one sample's per-region results -> the `vl3_batch` fields `region_cells`,
   `region_weights`, `region_num_cells`, `region_init` (unpadded).

Warnings (the empty-mask fallback, parity disagreements) are returned in the results, not printed.
Masks must hold 0/1 values (bool, integers or floats); the official's arithmetic follows the mask
dtype (uint8 in most scripts, float64 box masks for Ref-L4/VG), so the dtype is kept to reproduce it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from vrefer_jax.numerics import bilinear_weights

PATCH = 14
MARGIN = 2 * PATCH  # the official enlarges the box by two patches
MIN_PATCHES = 10  # zoom so the mask covers at least ~this many patches
MAX_PATCHES = 100  # ... and shrink it to ~this many when larger
REGION_TOKENS = 10  # Q, the official `MaskPooling` limit (VL3Config.region_token_num)

# How the official arithmetic sees a mask: "uint8" (uint8 tensors, and bool / other integer masks,
# which torch's bilinear would refuse or treat like uint8), "float32", "float64".
_KINDS = ("uint8", "float32", "float64")


class RegionCountMismatch(ValueError):
    """The official token count for a region disagrees with ours (float masks, §8.3)."""


# ----------------------------------------------------------------------------- exact resizes


def _cv_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, float]:
    """OpenCV's source index and float32 fraction per destination pixel, and the scale."""
    scale = 1.0 / (dst / src)  # OpenCV: inv_scale = dst / src, scale = 1 / inv_scale (double)
    f = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    i = np.floor(f).astype(np.int64)
    return i, (f - i.astype(np.float32)).astype(np.float32), scale


def _cv_fix(t: np.ndarray) -> np.ndarray:
    """Float32 weights -> OpenCV's 11-bit fixed point (saturate_cast<short> rounds half to even)."""
    return np.rint(t.astype(np.float32) * np.float32(2048)).astype(np.int64)


def resize_linear_u8(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """`cv2.resize(img, (out_w, out_h))` (INTER_LINEAR) for uint8 [H, W, C], bit-exact with OpenCV 4.x
    (checked against opencv-python-headless 4.6.0.66, the official pin).

    OpenCV's fixed-point path: source coordinate f = float32((d + 0.5) * (1 / (out / in)) - 0.5)
    (double, then rounded to float32), i = floor(f), t = f - i; columns with i < 0 or i >= W-1 take
    (edge pixel, t = 0); rows keep t and clamp both source rows to [0, H-1]. Weights are quantised
    to 11 bits, round-half-even(t * 2048) and round-half-even((1 - t) * 2048). The horizontal pass
    is exact in integers, h = a0 S[i] + a1 S[i+1]; the vertical pass is OpenCV's 8-bit formula, the
    same in its vector and scalar code: ((b0 (h0 >> 4)) >> 16) + ((b1 (h1 >> 4)) >> 16) + 2) >> 2.
    An exact 2x downscale on both axes switches to INTER_AREA, (a + b + c + d + 2) >> 2; the same
    size is a copy.
    """
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3:
        raise ValueError(f"image must be uint8 [H, W, C], got {img.dtype} {img.shape}")
    h, w, c = img.shape
    if min(h, w, out_h, out_w) < 1:
        raise ValueError(f"cannot resize a {h}x{w} image to {out_h}x{out_w}")
    if (out_h, out_w) == (h, w):
        return img.copy()
    sx, fx, scale_x = _cv_taps(w, out_w)
    sy, fy, scale_y = _cv_taps(h, out_h)
    s = img.astype(np.int64)
    eps = np.finfo(np.float64).eps
    if abs(scale_x - 2) < eps and abs(scale_y - 2) < eps:
        t = s[0::2, 0::2] + s[0::2, 1::2] + s[1::2, 0::2] + s[1::2, 1::2]
        return ((t + 2) >> 2).astype(np.uint8)
    edge = (sx < 0) | (sx >= w - 1)
    sx = np.clip(sx, 0, w - 1)
    fx = np.where(edge, np.float32(0), fx)
    a0, a1 = _cv_fix(np.float32(1) - fx)[None, :, None], _cv_fix(fx)[None, :, None]
    # int32 is exact: h <= 255 * 2048 < 2^19, b * (h >> 4) <= 2048 * 32640 < 2^31
    s = s.astype(np.int32)
    hor = ((s[:, sx] * a0 + s[:, np.minimum(sx + 1, w - 1)] * a1) >> 4).astype(np.int32)  # [h, out_w, c]
    b0, b1 = _cv_fix(np.float32(1) - fy).astype(np.int32), _cv_fix(fy).astype(np.int32)
    y0, y1 = np.clip(sy, 0, h - 1), np.clip(sy + 1, 0, h - 1)
    out = np.empty((out_h, out_w, c), np.uint8)
    step = max(1, (1 << 22) // (out_w * c))  # rows per chunk: bounded temporaries for big zooms
    for r in range(0, out_h, step):
        sl = slice(r, r + step)
        v = (((b0[sl, None, None] * hor[y0[sl]]) >> 16) + ((b1[sl, None, None] * hor[y1[sl]]) >> 16) + 2) >> 2
        out[sl] = np.clip(v, 0, 255)
    return out


def _torch_u8_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, int]:
    """torch's int16 bilinear taps (antialias False, align_corners False): indices [n_out, 2],
    integer weights [n_out, 2] and their precision (bits)."""
    scale = n_in / n_out
    idx = np.zeros((n_out, 2), np.int64)
    wts = np.zeros((n_out, 2), np.float64)
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - 1.0 + 0.5), 0)
        # torch clamps the tap count to 2: rounding can make it 3 (the third weight is 0)
        size = min(min(int(center + 1.0 + 0.5), n_in) - lo, 2)
        ws = [max(0.0, 1.0 - abs(j + lo - center + 0.5)) for j in range(size)]
        total = 0.0
        for v in ws:
            total += v
        for j, v in enumerate(ws):
            idx[i, j], wts[i, j] = lo + j, (v / total if total != 0.0 else v)
        idx[i, size:] = lo
    w_max = wts.max()
    bits = 0
    while bits < 22 and int(0.5 + w_max * (1 << (bits + 1))) < (1 << 15):
        bits += 1
    return idx, np.floor(0.5 + wts * (1 << bits)).astype(np.int64), bits


def resize_mask_u8(mask: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """`F.interpolate(uint8 mask[None, None], (out_h, out_w), mode="bilinear", align_corners=False)`
    on CPU, bit-exact with torch's uint8 kernel (checked against torch 2.13; the official pins 2.4,
    whose uint8 kernel is the same PIL-SIMD-derived code, torch >= 2.1).

    How torch rounds: separable, the horizontal pass first (skipped when the width is unchanged),
    each pass rounding to uint8. Per output index: center = (in/out)(i + 0.5); taps
    trunc(center - 0.5) (>= 0) and the next one (clamped to the input, at most 2); tent weights
    max(0, 1 - |tap + 0.5 - center|) normalised to sum 1 (double); quantised to int16 as
    floor(0.5 + w 2^b), b the largest precision with round(w_max 2^(b+1)) < 2^15 (14 when a weight
    is 1); out = clamp((sum k x + 2^(b-1)) >> b, 0, 255): nearest, an exact half rounds UP. For a
    0/1 mask each pass outputs 0/1, so the grid is 0/1, but a cell is on iff the ROUNDED row values
    blend to >= 1/2, not iff the 2-D bilinear value is >= 1/2.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be [H, W], got {m.shape}")
    m = m.astype(np.int64)
    h, w = m.shape
    if out_w != w:
        idx, k, bits = _torch_u8_taps(w, out_w)
        m = np.clip(((m[:, idx] * k[None]).sum(-1) + (1 << (bits - 1))) >> bits, 0, 255)
    if out_h != h:
        idx, k, bits = _torch_u8_taps(h, out_h)
        m = np.clip(((m[idx] * k[:, :, None]).sum(1) + (1 << (bits - 1))) >> bits, 0, 255)
    return m.astype(np.uint8)


def _torch_float_taps(n_in: int, n_out: int, dt) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """torch's CPU bilinear taps in float dtype `dt` (align_corners False): i0, i1, lambda0, lambda1.
    src = fma(in/out, i + 0.5, -0.5) rounded once to dt (the compiled kernels contract it), >= 0."""
    if n_in == n_out:
        i = np.arange(n_out)
        return i, i, np.ones(n_out, dt), np.zeros(n_out, dt)
    scale = Fraction(float(dt(n_in) / dt(n_out)))
    src = np.array([float(scale * Fraction(2 * i + 1, 2) - Fraction(1, 2)) for i in range(n_out)]).astype(dt)
    src = np.maximum(src, dt(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    l1 = np.clip(src - i0.astype(dt), dt(0), dt(1)).astype(dt)
    return i0, i0 + (i0 < n_in - 1), (dt(1) - l1).astype(dt), l1


def resize_mask_float(mask: np.ndarray, out_h: int, out_w: int, dtype=np.float64) -> np.ndarray:
    """torch's CPU `F.interpolate(mask[None, None], mode="bilinear", align_corners=False)` of a 0/1
    mask in float32 / float64 (the soft grid the official counts for float masks).

    out = x00 w00 + x01 w01 + x10 w10 + x11 w11 with w00 = h-lambda0 * w-lambda0 etc. rounded in
    `dtype`, summed left to right. Bit-exact with torch 2.13 for float32 0/1 masks; for float64 a
    few cells in a thousand grids differ in the last bit (the count is unaffected unless the sum is
    within ~1e-12 of an integer).
    """
    dt = np.dtype(dtype).type
    m = np.asarray(mask).astype(dt)
    h, w = m.shape
    r0, r1, hl0, hl1 = _torch_float_taps(h, out_h, dt)
    c0, c1, wl0, wl1 = _torch_float_taps(w, out_w, dt)
    hl0, hl1, wl0, wl1 = hl0[:, None], hl1[:, None], wl0[None], wl1[None]
    out = m[r0][:, c0] * (hl0 * wl0) + m[r0][:, c1] * (hl0 * wl1)
    out = out + m[r1][:, c0] * (hl1 * wl0)
    return (out + m[r1][:, c1] * (hl1 * wl1)).astype(dt)


# ----------------------------------------------------------------------------- crop and zoom


def _mask_kind(mask: np.ndarray) -> str:
    if mask.dtype == np.float64:
        return "float64"
    if np.issubdtype(mask.dtype, np.floating):
        return "float32"  # float32 (float16 is treated as float32)
    if mask.dtype == bool or np.issubdtype(mask.dtype, np.integer):
        return "uint8"
    raise ValueError(f"mask: dtype {mask.dtype} is not bool, integer or float")


def _zoom_scale(area: int, kind: str, patch: int) -> float:
    """The official zoom factor from the whole-frame mask area, in the dtype arithmetic torch uses
    for that mask (`1960 / mask.sum()` is float32 for integer and float32 masks, float64 for
    float64 ones; `math.sqrt` then works in double)."""
    ft = np.float64 if kind == "float64" else np.float32
    lo, hi = MIN_PATCHES * patch * patch, patch * patch
    s = math.ceil(math.sqrt(float(ft(lo) / ft(area))))
    if s == 1:
        q = ft(area) / ft(hi)
        if q > MAX_PATCHES:
            return 1.0 / math.sqrt(float(ft(q) / ft(MAX_PATCHES)))
    return float(s)


@dataclasses.dataclass(frozen=True)
class CropZoom:
    """One mask's crop (reference §8.2).

    image:        uint8 [Hc, Wc, 3], Hc, Wc multiples of `patch` (the processor's input).
    mask_grid:    uint8 [Hc/p, Wc/p] 0/1, the binarised cropped mask resized as torch resizes a uint8
                  mask (our policy for every mask dtype).
    official_grid: the grid the official computes for this mask's dtype: uint8 0/1 for integer /
                  bool masks (= mask_grid), float64 soft values for float masks.
    box:          (r0, c0, r1, c1) of the crop in the frame, end exclusive.
    scale:        the zoom factor.
    kind:         "uint8", "float32" or "float64": how the official's arithmetic saw the mask.
    warnings:     e.g. the empty-mask fallback.
    """

    image: np.ndarray
    mask_grid: np.ndarray
    official_grid: np.ndarray
    box: tuple[int, int, int, int]
    scale: float
    kind: str
    warnings: tuple[str, ...] = ()

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.mask_grid.shape)


def crop_and_zoom(frame: np.ndarray, mask: np.ndarray, margin: int = MARGIN, patch: int = PATCH,
                  *, name: str = "mask") -> CropZoom:
    """The official `resize_image_mask` for one mask (reference §8.2-8.3); see the module docstring.

    Args:
      frame: uint8 [H, W, 3], the annotated frame at its original resolution.
      mask: [H, W] 0/1 (bool, integer or float; the dtype decides the official's arithmetic).
      margin: px added around the box (the official: 2 patches). patch: the patch size.
      name: names the mask in errors and warnings (e.g. "sample 12 object 0").
    An empty mask becomes the whole frame (as the official, which then computes in float32), with a
    warning in the result.
    """
    frame = np.asarray(frame)
    m = np.asarray(mask)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"{name}: frame must be uint8 [H, W, 3], got {frame.dtype} {frame.shape}")
    if m.shape != frame.shape[:2]:
        raise ValueError(f"{name}: mask shape {m.shape} does not match the frame {frame.shape[:2]}")
    kind = _mask_kind(m)
    if not ((m == 0) | (m == 1)).all():
        raise ValueError(f"{name}: mask values must be 0/1 (got values in [{m.min()}, {m.max()}])")
    h, w = m.shape
    on = m != 0
    area = int(on.sum())
    warnings: list[str] = []
    if area == 0:
        warnings.append(f"{name}: empty mask, using the whole frame")
        on = np.ones((h, w), bool)
        area, kind = h * w, "float32"  # the official substitutes torch.ones((h, w)) (float32)
    rows, cols = np.nonzero(on.any(1))[0], np.nonzero(on.any(0))[0]
    r0, c0 = max(0, int(rows[0]) - margin), max(0, int(cols[0]) - margin)
    r1, c1 = min(h - 1, int(rows[-1]) + margin), min(w - 1, int(cols[-1]) + margin)
    if r1 <= r0 or c1 <= c0:
        raise ValueError(f"{name}: empty crop box {(r0, c0, r1, c1)} in a {h}x{w} frame (the official "
                         "slices the box end-exclusive and clips it to H-1, W-1)")
    scale = _zoom_scale(area, kind, patch)
    out_h = math.ceil((r1 - r0) * scale / patch) * patch
    out_w = math.ceil((c1 - c0) * scale / patch) * patch
    image = resize_linear_u8(frame[r0:r1, c0:c1], out_h, out_w)
    crop = on[r0:r1, c0:c1]
    gh, gw = out_h // patch, out_w // patch
    grid = resize_mask_u8(crop.astype(np.uint8), gh, gw)
    official = grid if kind == "uint8" else resize_mask_float(crop, gh, gw, np.dtype(kind)).astype(np.float64)
    return CropZoom(image=image, mask_grid=grid, official_grid=official, box=(r0, c0, r1, c1), scale=scale,
                    kind=kind, warnings=tuple(warnings))


# ----------------------------------------------------------------------------- token counts


def official_token_count(crop_mask: np.ndarray, grid: tuple[int, int], Q: int = REGION_TOKENS) -> int:
    """The official `min(10, int(F.interpolate(crop_mask, grid).sum()))` for a cropped 0/1 mask in
    its own dtype: uint8 rounding for bool / integer masks (= the number of on cells), a soft sum for
    float masks (can be below the number of cells the official pools).

    The soft sum is taken exactly (`math.fsum`). torch sums in the mask dtype, in an order set by the
    CPU's vector width, so when the sum lies within rounding of an integer (float32: ~1e-5) the
    official's own int() can go either way; that is not emulated."""
    m = np.asarray(crop_mask)
    kind = _mask_kind(m)
    if kind == "uint8":
        g = resize_mask_u8(m.astype(np.uint8), *grid)
    else:
        g = resize_mask_float(m, *grid, np.dtype(kind))
    return min(Q, int(math.fsum(g.astype(np.float64).ravel())))


@dataclasses.dataclass(frozen=True)
class RegionTokens:
    """A region's pooled grid and `<REGION>` token count.

    grid: uint8 0/1 [gm, wm], the mask-grid cells pooled (raster order). num_cells: on cells.
    count: `<REGION>` tokens in the prompt. official_count: the official's count for this mask.
    warnings: parity-mode notes.
    """

    grid: np.ndarray
    num_cells: int
    count: int
    official_count: int
    warnings: tuple[str, ...] = ()


def region_tokens(crop: CropZoom, Q: int = REGION_TOKENS, *, parity: bool = False,
                  name: str = "region") -> RegionTokens:
    """Our count: min(Q, cells of `crop.mask_grid`). The official: min(Q, int(sum(official grid))),
    pooling the cells of `official_grid > 0`.

    Strict (default): raise `RegionCountMismatch` naming `name` when the two counts differ (only float
    masks can: for uint8 / bool masks the grids are the same). parity=True: use the official grid
    and count, with a warning when they differ from ours; when the official count also disagrees
    with the official's own pooled cells, the official splice fails and the model never sees the
    region (§10 step 8): that is reported in the warnings, the `vl3_batch` contract cannot express
    it (its `<REGION>` rows are always min(Q, cells)).
    """
    cells = int((crop.mask_grid > 0).sum())
    count = min(Q, cells)
    off_grid = (crop.official_grid > 0).astype(np.uint8)
    off_cells = int(off_grid.sum())
    official = min(Q, int(math.fsum(np.asarray(crop.official_grid, np.float64).ravel())))
    if not parity:
        if official != count:
            raise RegionCountMismatch(
                f"{name}: the official counts {official} <REGION> tokens for this {crop.kind} mask "
                f"(int of the soft resized mask's sum), ours {count} (min({Q}, {cells} cells)); "
                "binarise the mask to uint8 or use parity mode")
        return RegionTokens(grid=crop.mask_grid, num_cells=cells, count=count, official_count=official)
    notes = []
    if official != count or off_cells != cells:
        notes.append(f"{name}: parity mode: official {official} tokens from {off_cells} cells "
                     f"(ours {count} from {cells})")
    if official != min(Q, off_cells):
        notes.append(f"{name}: the official count {official} disagrees with its {min(Q, off_cells)} pooled "
                     "vectors: the official splice fails and leaves the <REGION> rows as plain embeddings")
    return RegionTokens(grid=off_grid, num_cells=off_cells, count=official, official_count=official,
                        warnings=tuple(notes))


# ----------------------------------------------------------------------------- cells and k-means


def region_cells(mask_grid: np.ndarray, crop_grid: tuple[int, int], patch_offset: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The crop patches behind each on cell of the mask grid.

    Args:
      mask_grid: [gm, wm]; cells > 0 are on, taken in raster order.
      crop_grid: (gh, gw), the crop's patch grid after the processor (stride 1, raster order).
      patch_offset: index of the crop's first patch in the sample's packed `patches`.
    Returns:
      cells int32 [c, 4]: patch indices (`patch_offset + row * gw + col`), -1 pads;
      weights float32 [c, 4]: the bilinear weights (align_corners False, no antialias) with which the
      official resizes the crop's features [gh, gw] to [gm, wm]; equal grids give one patch with
      weight 1. Zero weights are dropped. Weight = row weight * column weight (float32).
    """
    g = np.asarray(mask_grid)
    if g.ndim != 2:
        raise ValueError(f"mask_grid must be [gm, wm], got {g.shape}")
    gm, wm = g.shape
    gh, gw = (int(v) for v in crop_grid)
    if gh < 1 or gw < 1 or patch_offset < 0:
        raise ValueError(f"crop_grid {crop_grid} and patch_offset {patch_offset} must be positive / >= 0")
    on = np.argwhere(g > 0)  # raster order
    cells = np.full((len(on), 4), -1, np.int32)
    weights = np.zeros((len(on), 4), np.float32)
    wr, wc = bilinear_weights(gh, gm), bilinear_weights(gw, wm)  # [gm, gh], [wm, gw]
    for n, (i, j) in enumerate(on):
        rows, cols = np.flatnonzero(wr[i] > 0), np.flatnonzero(wc[j] > 0)
        k = 0
        for a in rows:
            for b in cols:
                cells[n, k] = patch_offset + a * gw + b
                weights[n, k] = wr[i, a] * wc[j, b]
                k += 1
    return cells, weights


def seeded_rng(sample_id: str, region: int) -> np.random.Generator:
    """A generator seeded from (sample id, region index): the same init on every run and host."""
    digest = hashlib.sha256(f"{sample_id}\x00{region}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def kmeans_init(num_cells: int, Q: int = REGION_TOKENS, rng: np.random.Generator | None = None, *,
                permutation: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """int32 [Q]: the cells whose features start k-means (regions with more than Q cells).

    The official takes `torch.randperm(n)[:Q]` from the unseeded global RNG; here `rng.permutation(n)
    [:Q]` (seed it with `seeded_rng`), or the first Q entries of an injected `permutation` (parity
    mode: e.g. the official run's `torch.randperm(n)`; distinct indices in [0, n) required). Regions
    with n <= Q do not run k-means: zeros are returned.
    """
    if num_cells <= Q:
        return np.zeros(Q, np.int32)
    if permutation is not None:
        p = np.asarray(permutation).reshape(-1)
        if len(p) < Q or len(np.unique(p[:Q])) != Q or p.min() < 0 or p.max() >= num_cells:
            raise ValueError(f"permutation must start with {Q} distinct cells in [0, {num_cells}), got {p[:Q]}")
        return p[:Q].astype(np.int32)
    if rng is None:
        raise ValueError("kmeans_init: pass rng (seeded_rng(sample_id, region)) or permutation")
    return rng.permutation(num_cells)[:Q].astype(np.int32)


def pack_regions(regions: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], Q: int = REGION_TOKENS
                 ) -> dict[str, np.ndarray]:
    """One sample's regions [(cells [c, 4], weights [c, 4], init [Q]), ...] in prompt order -> the
    `vl3_batch` fields region_cells [R, C, 4], region_weights [R, C, 4], region_num_cells [R],
    region_init [R, Q] (C = the largest c; shorter regions padded with -1 / 0)."""
    r = len(regions)
    c = max((len(cl) for cl, _, _ in regions), default=0)
    out = dict(region_cells=np.full((r, c, 4), -1, np.int32), region_weights=np.zeros((r, c, 4), np.float32),
               region_num_cells=np.zeros(r, np.int32), region_init=np.zeros((r, Q), np.int32))
    for k, (cl, wt, init) in enumerate(regions):
        if cl.shape != wt.shape or cl.ndim != 2 or cl.shape[1] != 4:
            raise ValueError(f"region {k}: cells {cl.shape} and weights {wt.shape} must both be [c, 4]")
        if np.shape(init) != (Q,):
            raise ValueError(f"region {k}: init must be [{Q}], got {np.shape(init)}")
        n = len(cl)
        out["region_cells"][k, :n] = cl
        out["region_weights"][k, :n] = wt
        out["region_num_cells"][k] = n
        out["region_init"][k] = init
    return out
