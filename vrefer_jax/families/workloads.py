"""Synthetic, realistic batches of any family: what the benchmarks and the AOT memory checks run.

One description of a workload (`Workload`: frames, text, regions, ...) and one entry point,
`synthetic_batch(cfg, batch_size, workload)`; the family of the config (`families.for_config`)
decides what the batch looks like:

* VideoRefer-7B (`videorefer`): one `<video>` of `frames` frames (the config's `num_frames` by
  default) at the tower's image size, `regions` objects of `region_frames` masked frames each;
  `L = text_len + 1 + regions` prompt ids (the text, the `<video>` id and one `<region>` id per
  object), expanded on the device to at most `out_len = L + video tokens + regions x
  region_token_num`. With `total_len` (training): `L = max(16, total_len - video tokens)`,
  `out_len = total_len`.
* VideoRefer-VideoLLaMA3 (`videorefer_videollama3`): `frames` video frames (16 by default) of a
  `frame_hw` source size, resized by the processor rules (`data_pipeline.vl3.image_processing`:
  `smart_resize` within the per-frame share of `mm_max_length`), every merged token kept (no
  pruning); `regions` crops of `region_cells` mask cells each (k-means runs above
  `region_token_num`), a crop grid of the mask's side plus 2 patches of margin on each side;
  `text_len` text rows. `L = out_len` = visual rows + region rows + text (or `total_len`, the
  text taking what is left). With `vision_attention_chunk` the patches are laid out in blocks
  (`vl3_batch.chunk_example`).

Values are random (ids, pixels) but the batch passes the family's `validate`; `abstract=True`
returns `jax.ShapeDtypeStruct`s with the same shapes without building the arrays.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from vrefer_jax.config import IGNORE_INDEX


@dataclasses.dataclass(frozen=True)
class Workload:
    """A workload, family-neutral (each family reads the fields it has; see the module docstring).

    text_len:      text tokens (besides the <video> / <region> ids, the visual and region rows)
    total_len:     static sequence length instead of text_len (training: the text fills the rest)
    frames:        video frames (None: VideoRefer `cfg.num_frames`, VRVL3 16)
    frame_hw:      VRVL3 source frame size (height, width) in pixels, before `smart_resize`
    regions:       VideoRefer objects / VRVL3 region masks (one crop each)
    region_frames: VideoRefer masked frames per object (and region frames)
    region_cells:  VRVL3 mask cells per region
    labels:        add a `labels` field (training) supervising the last half of the text
    """

    text_len: int = 64
    total_len: int | None = None
    frames: int | None = None
    frame_hw: tuple[int, int] = (224, 392)
    regions: int = 1
    region_frames: int = 1
    region_cells: int = 30
    labels: bool = False


def synthetic_batch(cfg, batch_size: int, workload: Workload = Workload(), *, abstract: bool = False,
                    seed: int = 0) -> tuple[dict[str, Any], int, dict[str, Any]]:
    """-> (batch, out_len, sizes): a batch of `batch_size` identical-shape rows of `cfg`'s family,
    the static LLM length to run it at, and a dict of the sizes that describe it (for reports)."""
    from vrefer_jax import families

    name = families.for_config(cfg).name
    if name not in _BUILDERS:
        raise families.UnknownFamily(f"no synthetic workload for model family {name!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return _BUILDERS[name](cfg, batch_size, workload, abstract, seed)


def _abstract(shapes: dict[str, tuple[tuple[int, ...], Any]]) -> dict[str, Any]:
    import jax

    return {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in shapes.items()}


def _text_ids(rng: np.random.Generator, n: int, high: int) -> np.ndarray:
    """Random ordinary ids below `high` (the first special id), 1 and up."""
    return rng.integers(1, max(high, 2), n).astype(np.int32)


# ----------------------------------------------------------------------------- VideoRefer-7B


def _videorefer(cfg, B: int, w: Workload, abstract: bool, seed: int):
    from vrefer_jax import batch as batch_lib
    from vrefer_jax.config import VIDEO_TOKEN_INDEX

    T = w.frames or cfg.num_frames
    nv = batch_lib.model_video_tokens(cfg, T)
    Q = cfg.object_encoder.region_token_num
    if w.total_len is not None:
        L, out_len = max(16, w.total_len - nv), w.total_len
    else:
        L = w.text_len + 1 + w.regions
        out_len = L + nv + w.regions * Q
    if L < 2 + w.regions:
        raise ValueError(f"VideoRefer: {L} prompt ids cannot hold <video> and {w.regions} <region> ids")
    G = cfg.vision.grid
    dims = dict(B=B, L=L, T=T, S=cfg.vision.image_size, F=max(1, w.region_frames), K=max(1, w.regions),
                M=max(1, w.region_frames), G=G)
    sizes = dict(family="videorefer", L=L, out_len=out_len, frames=T, video_tokens=nv, objects=w.regions,
                 object_frames=w.region_frames)
    if abstract:
        shapes = batch_lib.field_shapes(**dims)
        if not w.labels:
            shapes.pop("labels")
        return _abstract(shapes), out_len, sizes
    rng = np.random.default_rng(seed)
    b = batch_lib.empty_batch(**dims, pad_token_id=cfg.pad_token_id)
    b["input_ids"][:] = _text_ids(rng, B * L, cfg.region_token_id).reshape(B, L)
    b["input_ids"][:, 0] = VIDEO_TOKEN_INDEX
    # one <region> id per object near the end (each after a few text ids)
    for k in range(w.regions):
        b["input_ids"][:, L - 2 - 3 * (w.regions - 1 - k)] = cfg.region_token_id
    b["segment_ids"][:] = 1
    b["frames"][:] = rng.uniform(-1, 1, b["frames"].shape)
    b["region_frames"][:] = rng.uniform(-1, 1, b["region_frames"].shape)
    for k in range(w.regions):
        b["object_frames"][:, k, : w.region_frames] = np.arange(w.region_frames)
        b["object_masks"][:, k, : w.region_frames, : G // 2, : G // 2] = True
        b["object_valid"][:, k] = True
    if w.labels:
        b["labels"][:, L // 2:] = b["input_ids"][:, L // 2:]
        b["labels"][b["input_ids"] < 0] = IGNORE_INDEX
    else:
        b.pop("labels")
    return b, out_len, sizes


# ----------------------------------------------------------------------------- VideoRefer-VideoLLaMA3


def vl3_frame_grid(cfg, frames: int, frame_hw: tuple[int, int]) -> tuple[int, int]:
    """(gh, gw) patch grid of one video frame of `frame_hw` pixels among `frames` frames, by the
    processor rules (per-frame share of `mm_max_length`, factor 14 x merge)."""
    from data_pipeline.vl3 import image_processing as ip

    m, p = cfg.spatial_merge_size, cfg.vision.patch_size
    max_pixels = ip.budget(cfg.max_visual_tokens, m, m, frames, patch_size=p)
    h, w = ip.smart_resize(int(frame_hw[0]), int(frame_hw[1]), p * m, ip.MIN_PIXELS, max_pixels)
    return h // p, w // p


def vl3_example(cfg, wl: Workload, sample_id: str = "synthetic", seed: int = 0):
    """One VRVL3 sample (`vl3_batch.Example`) of the workload, chunk-aligned when the config asks."""
    from data_pipeline.vl3 import image_processing as ip
    from data_pipeline.vl3 import regions as reg
    from vrefer_jax import vl3_batch

    rng = np.random.default_rng(seed)
    T = wl.frames or 16
    m, Q, D = cfg.spatial_merge_size, cfg.region_token_num, cfg.vision.patch_dim
    gh, gw = vl3_frame_grid(cfg, T, wl.frame_hw)
    per_frame = gh * gw
    coords = [np.tile(ip.patch_coords(gh, gw, m), (T, 1))]
    segs = [np.repeat(np.arange(1, T + 1, dtype=np.int32), per_frame)]
    visual = ip.merge_groups(gh, gw, m)
    visual = np.concatenate([visual + t * per_frame for t in range(T)])
    n = T * per_frame
    side = math.isqrt(max(wl.region_cells - 1, 0)) + 1  # the mask's side in cells
    crop = side + 4  # 2 patches of margin on each side (reference §8.2)
    regions = []
    for r in range(wl.regions):
        grid = np.zeros((crop, crop), np.int32)
        grid[2:2 + side, 2:2 + side].flat[: wl.region_cells] = 1
        cells, weights = reg.region_cells(grid, (crop, crop), n)
        init = reg.kmeans_init(len(cells), Q, rng)
        regions.append((cells, weights, init))
        coords.append(ip.patch_coords(crop, crop, 1))
        segs.append(np.full(crop * crop, T + 1 + r, np.int32))
        n += crop * crop
    packed = reg.pack_regions(regions, Q) if regions else dict(
        region_cells=np.zeros((0, 0, 4), np.int32), region_weights=np.zeros((0, 0, 4), np.float32),
        region_num_cells=np.zeros(0, np.int32), region_init=np.zeros((0, Q), np.int32))
    rows = [min(Q, wl.region_cells)] * wl.regions
    V = len(visual)
    text = (wl.total_len - V - sum(rows)) if wl.total_len is not None else wl.text_len
    if text < 2 + 4 * wl.regions:
        raise ValueError(f"VRVL3: {text} text rows are too few for {wl.regions} regions (visual rows {V}, "
                         f"region rows {sum(rows)}{'' if wl.total_len is None else f', total {wl.total_len}'})")
    # layout: 2 text ids, the visual rows, then per region 4 text ids and its rows, then the rest
    first_special = min(cfg.image_token_id, cfg.region_token_id, cfg.pad_token_id)
    ids = _text_ids(rng, V + sum(rows) + text, first_special)
    vis_idx = np.full(len(ids), -1, np.int32)
    reg_idx = np.full(len(ids), -1, np.int32)
    ids[2:2 + V] = cfg.image_token_id
    vis_idx[2:2 + V] = np.arange(V)
    pos = 2 + V
    for r, k in enumerate(rows):
        pos += 4
        ids[pos:pos + k] = cfg.region_token_id
        reg_idx[pos:pos + k] = r * Q + np.arange(k)
        pos += k
    labels = None
    if wl.labels:
        labels = np.full(len(ids), IGNORE_INDEX, np.int32)
        tail = len(ids) - (len(ids) - pos) // 2
        labels[tail:] = ids[tail:]
    ex = vl3_batch.Example(
        sample_id=sample_id, input_ids=ids, visual_index=vis_idx, region_index=reg_idx,
        patches=rng.uniform(-1, 1, (n, D)).astype(np.float32), patch_segments=np.concatenate(segs),
        patch_coords=np.concatenate(coords).astype(np.int32), visual_patches=visual.astype(np.int32),
        labels=labels, meta=dict(frame_grid=(gh, gw), crop_grid=(crop, crop)), **packed)
    if cfg.vision_attention_chunk:
        ex = vl3_batch.chunk_example(ex, cfg.vision_attention_chunk)
    return ex


def _vl3(cfg, B: int, wl: Workload, abstract: bool, seed: int):
    from vrefer_jax import vl3_batch

    ex = vl3_example(cfg, wl, seed=seed)
    dims = ex.sizes()
    dims["C"] = max(dims["C"], 1)
    dims["R"] = max(dims["R"], 1)
    gh, gw = ex.meta["frame_grid"]
    T = wl.frames or 16
    sizes = dict(family="videorefer_videollama3", L=dims["L"], out_len=dims["L"], frames=T, frame_grid=(gh, gw),
                 tokens_per_frame=gh * gw // cfg.merge_group, visual_tokens=dims["V"], patches=dims["N"],
                 frame_patches=T * gh * gw, regions=wl.regions, cells=wl.region_cells,
                 crop_grid=ex.meta["crop_grid"], text=dims["L"] - dims["V"] - int((ex.region_index >= 0).sum()),
                 chunk=cfg.vision_attention_chunk)
    if abstract:
        shapes = vl3_batch.field_shapes(**dims, D=cfg.vision.patch_dim, W=cfg.merge_group, Q=cfg.region_token_num,
                                        B=B)
        if not wl.labels:
            shapes.pop("labels")
        return _abstract(shapes), dims["L"], sizes
    row = vl3_batch.pad_example(ex, **dims, Q=cfg.region_token_num, pad_token_id=cfg.pad_token_id,
                                with_labels=wl.labels)
    row.pop("sample_id")
    batch = {k: np.broadcast_to(v, (B,) + v.shape).copy() for k, v in row.items()}
    return batch, dims["L"], sizes


_BUILDERS = {"videorefer": _videorefer, "videorefer_videollama3": _vl3}
