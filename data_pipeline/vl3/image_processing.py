"""The VRVL3 image processor on the host (`DAMOVLImageProcessor`, reference §4, §3.3, §6).

One image or video frame at a time, as the official processor is called (§4.5):

  uint8 [H, W, 3] --smart_resize--> (h, w), multiples of 14·d, within the pixel budget
                  --PIL bicubic-->  uint8 [h, w, 3]
                  --normalize-->    float32 [h, w, 3] in [-1, 1]
                  --patchify-->     patches [gh·gw, 3·p·p] in d×d merge-block order, (C, py, px) each

`d` (`downsampling`) is 1 for images and region crops and the merge size (2) for video frames; it
changes only the patch order, the rounding factor and the budget. The budget `max_pixels` for one
call is `budget(mm_max_length, merge, d, N)` (§4.1-4.2).

Returned alongside the patches: `coords` (row, col) of every patch, the 2D RoPE positions (§3.3),
and `groups`, the d² patches that the device averages into each visual token (§6: the bilinear
resize to (gh/d, gw/d) is exactly a d×d mean for grids that are multiples of d), tokens in raster
order of the merged grid.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from data_pipeline.video import siglip_normalize

PATCH_SIZE = 14
MIN_PIXELS = 56 * 56  # the class default; the encoder wrapper never overrides it (§4.1)
MAX_ASPECT = 200


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The official resize target (§4.3): (h, w), both multiples of `factor`, h·w within the budget.

    1. A side below `factor`: scale both sides by factor / min(side) and round (Python's half-to-even
       `round`). Otherwise an aspect ratio above 200 is an error.
    2. Round each side to the nearest multiple of `factor` (half-to-even).
    3. Over `max_pixels`: shrink by β = sqrt(H·W / max_pixels), flooring to multiples of `factor`;
       under `min_pixels`: grow by β = sqrt(min_pixels / (H·W)), ceiling to multiples.

    Unlike transformers' VideoLLaMA3 copy there is no `max(factor, ·)` guard after the floor, so a
    very elongated image under a small budget can floor a side to 0, where the official resize then
    fails; that raises ValueError here. Raises ValueError naming the sizes.
    """
    for name, v in (("height", height), ("width", width), ("factor", factor)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"smart_resize: {name} must be a positive integer, got {v!r}")
    h0, w0 = height, width
    if height < factor or width < factor:
        scale = factor / min(height, width)
        width = round(scale * width)
        height = round(scale * height)
    elif max(height, width) / min(height, width) > MAX_ASPECT:
        raise ValueError(f"smart_resize: image of {height}x{width} (height x width) has aspect ratio "
                         f"{max(height, width) / min(height, width):.1f}, above {MAX_ASPECT}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar < factor or w_bar < factor:
        raise ValueError(f"smart_resize: image of {h0}x{w0} (height x width) under max_pixels={max_pixels} "
                         f"resizes to {h_bar}x{w_bar}: a side of 0 patches (factor {factor})")
    return int(h_bar), int(w_bar)


def budget(max_visual_tokens: int, merge_size: int, downsampling: int, num_images: int,
           patch_size: int = PATCH_SIZE) -> int:
    """`max_pixels` for one processor call (§4.1-4.2), the official arithmetic to the bit.

    The processor's `max_pixels = mm_max_length · merge² · p²`; per call `B = int(max_pixels /
    (merge / d)²)` (float division), then `int(B // N)`. Images (d = 1) get at most
    `max_visual_tokens` patches in all; video frames (d = merge, N frames) at most
    `max_visual_tokens / N` merged tokens each.
    """
    for name, v in (("max_visual_tokens", max_visual_tokens), ("merge_size", merge_size),
                    ("downsampling", downsampling), ("num_images", num_images), ("patch_size", patch_size)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"budget: {name} must be a positive integer, got {v!r}")
    processor_max = max_visual_tokens * (merge_size ** 2 * patch_size ** 2)
    per_call = int(processor_max / (merge_size / downsampling) ** 2)
    return int(per_call // num_images)


def _check_image(img: np.ndarray, name: str = "img") -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or min(img.shape[:2]) < 1:
        raise ValueError(f"{name} must be uint8 [H, W, 3] RGB, got {img.dtype} {img.shape}")
    return img


def resize_image(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [h, w, 3]: PIL bicubic with PIL's own antialiasing, which is what
    `transformers.image_transforms.resize` does on uint8 input (§4.3 step 4; identity when the size
    is unchanged)."""
    img = _check_image(img)
    h, w = (int(s) for s in size)
    if h < 1 or w < 1:
        raise ValueError(f"resize size must be positive (h, w), got {size}")
    return np.asarray(Image.fromarray(img).resize((w, h), Image.BICUBIC))


def normalize(img: np.ndarray) -> np.ndarray:
    """uint8 -> float32 `(x / 255 - 0.5) / 0.5` in [-1, 1], bit-identical to transformers' rescale
    (float64 x·(1/255) cast to float32) then normalise with mean = std = 0.5 (§4.1)."""
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f"normalize takes uint8 pixels, got {img.dtype}")
    return siglip_normalize(img)


def _check_grid(gh: int, gw: int, downsampling: int, what: str) -> None:
    if downsampling < 1 or gh < 1 or gw < 1 or gh % downsampling or gw % downsampling:
        raise ValueError(f"{what}: a grid of {gh}x{gw} patches is not made of {downsampling}x{downsampling} "
                         "merge blocks (downsampling must divide both sides)")


def patch_coords(gh: int, gw: int, downsampling: int) -> np.ndarray:
    """int32 [gh·gw, 2]: (row, col) in the patch grid of each patch, in patch order (§3.3)."""
    _check_grid(gh, gw, downsampling, "patch_coords")
    d = downsampling
    rc = np.stack(np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij"), -1)  # [gh, gw, 2]
    return rc.reshape(gh // d, d, gw // d, d, 2).transpose(0, 2, 1, 3, 4).reshape(-1, 2).astype(np.int32)


def patchify(img: np.ndarray, patch_size: int, downsampling: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 [h, w, 3] -> (patches [gh·gw, 3·p·p], coords int32 [gh·gw, 2]).

    Patch order (§4.4): d×d merge blocks in raster order of the block grid, then in-block row, then
    in-block column (d = 1: raster order). Each patch is flattened channel-major then row then column
    (C, py, px), the layout of the Conv2d patch-embedding weight [D, 3, p, p].
    """
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"patchify takes [h, w, 3] pixels, got shape {img.shape}")
    h, w, c = img.shape
    p, d = patch_size, downsampling
    if p < 1 or h % p or w % p:
        raise ValueError(f"patchify: image of {h}x{w} is not a whole number of {p}x{p} patches")
    gh, gw = h // p, w // p
    _check_grid(gh, gw, d, "patchify")
    x = img.reshape(gh // d, d, p, gw // d, d, p, c)
    # (block row, block col, in-block row, in-block col, C, py, px)
    x = x.transpose(0, 3, 1, 4, 6, 2, 5).reshape(gh * gw, c * p * p)
    return np.ascontiguousarray(x), patch_coords(gh, gw, d)


def merge_groups(gh: int, gw: int, downsampling: int) -> np.ndarray:
    """int32 [gh·gw / d², d²]: for each visual token, in raster order of the merged (gh/d × gw/d)
    grid, the indices (in `patchify` order) of the d² patches it averages. Because patches come in
    merge blocks, token v owns patches v·d² .. v·d² + d² − 1; with d = 1 each token is one patch."""
    _check_grid(gh, gw, downsampling, "merge_groups")
    return np.arange(gh * gw, dtype=np.int32).reshape(-1, downsampling ** 2)


@dataclasses.dataclass
class ProcessedImage:
    """One processed image or video frame.

    patches  float32 [gh·gw, 3·p·p]   normalised pixels, merge-block order, (C, py, px) per patch
    coords   int32   [gh·gw, 2]       (row, col) of each patch: the 2D RoPE positions
    grid     (gh, gw)                 patch grid (`grid_thw` = (1, gh, gw))
    groups   int32   [gh·gw / d², d²] patches of each visual token (raster order of the merged grid)
    size     (h, w)                   the resized image in pixels
    downsampling                      d: 1 for images and crops, the merge size for video frames
    """

    patches: np.ndarray
    coords: np.ndarray
    grid: tuple[int, int]
    groups: np.ndarray
    size: tuple[int, int]
    downsampling: int

    @property
    def num_tokens(self) -> int:
        """Visual tokens before pruning: (gh / d)·(gw / d)."""
        return len(self.groups)


def process_image(img: np.ndarray, *, max_pixels: int, downsampling: int, patch_size: int = PATCH_SIZE,
                  min_pixels: int = MIN_PIXELS) -> ProcessedImage:
    """uint8 [H, W, 3] RGB -> `ProcessedImage` (§4.2-4.4): smart_resize with factor p·d, PIL bicubic
    (even when the size is unchanged), normalise, patchify. `max_pixels` is the per-call budget
    (`budget(...)`)."""
    img = _check_image(img)
    if not isinstance(downsampling, (int, np.integer)) or downsampling < 1:
        raise ValueError(f"downsampling must be a positive integer, got {downsampling!r}")
    h, w = smart_resize(int(img.shape[0]), int(img.shape[1]), patch_size * downsampling, min_pixels, max_pixels)
    pixels = normalize(resize_image(img, (h, w)))
    patches, coords = patchify(pixels, patch_size, downsampling)
    gh, gw = h // patch_size, w // patch_size
    return ProcessedImage(patches=patches, coords=coords, grid=(gh, gw), groups=merge_groups(gh, gw, downsampling),
                          size=(h, w), downsampling=int(downsampling))
