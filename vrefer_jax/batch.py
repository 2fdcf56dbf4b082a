"""The batch contract: what a model batch holds, and the host-side code that builds and checks one.

Neutral ground below both the data pipeline and the models: this module imports nothing from
`vrefer_jax.models`, `data_pipeline`, `training` or `inference`; the loader, the predictor and the
model code all import the contract from here, so a batch is padded, stacked, measured and checked
in exactly one way.

Fields (static shapes; `FIELDS`):

  input_ids       [B, L] int32   text ids; -201/-200 where <video>/<image> stands, one
                                 `region_token_id` per referred object; right padding
  labels          [B, L] int32   -100 where not supervised (optional: inference has none)
  segment_ids     [B, L] int32   0 = padding; 1 (or 1, 2, ... for packed rows) = real
  frames          [B, T, S, S, 3] float  SigLIP-normalised sampled frames (an image repeated T times);
                  [B, P, T, S, S, 3]     in a packed batch: P video slots per row (see below)
  region_frames   [B, F, S, S, 3] float  the annotated frames (union over the sample's objects)
  object_frames   [B, K, M] int32        object k's frames in its own order, indices into F; -1 pad
  object_masks    [B, K, M, h, w] bool   its masks; resized to the vision grid on the device if
                                         (h, w) is not the grid already
  object_valid    [B, K] bool            which object slots are real

Packed rows (`packed_batch.pack_examples`; the loader's `LoaderConfig.pack`): several samples share a row of
static length, one after another, each its own segment (ids 1, 2, ... in row order, padding 0 at
the end). The decoder never attends across segments and positions restart at 0 in each one.
  * frames gains a slot axis P: slot p holds the video/image of the row's p-th `<video>`/`<image>`
    placeholder (row order; text-only samples take no slot; unused slots are zeros). The model runs
    the tower and the connector over all B*P slots and the splice gives the p-th placeholder of a
    row the tokens of slot p, so every video expands inside its own segment. An unpacked batch
    (rank-5 frames) is the case P = 1 and works unchanged.
  * region_frames / objects are concatenated in row order along F / K: `object_frames` indices are
    remapped into the row's F, and the k-th `<region>` of the row binds to the row's k-th object,
    which is the k-th object of its own sample once the samples before it are counted.
  * L, F, K (and the expanded length) are per-row budgets; M (frames per object) stays a per-object
    cap. Static shapes throughout: a packed batch only differs from an unpacked one by P.

Pooled packed batches (`packed_batch.pack_batch`; the loader's `LoaderConfig.pack_pool_rows`): the videos of a
batch sit in per-group pools instead of per-row slots, so the tower and the connector run on the
videos present, not on P slots per row (most of them empty when rows hold 1-3 samples).
  frames       [G, V, T, S, S, 3] float  G pool groups, V videos each; group g serves the B/G
                                         consecutive rows g*B/G ... (g+1)*B/G - 1 (B % G == 0)
  video_index  [B, P] int32              the pool entry (in the row's own group) of the row's p-th
                                         `<video>`/`<image>`; -1 = none (valid entries first)
  G is a multiple of the data-parallel shard count, so a group's pool and its rows land on the
  same device (the batch axis of every field is split over the same mesh axes); V is a static
  budget (about B/G x the mean videos per row, in gin), unused entries are zeros. The slot layout
  above is the pool with G = B, V = P and video_index[b] = 0, 1, ...; an unpacked batch is G = B,
  V = P = 1.

* `Example`: one sample before padding; `pad_example` pads it to given sizes and `stack` makes the
  batch (the loader pads to its caps, the predictor to its buckets, `empty_batch` builds init /
  benchmark batches from `field_shapes`).
* `expanded_length`: the worst-case LLM input length after <video>/<image> and <region> expansion,
  the single count behind the loader's "expanded_len" cap, the predictor's `out_len` and
  `check_batch`.
* `num_video_tokens`: tokens the connector emits for T frames, a pure function of the config.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vrefer_jax.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX, VIDEO_TOKEN_INDEX, ConnectorConfig, ModelConfig

# name -> (dimensions, dtype, padding value). Dimension letters: B batch, L text ids, T frames,
# S image size, F region frames, K objects, M frames per object, G mask size. A packed batch puts
# a video-slot axis P after B in `frames` (`PACKED_FRAMES`).
FIELDS: dict[str, tuple[tuple[str, ...], Any, Any]] = {
    "input_ids": (("B", "L"), np.int32, None),  # padded with the model's pad id
    "labels": (("B", "L"), np.int32, IGNORE_INDEX),
    "segment_ids": (("B", "L"), np.int32, 0),
    "frames": (("B", "T", "S", "S", 3), np.float32, 0.0),
    "region_frames": (("B", "F", "S", "S", 3), np.float32, 0.0),
    "object_frames": (("B", "K", "M"), np.int32, -1),
    "object_masks": (("B", "K", "M", "G", "G"), np.bool_, False),
    "object_valid": (("B", "K"), np.bool_, False),
}
# A pooled packed batch adds `video_index` and puts frames in G pools of V (`POOL_FRAMES`).
VIDEO_INDEX = "video_index"
VIDEO_INDEX_FIELD = (("B", "P"), np.int32, -1)
BATCH_KEYS = tuple(FIELDS)
OPTIONAL_KEYS = (VIDEO_INDEX,)  # fields only some batches hold (pooled packed batches)
PACKED_FRAMES = ("B", "P", "T", "S", "S", 3)
POOL_FRAMES = ("G", "V", "T", "S", "S", 3)


def video_slots(frames_shape: Sequence[int]) -> int:
    """P, the video slots per row of a batch's `frames`: 1 for [B, T, S, S, 3], P for [B, P, T, S, S, 3]."""
    return int(frames_shape[1]) if len(frames_shape) == 6 else 1


# ----------------------------------------------------------------------------- video token count


STC_TYPES = ("stc_connector_v35", "stc_connector", "stp_connector")
BROKEN_TYPES = ("spatial_conv", "spatial_pool")
_MLP_RE = re.compile(r"^mlp(\d+)x_gelu$")


def projector_kind(projector_type: str) -> tuple[str, int]:
    """`projector_type` -> ("stc", 0) | ("linear", 1) | ("mlp", N); raises ValueError otherwise."""
    if projector_type in STC_TYPES:
        return "stc", 0
    if projector_type == "linear":
        return "linear", 1
    if m := _MLP_RE.match(projector_type):
        n = int(m.group(1))
        if n < 1:
            raise ValueError(f"{projector_type!r}: an MLP needs at least one layer")
        return "mlp", n
    if projector_type in BROKEN_TYPES:
        raise ValueError(
            f"projector_type {projector_type!r} is broken in the official VideoRefer code: its depth-0 "
            "stages are nn.Identity, so they cannot change the vision width (e.g. 1152) into the LLM "
            "width (e.g. 3584) the sampler expects; use 'stc_connector_v35', 'stc_connector', "
            "'stp_connector', 'linear' or 'mlp2x_gelu'")
    raise ValueError(f"unknown projector_type {projector_type!r}; choose from {', '.join(STC_TYPES)}, "
                     "linear, mlp{N}x_gelu")


def sampler_padding(projector_type: str) -> int:
    return 1 if projector_type == "stc_connector" else 0


def sampled_shape(cfg: ConnectorConfig, num_frames: int, grid: int) -> tuple[int, int, int]:
    """(T', h', w') after the STC sampler: floor((n + 2*pad - k) / k) + 1 per dim (k = stride)."""
    pad = sampler_padding(cfg.projector_type)
    out = tuple((n + 2 * pad - k) // k + 1 for n, k in zip((num_frames, grid, grid), cfg.downsample))
    if min(out) <= 0:
        raise ValueError(f"{cfg.projector_type} with downsample {cfg.downsample} needs at least "
                         f"{cfg.downsample} (frames, rows, cols); got ({num_frames}, {grid}, {grid})")
    return out  # type: ignore[return-value]


def num_video_tokens(cfg: ConnectorConfig, num_frames: int, grid: int) -> int:
    """Tokens the connector emits for `num_frames` frames of a `grid` x `grid` patch map.

    stc_connector_v35 at g=27: T=16 -> 1352, 8 -> 676, 4 -> 338, 3 -> 169.
    """
    kind, _ = projector_kind(cfg.projector_type)
    if kind != "stc":
        return grid * grid
    t, h, w = sampled_shape(cfg, num_frames, grid)
    return t * h * w


def model_video_tokens(cfg: ModelConfig, num_frames: int | None = None) -> int:
    """`num_video_tokens` for a model config (T defaults to `cfg.num_frames`)."""
    return num_video_tokens(cfg.connector, num_frames or cfg.num_frames, cfg.vision.grid)


# ----------------------------------------------------------------------------- expanded length


def expanded_length(input_ids: Sequence[int] | np.ndarray, object_frame_counts: Sequence[int], *,
                    region_token_id: int | None, num_video_tokens: int, region_token_num: int) -> int:
    """Upper bound of a sample's LLM input length after expansion.

    input_ids: the real (unpadded) ids; object_frame_counts: masks per object. Each <video>/<image>
    placeholder becomes `num_video_tokens` rows, each <region> id is replaced by its object's tokens
    (at most min(frames, region_token_num) after the temporal merge); `region_token_id` None = a
    vocabulary without <region>.
    """
    ids = np.asarray(input_ids)
    n_visual = int(((ids == IMAGE_TOKEN_INDEX) | (ids == VIDEO_TOKEN_INDEX)).sum())
    n_region = int((ids == region_token_id).sum()) if region_token_id is not None else 0
    objects = sum(min(int(n), region_token_num) for n in object_frame_counts)
    return len(ids) + n_visual * (num_video_tokens - 1) - n_region + objects


# ----------------------------------------------------------------------------- padding and stacking


@dataclasses.dataclass
class Example:
    """One sample on the host before padding (model-ready values, unpadded sizes)."""

    sample_id: str
    input_ids: Sequence[int]
    frames: np.ndarray  # [T, S, S, 3] float32, SigLIP-normalised
    region_frames: np.ndarray  # [F, S, S, 3] float32
    object_frames: list[list[int]]  # per object: indices into region_frames
    object_masks: list[np.ndarray]  # per object: [M_k, G, G] bool
    labels: Sequence[int] | None = None  # None: no `labels` field (inference)

    def sizes(self) -> dict[str, int]:
        """The sizes `pad_example` needs at least: L, F, K, M."""
        return dict(seq_len=len(self.input_ids), region_frames=int(self.region_frames.shape[0]),
                    objects=len(self.object_frames),
                    object_frames=max((len(f) for f in self.object_frames), default=0))


def pad_example(ex: Example, *, seq_len: int, region_frames: int, objects: int, object_frames: int,
                mask_size: int, pad_token_id: int) -> dict[str, Any]:
    """An `Example` -> the contract fields without the batch dimension (+ `sample_id`), padded to
    the given sizes. Sizes smaller than the example's raise ValueError naming the sample: caps are
    checked (and skips counted) before this, so nothing is ever truncated here."""
    need = ex.sizes()
    have = dict(seq_len=seq_len, region_frames=region_frames, objects=objects, object_frames=object_frames)
    for k, n in need.items():
        if n > have[k]:
            raise ValueError(f"sample {ex.sample_id}: {k} needs {n} but the padded size is {have[k]}")
    n = len(ex.input_ids)
    T, S = ex.frames.shape[0], ex.frames.shape[1]
    out = _empty(dict(L=seq_len, T=T, S=S, F=region_frames, K=objects, M=object_frames, G=mask_size), pad_token_id,
                 skip=("frames",) if ex.labels is not None else ("frames", "labels"))
    out["input_ids"][:n] = ex.input_ids
    if ex.labels is not None:
        out["labels"][:n] = ex.labels
    out["segment_ids"][:n] = 1
    out["frames"] = np.asarray(ex.frames, np.float32)  # never padded: no copy
    out["region_frames"][: ex.region_frames.shape[0]] = ex.region_frames
    for k, (fr, m) in enumerate(zip(ex.object_frames, ex.object_masks)):
        out["object_frames"][k, : len(fr)] = fr
        out["object_masks"][k, : len(fr)] = m
        out["object_valid"][k] = True
    out = {k: out[k] for k in FIELDS if k in out}  # contract order
    out["sample_id"] = ex.sample_id
    return out


def num_placeholders(input_ids: Sequence[int] | np.ndarray) -> int:
    """<video>/<image> placeholders in a sample's ids (0 for text-only, 1 otherwise)."""
    ids = np.asarray(input_ids)
    return int(((ids == IMAGE_TOKEN_INDEX) | (ids == VIDEO_TOKEN_INDEX)).sum())


def pool_groups(batch: Mapping[str, Any]) -> tuple[int, int] | None:
    """(G, rows per group) of a pooled packed batch, None for an unpacked or slot batch."""
    if VIDEO_INDEX not in batch:
        return None
    G, B = int(np.shape(batch["frames"])[0]), int(np.shape(batch[VIDEO_INDEX])[0])
    if len(np.shape(batch["frames"])) != 6 or B % G:
        raise ValueError(f"a pooled batch needs frames [G, V, T, S, S, 3] with B % G == 0; got frames "
                         f"{tuple(np.shape(batch['frames']))} for {B} rows")
    return G, B // G


def stack(examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Padded examples -> a batch; their `sample_id`s become a str array `sample_ids`."""
    out = {k: np.stack([x[k] for x in examples]) for k in examples[0] if k != "sample_id"}
    out["sample_ids"] = np.array([x["sample_id"] for x in examples])
    return out


def _empty(dims: Mapping[str, int], pad_token_id: int, skip: Sequence[str] = ()) -> dict[str, np.ndarray]:
    out = {}
    for k, (shape, dtype) in field_shapes(**dims).items():
        if k in skip:
            continue
        fill = pad_token_id if k == "input_ids" else FIELDS[k][2]
        out[k] = np.full(shape, fill, dtype)
    return out


def field_shapes(*, L: int, T: int, S: int, F: int, K: int, M: int, G: int, B: int | None = None,
                 P: int | None = None) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{field: (shape, dtype)} for the given sizes; B None = one example (no batch dimension);
    P None = the unpacked layout, else packed frames [B, P, T, S, S, 3] (`PACKED_FRAMES`)."""
    dims = dict(B=B, L=L, T=T, S=S, F=F, K=K, M=M, G=G, P=P)
    specs = {k: (PACKED_FRAMES if k == "frames" and P is not None else shape, dtype)
             for k, (shape, dtype, _) in FIELDS.items()}
    return {k: (tuple(d if isinstance(d, int) else dims[d] for d in shape if not (d == "B" and B is None)), dtype)
            for k, (shape, dtype) in specs.items()}


def empty_batch(*, B: int, L: int, T: int, S: int, F: int, K: int, M: int, G: int,
                pad_token_id: int = 0, P: int | None = None) -> dict[str, np.ndarray]:
    """An all-padding batch (segment 0, objects invalid, frames -1): the base of `dummy_batch`.
    P: packed layout with P video slots per row (None: unpacked)."""
    return _empty(dict(B=B, L=L, T=T, S=S, F=F, K=K, M=M, G=G, P=P), pad_token_id)


# ----------------------------------------------------------------------------- host-side checks


class BatchError(ValueError):
    """A sample whose text and objects do not fit together; the message names the sample."""


def check_batch(
    input_ids: np.ndarray,
    segment_ids: np.ndarray,
    object_frames: np.ndarray,
    object_valid: np.ndarray,
    *,
    region_token_id: int,
    num_video_tokens: int,
    region_token_num: int,
    out_len: int,
    num_region_frames: int,
    sample_ids: Sequence[str] | None = None,
    num_videos: int = 1,
    video_index: np.ndarray | None = None,
    pool: tuple[int, int] | None = None,
) -> None:
    """Validate a batch before it reaches the device; raise `BatchError` naming the sample.

    Checked per row: real tokens first, each segment one contiguous run (a packed row's samples one
    after another); one visual placeholder at most per segment and at most `num_videos` (P, the
    video slots) per row; every `<region>` after its own segment's placeholder; as many `<region>`
    ids as valid objects (the k-th `<region>` binds to the k-th object, so a mismatch would silently
    shift every later object); each valid object has >= 1 frame, frame indices a valid prefix
    inside the region frames; and the worst-case expanded length of the row (`expanded_length`,
    additive over its segments) fits `out_len`. Messages name the row's sample ids (a packed row's
    `sample_id` joins its samples' ids) and, in a packed row, the segment.
    A pooled batch (`video_index` [B, P], `pool` = (V videos per group, rows per group)): each row
    has one valid entry per placeholder (valid entries first), each inside [0, V), and no pool
    entry serves two placeholders of its group.
    """
    input_ids, segment_ids = np.asarray(input_ids), np.asarray(segment_ids)
    object_frames, object_valid = np.asarray(object_frames), np.asarray(object_valid)
    for b in range(input_ids.shape[0]):
        name = sample_ids[b] if sample_ids is not None else f"#{b}"
        real = segment_ids[b] > 0
        ids, segs = input_ids[b][real], segment_ids[b][real]
        if real.any() and not real[: real.sum()].all():
            raise BatchError(f"sample {name}: padding must come after the real tokens (segment_ids)")
        starts = np.flatnonzero(np.r_[True, segs[1:] != segs[:-1]]) if len(segs) else np.zeros(0, int)
        run_ids = segs[starts]
        if len(set(run_ids.tolist())) != len(run_ids):
            raise BatchError(f"sample {name}: a segment is split into several runs (segment_ids {run_ids.tolist()})")
        n_obj = int(object_valid[b].sum())
        if not object_valid[b][:n_obj].all():
            raise BatchError(f"sample {name}: object slots must be filled from the first (object_valid)")
        is_visual = (ids == IMAGE_TOKEN_INDEX) | (ids == VIDEO_TOKEN_INDEX)
        regions = np.flatnonzero(ids == region_token_id)
        packed = len(run_ids) > 1
        for a, e, sid in zip(starts, np.r_[starts[1:], len(segs)], run_ids):
            where = f"sample {name}" + (f" (segment {sid})" if packed else "")
            visual = np.flatnonzero(is_visual[a:e])
            if len(visual) > 1:
                raise BatchError(f"{where}: {len(visual)} <video>/<image> placeholders; one per sample is supported")
            seg_regions = np.flatnonzero(ids[a:e] == region_token_id)
            if len(seg_regions) and (not len(visual) or seg_regions[0] < visual[0]):
                raise BatchError(f"{where}: every <region> must come after the <video>/<image> placeholder")
        n_visual = int(is_visual.sum())
        if n_visual > num_videos:
            raise BatchError(f"sample {name}: {n_visual} <video>/<image> placeholders but {num_videos} video "
                             "slot(s) per row")
        if video_index is not None:
            _check_pool_row(name, np.asarray(video_index[b]), n_visual, pool[0])
        if len(regions) != n_obj:
            raise BatchError(f"sample {name}: {len(regions)} <region> tokens in the text but {n_obj} objects with masks")
        counts = []
        for k in range(n_obj):
            fr = object_frames[b, k]
            n = int((fr >= 0).sum())
            if n == 0:
                raise BatchError(f"sample {name}: object {k} has no annotated frame (object_frames)")
            if not (fr[:n] >= 0).all() or (fr[:n] >= num_region_frames).any():
                raise BatchError(f"sample {name}: object {k} frame indices {fr[:n].tolist()} are not a valid "
                                 f"prefix inside {num_region_frames} region frames (object_frames)")
            counts.append(n)
        worst = expanded_length(ids, counts, region_token_id=region_token_id, num_video_tokens=num_video_tokens,
                                region_token_num=region_token_num)
        if worst > out_len:
            raise BatchError(f"sample {name}: expanded length up to {worst} exceeds the static length {out_len}")
    if video_index is not None:
        V, rows = pool
        index = np.asarray(video_index)
        for g in range(index.shape[0] // rows):
            used = index[g * rows:(g + 1) * rows]
            used = used[used >= 0]
            if len(np.unique(used)) != len(used):
                names = [sample_ids[b] if sample_ids is not None else f"#{b}" for b in range(g * rows, (g + 1) * rows)]
                raise BatchError(f"video pool {g} (rows {', '.join(names)}): an entry serves two placeholders "
                                 f"(video_index {index[g * rows:(g + 1) * rows].tolist()})")


def _check_pool_row(name: str, index: np.ndarray, n_visual: int, V: int) -> None:
    n = int((index >= 0).sum())
    if n != n_visual or not (index[:n] >= 0).all():
        raise BatchError(f"sample {name}: {n_visual} <video>/<image> placeholders but video_index "
                         f"{index.tolist()} (one valid entry per placeholder, valid entries first)")
    if (index[:n] >= V).any():
        raise BatchError(f"sample {name}: video_index {index.tolist()} outside the pool of {V} videos")


def validate(cfg: ModelConfig, batch: Mapping[str, Any], out_len: int, sample_ids: Sequence[str] | None = None) -> None:
    """`check_batch` of a contract batch (unpacked, packed in slots or pooled) against a `ModelConfig` (raises
    `BatchError` naming the sample)."""
    frames_shape = np.shape(batch["frames"])
    groups = pool_groups(batch)
    index = batch.get(VIDEO_INDEX)
    check_batch(
        batch["input_ids"], batch["segment_ids"], batch["object_frames"], batch["object_valid"],
        region_token_id=cfg.region_token_id,
        num_video_tokens=model_video_tokens(cfg, frames_shape[-4]),
        region_token_num=cfg.object_encoder.region_token_num,
        out_len=out_len, num_region_frames=batch["region_frames"].shape[1], sample_ids=sample_ids,
        num_videos=video_slots(frames_shape) if index is None else int(np.shape(index)[1]),
        video_index=None if index is None else np.asarray(index),
        pool=None if groups is None else (int(frames_shape[1]), groups[1]))
