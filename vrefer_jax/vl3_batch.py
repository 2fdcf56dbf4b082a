"""The VRVL3 batch contract: what a VideoRefer-VideoLLaMA3 batch holds, and its host-side checks.

Unlike VideoRefer-7B, every length is known on the host (§10 of the VRVL3 reference): the processor
emits final `input_ids` with exact `<image>` / `<REGION>` counts (pruned tokens already dropped), and
gather indices that say which patches make each visual token and which crop cells make each region.
The device runs the encoder over the packed patches and only fills rows. Like `vrefer_jax.batch`,
this module is neutral ground: nothing from models, data_pipeline, training or inference.

Fields (static shapes; `FIELDS`; dimension letters in brackets):

  input_ids        [B, L] int32    final ids: `image_token_id` on every visual row, `region_token_id`
                                   on every region row; right padding with the pad id
  labels           [B, L] int32    -100 where not supervised (optional: inference has none)
  segment_ids      [B, L] int32    0 = padding; 1 (1, 2, ... for packed rows) = real
  visual_index     [B, L] int32    -1, or the visual token (index into `visual_patches`) for that row
  region_index     [B, L] int32    -1, or r * Q + j: token j of region r for that row
  patches          [B, N, D] float normalised pixel patches ((C, py, px) order, D = C*p*p) of every
                                   frame, image and region crop of the sample, packed
  patch_segments   [B, N] int32    0 = padding; one id (1, 2, ...) per image / frame / crop: the
                                   encoder attends only within a segment
  patch_coords     [B, N, 2] int32 (row, col) of the patch in its image: the 2D RoPE positions
  visual_patches   [B, V, W] int32 patches averaged into visual token v (W = merge**2; an image at
                                   stride 1 uses one entry); -1 pads
  region_cells     [B, R, C, 4] int32   per mask-grid cell of region r, the <= 4 crop patches whose
                                   bilinear blend is the cell's feature (crop grid == mask grid: one);
                                   -1 pads
  region_weights   [B, R, C, 4] float32 the blend weights
  region_num_cells [B, R] int32    cells of region r (0 = empty slot); tokens = min(Q, cells)
  region_init      [B, R, Q] int32 k-means initial centroids as cell indices (a permutation prefix;
                                   used only when cells > Q)

`Example` holds one sample unpadded; `pad_example` pads it, `vrefer_jax.batch.stack` stacks.

Packed rows (`pack_examples`; the loader's `LoaderConfig.pack`): the rows are final on the host, so
packing is concatenation with index remapping and the shapes do not change: samples one after
another in L (segment ids 1, 2, ...; the decoder never attends across them, positions restart per
segment), their patches one after another in N (patch segments renumbered so every image / frame /
crop of the row keeps its own id), visual tokens in V and regions in R, with `visual_index`,
`region_index`, `visual_patches` and `region_cells` shifted by the samples before. L, N, V and R are
budgets of the whole row; C bounds each region.
With `VL3Config.vision_attention_chunk` P > 0 the encoder attends within aligned blocks of P patches:
`chunk_example` moves each image / frame / crop so that none crosses a block boundary (and remaps
the patch indices), `check_chunks` is the host check.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vrefer_jax.batch import BatchError, stack  # noqa: F401  (re-exported: one stacker, one error type)
from vrefer_jax.config import IGNORE_INDEX

FIELDS: dict[str, tuple[tuple[Any, ...], Any, Any]] = {
    "input_ids": (("B", "L"), np.int32, None),  # padded with the model's pad id
    "labels": (("B", "L"), np.int32, IGNORE_INDEX),
    "segment_ids": (("B", "L"), np.int32, 0),
    "visual_index": (("B", "L"), np.int32, -1),
    "region_index": (("B", "L"), np.int32, -1),
    "patches": (("B", "N", "D"), np.float32, 0.0),
    "patch_segments": (("B", "N"), np.int32, 0),
    "patch_coords": (("B", "N", 2), np.int32, 0),
    "visual_patches": (("B", "V", "W"), np.int32, -1),
    "region_cells": (("B", "R", "C", 4), np.int32, -1),
    "region_weights": (("B", "R", "C", 4), np.float32, 0.0),
    "region_num_cells": (("B", "R"), np.int32, 0),
    "region_init": (("B", "R", "Q"), np.int32, 0),
}
BATCH_KEYS = tuple(FIELDS)
# The sizes a padded batch is built to (the predictor's buckets, the loader's caps).
SIZE_KEYS = ("L", "N", "V", "R", "C")


@dataclasses.dataclass
class Example:
    """One VRVL3 sample on the host, unpadded. Arrays as in `FIELDS` without B and padding."""

    sample_id: str
    input_ids: np.ndarray  # [L]
    visual_index: np.ndarray  # [L]
    region_index: np.ndarray  # [L]
    patches: np.ndarray  # [N, D] float32
    patch_segments: np.ndarray  # [N]
    patch_coords: np.ndarray  # [N, 2]
    visual_patches: np.ndarray  # [V, W]
    region_cells: np.ndarray  # [R, C, 4]
    region_weights: np.ndarray  # [R, C, 4]
    region_num_cells: np.ndarray  # [R]
    region_init: np.ndarray  # [R, Q]
    labels: np.ndarray | None = None  # [L]; None: inference
    meta: dict = dataclasses.field(default_factory=dict)  # host-only facts (frame times, token counts)

    def sizes(self) -> dict[str, int]:
        """The padded sizes this example needs at least (L, N, V, R, C)."""
        return dict(L=len(self.input_ids), N=len(self.patches), V=len(self.visual_patches),
                    R=len(self.region_num_cells), C=int(self.region_cells.shape[1]) if len(self.region_cells) else 0)


def field_shapes(*, L: int, N: int, V: int, R: int, C: int, D: int, W: int, Q: int, B: int | None = None
                 ) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{field: (shape, dtype)} for the given sizes; B None = one example (no batch dimension)."""
    dims = dict(B=B, L=L, N=N, V=V, R=R, C=C, D=D, W=W, Q=Q)
    return {k: (tuple(d if isinstance(d, int) else dims[d] for d in shape if not (d == "B" and B is None)), dtype)
            for k, (shape, dtype, _) in FIELDS.items()}


def empty_batch(*, pad_token_id: int = 0, **dims: int) -> dict[str, np.ndarray]:
    """An all-padding batch (sizes as `field_shapes`, B included)."""
    return {k: np.full(shape, pad_token_id if k == "input_ids" else FIELDS[k][2], dtype)
            for k, (shape, dtype) in field_shapes(**dims).items()}


def pad_example(ex: Example, *, L: int, N: int, V: int, R: int, C: int, Q: int, pad_token_id: int,
                with_labels: bool | None = None) -> dict[str, Any]:
    """An `Example` -> the contract fields without the batch dimension (+ `sample_id`), padded to the
    given sizes. A size smaller than the example's raises ValueError naming the sample (caps are
    checked, and skips counted, before this; nothing is truncated here)."""
    have = dict(L=L, N=N, V=V, R=R, C=C)
    for k, n in ex.sizes().items():
        if n > have[k]:
            raise ValueError(f"sample {ex.sample_id}: {k} needs {n} but the padded size is {have[k]}")
    if ex.region_init.size and ex.region_init.shape[1] != Q:
        raise ValueError(f"sample {ex.sample_id}: region_init has {ex.region_init.shape[1]} entries per region, "
                         f"the model takes {Q}")
    D, W = ex.patches.shape[1], ex.visual_patches.shape[1] if ex.visual_patches.ndim == 2 else 1
    labels = ex.labels is not None if with_labels is None else with_labels
    out = {k: v for k, v in empty_batch(pad_token_id=pad_token_id, L=L, N=N, V=V, R=R, C=C, D=D, W=W, Q=Q,
                                        B=None).items() if labels or k != "labels"}
    n = len(ex.input_ids)
    out["input_ids"][:n] = ex.input_ids
    if labels:
        out["labels"][:n] = IGNORE_INDEX if ex.labels is None else ex.labels
    lengths = ex.meta.get("segments") or [n]  # a packed row: one segment per sample (`pack_examples`)
    out["segment_ids"][:n] = np.repeat(np.arange(1, len(lengths) + 1, dtype=np.int32), lengths)
    out["visual_index"][:n] = ex.visual_index
    out["region_index"][:n] = ex.region_index
    for k in ("patches", "patch_segments", "patch_coords", "visual_patches"):
        v = np.asarray(getattr(ex, k))
        out[k][tuple(slice(0, s) for s in v.shape)] = v
    r = len(ex.region_num_cells)
    if r:
        c = ex.region_cells.shape[1]
        out["region_cells"][:r, :c] = ex.region_cells
        out["region_weights"][:r, :c] = ex.region_weights
        out["region_num_cells"][:r] = ex.region_num_cells
        out["region_init"][:r] = ex.region_init
    out["sample_id"] = ex.sample_id
    return out


PACK_SEPARATOR = "+"  # a packed row's `sample_id`: its samples' ids joined in row order


def pack_examples(examples: Sequence[Example], *, Q: int) -> Example:
    """Several samples -> one unpadded `Example` holding them as consecutive segments (module
    docstring, "Packed rows"); pad it with `pad_example` to the row's sizes. `segments` of the result
    (in `meta["segments"]`) is each sample's text length, in order, for `pad_example` to number them."""
    if not examples:
        raise ValueError("pack_examples needs at least one example")
    with_labels = examples[0].labels is not None
    if any((ex.labels is not None) != with_labels for ex in examples):
        raise ValueError("packed row: some samples have labels and some do not")
    C = max((ex.region_cells.shape[1] for ex in examples if len(ex.region_cells)), default=1)
    W = max((ex.visual_patches.shape[1] for ex in examples if ex.visual_patches.ndim == 2), default=1)
    parts: dict[str, list] = {k: [] for k in ("input_ids", "labels", "visual_index", "region_index", "patches",
                                              "patch_segments", "patch_coords", "visual_patches", "region_cells",
                                              "region_weights", "region_num_cells", "region_init")}
    n0 = v0 = r0 = s0 = 0
    for ex in examples:
        shift = lambda a, d: np.where(np.asarray(a) >= 0, np.asarray(a) + d, np.asarray(a))  # noqa: E731
        parts["input_ids"].append(np.asarray(ex.input_ids))
        if with_labels:
            parts["labels"].append(np.asarray(ex.labels))
        parts["visual_index"].append(shift(ex.visual_index, v0))
        parts["region_index"].append(shift(ex.region_index, r0 * Q))
        psegs = np.asarray(ex.patch_segments)
        parts["patches"].append(np.asarray(ex.patches))
        parts["patch_segments"].append(np.where(psegs > 0, psegs + s0, 0))
        parts["patch_coords"].append(np.asarray(ex.patch_coords))
        vp = np.asarray(ex.visual_patches)
        vp = vp.reshape(len(vp), vp.shape[1] if vp.ndim == 2 else 1)
        parts["visual_patches"].append(np.pad(shift(vp, n0), ((0, 0), (0, W - vp.shape[1])), constant_values=-1))
        r = len(ex.region_num_cells)
        cells = np.asarray(ex.region_cells)
        cells = cells.reshape(r, cells.shape[1] if cells.ndim == 3 else 0, 4)
        c = C - cells.shape[1]
        parts["region_cells"].append(np.pad(shift(cells, n0), ((0, 0), (0, c), (0, 0)), constant_values=-1))
        parts["region_weights"].append(np.pad(np.asarray(ex.region_weights, np.float32).reshape(cells.shape),
                                              ((0, 0), (0, c), (0, 0))))
        parts["region_num_cells"].append(np.asarray(ex.region_num_cells))
        parts["region_init"].append(np.asarray(ex.region_init).reshape(r, Q) if r else np.zeros((0, Q), np.int32))
        n0, v0, r0 = n0 + len(psegs), v0 + len(vp), r0 + r
        s0 += int(psegs.max(initial=0))
    cat = {k: np.concatenate(v) if v else None for k, v in parts.items()}
    return Example(
        sample_id=PACK_SEPARATOR.join(ex.sample_id for ex in examples),
        input_ids=cat["input_ids"], visual_index=cat["visual_index"], region_index=cat["region_index"],
        patches=cat["patches"], patch_segments=cat["patch_segments"], patch_coords=cat["patch_coords"],
        visual_patches=cat["visual_patches"], region_cells=cat["region_cells"],
        region_weights=cat["region_weights"], region_num_cells=cat["region_num_cells"],
        region_init=cat["region_init"], labels=cat["labels"] if with_labels else None,
        meta={"segments": [len(ex.input_ids) for ex in examples]})


def chunk_example(ex: Example, chunk: int) -> Example:
    """`ex` with its patches laid out for block attention of `chunk` patches: each segment (one
    image / frame / crop, contiguous in `patches`) starts a new block when it would not fit in what
    is left of the current one; the gaps and the tail up to a multiple of `chunk` are padding
    patches (segment 0). `visual_patches` and `region_cells` follow their patches. Frames of
    exactly `chunk` patches therefore fill one block each. Raises ValueError naming the sample if a
    segment is longer than `chunk` or not contiguous."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    segs = np.asarray(ex.patch_segments)
    n = len(segs)
    starts = np.flatnonzero(np.r_[True, segs[1:] != segs[:-1]]) if n else np.zeros(0, int)
    ends = np.r_[starts[1:], n]
    ids = segs[starts]
    if len(set(ids[ids > 0].tolist())) != int((ids > 0).sum()):
        raise ValueError(f"sample {ex.sample_id}: a patch segment is not contiguous in patches")
    new_index = np.full(n, -1, np.int64)
    pos = 0
    for a, e, sid in zip(starts, ends, ids):
        if sid == 0:
            continue  # padding patches are dropped
        length = e - a
        if length > chunk:
            raise ValueError(f"sample {ex.sample_id}: segment {sid} has {length} patches, more than "
                             f"vision_attention_chunk {chunk}")
        if pos % chunk + length > chunk:
            pos += chunk - pos % chunk
        new_index[a:e] = np.arange(pos, pos + length)
        pos += length
    total = -(-pos // chunk) * chunk
    keep = new_index >= 0
    patches = np.zeros((total,) + ex.patches.shape[1:], ex.patches.dtype)
    patch_segments = np.zeros(total, segs.dtype)
    patch_coords = np.zeros((total, 2), np.asarray(ex.patch_coords).dtype)
    patches[new_index[keep]] = ex.patches[keep]
    patch_segments[new_index[keep]] = segs[keep]
    patch_coords[new_index[keep]] = np.asarray(ex.patch_coords)[keep]

    def remap(idx):
        idx = np.asarray(idx)
        return np.where(idx >= 0, new_index[np.clip(idx, 0, max(n - 1, 0))], idx).astype(idx.dtype)

    return dataclasses.replace(ex, patches=patches, patch_segments=patch_segments, patch_coords=patch_coords,
                               visual_patches=remap(ex.visual_patches), region_cells=remap(ex.region_cells))


def check_chunks(patch_segments: Any, chunk: int, sample_ids: Sequence[str] | None = None) -> None:
    """Raise `BatchError` unless N is a multiple of `chunk` and every segment of every row lies in
    one aligned block of `chunk` patches (what block attention needs to equal the dense one)."""
    segs = np.asarray(patch_segments)
    if segs.shape[1] % chunk:
        raise BatchError(f"patch_segments: N = {segs.shape[1]} is not a multiple of vision_attention_chunk {chunk}")
    block = np.arange(segs.shape[1]) // chunk
    for b in range(segs.shape[0]):
        real = segs[b] > 0
        if not real.any():
            continue
        m = int(segs[b].max()) + 1
        lo, hi = np.full(m, segs.shape[1]), np.full(m, -1)
        np.minimum.at(lo, segs[b][real], block[real])
        np.maximum.at(hi, segs[b][real], block[real])
        bad = np.flatnonzero((hi >= 0) & (lo != hi))
        if len(bad):
            name = sample_ids[b] if sample_ids is not None else f"#{b}"
            raise BatchError(f"sample {name}: patch segment {bad[0]} crosses a block of vision_attention_chunk "
                             f"{chunk} patches (lay the sample out with vl3_batch.chunk_example)")


# ----------------------------------------------------------------------------- host-side checks


def check_batch(batch: Mapping[str, Any], *, image_token_id: int, region_token_id: int, region_token_num: int,
                sample_ids: Sequence[str] | None = None) -> None:
    """Validate a VRVL3 batch before it reaches the device; raise `BatchError` naming the sample.

    Per row: padding after the real tokens; `<image>` rows are exactly the rows with a visual index,
    each real visual token used exactly once and made of real patches; `<REGION>` rows are exactly
    the rows with a region index, and region r's rows are its tokens 0 .. min(Q, cells) - 1 in order,
    so no region's tokens can shift onto another's rows; cells point at real patches."""
    ids, segs = np.asarray(batch["input_ids"]), np.asarray(batch["segment_ids"])
    vis, reg = np.asarray(batch["visual_index"]), np.asarray(batch["region_index"])
    vp, psegs = np.asarray(batch["visual_patches"]), np.asarray(batch["patch_segments"])
    cells, ncell = np.asarray(batch["region_cells"]), np.asarray(batch["region_num_cells"])
    init = np.asarray(batch["region_init"])
    Q = region_token_num
    for b in range(ids.shape[0]):
        name = sample_ids[b] if sample_ids is not None else f"#{b}"
        real = segs[b] > 0
        if real.any() and not real[: real.sum()].all():
            raise BatchError(f"sample {name}: padding must come after the real tokens (segment_ids)")
        is_img, is_reg = (ids[b] == image_token_id) & real, (ids[b] == region_token_id) & real
        if ((vis[b] >= 0) != is_img).any():
            raise BatchError(f"sample {name}: <image> rows and visual_index disagree")
        if ((reg[b] >= 0) != is_reg).any():
            raise BatchError(f"sample {name}: <REGION> rows and region_index disagree")
        real_patch = psegs[b] > 0
        used = vis[b][is_img]
        live = np.flatnonzero((vp[b] >= 0).any(-1))
        if sorted(used.tolist()) != live.tolist():
            raise BatchError(f"sample {name}: {len(used)} <image> rows for {len(live)} visual tokens "
                             "(each visual token must fill exactly one row)")
        for v in live:
            p = vp[b, v][vp[b, v] >= 0]
            if (p >= len(real_patch)).any() or not real_patch[p].all():
                raise BatchError(f"sample {name}: visual token {v} points at padding patches")
        rows = reg[b][is_reg]
        want = [r * Q + j for r in range(ncell.shape[1]) for j in range(min(Q, int(ncell[b, r])))]
        if rows.tolist() != want:
            raise BatchError(f"sample {name}: <REGION> rows {len(rows)} do not match the regions' tokens "
                             f"{len(want)} in order (region_index vs region_num_cells)")
        for r in np.flatnonzero(ncell[b] > 0):
            c = cells[b, r, : ncell[b, r]]
            if not (c >= 0).any(-1).all():
                raise BatchError(f"sample {name}: region {r} has a cell with no patch")
            p = c[c >= 0]
            if (p >= len(real_patch)).any() or not real_patch[p].all():
                raise BatchError(f"sample {name}: region {r} points at padding patches")
            if ncell[b, r] > Q:
                k = init[b, r]
                if len(set(k.tolist())) != Q or (k < 0).any() or (k >= ncell[b, r]).any():
                    raise BatchError(f"sample {name}: region {r} k-means init must be {Q} distinct cells")
