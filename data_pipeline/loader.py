"""Grain loader: record shards -> static-shape training batches (the batch contract of
`vrefer_jax.batch`).

Pipeline per record set (one set, or several for a stage mixture):

    RecordReader -> MapDataset.source -> shuffle(seed) -> repeat(num_epochs) -> [shard::num_shards]
    -> mix(weights) -> map(SampleTransform) -> to_iter_dataset -> batch (dropping & counting skipped)
    -> mp_prefetch(worker_count)

* Global shuffle: every process sees the same seeded permutation of the whole set (a new one each
  epoch) and takes every `num_shards`-th element of it, so processes read disjoint samples that
  together cover the set. A mixture shards each component before mixing, so every process keeps the
  mixture's proportions.
* Caps (L, F, K, M and, optionally, the expanded length) never truncate: a sample over a cap raises
  `CapExceededError` naming the sample and the field ("error") or is dropped, counted by field and
  logged ("skip"). Counts travel with the next batch; skips after the last batch of a finite stream
  (or before its dropped remainder) come in a final counts-only batch that `LoaderIterator` absorbs,
  so `LoaderIterator.skipped` is complete once the stream ends.
* Packing (`pack = True`, `data_pipeline.packing`): instead of one sample per row, the batcher
  packs several samples into each row (first-fit decreasing on the expanded length within windows
  of `pack_window` samples, each sample its own segment; `vrefer_jax.packed_batch.pack_examples`). The caps
  become row budgets: `seq_len` text ids, `max_expanded_len` expanded tokens, `pack_videos` video
  slots (P of packed frames [B, P, T, S, S, 3]), `max_region_frames` and `max_objects` per row
  (`max_object_frames` still per object). A sample over a cap on its own is still refused or
  skipped by the overflow policy. With `pack_pool_rows` > 0 the videos go into per-group pools
  instead of per-row slots (`vrefer_jax.packed_batch.pack_batch`: frames [G, V, T, S, S, 3] + video_index
  [B, P]; V = `pack_pool_videos` per group of `pack_pool_rows` rows, a group budget of the packer),
  so the tower runs on the videos present rather than on P slots per row.
* `LoaderIterator.get_state()/set_state()` resume exactly; it is a `grain.DatasetIterator`, so
  `grain.checkpoint.CheckpointSave/CheckpointRestore` store it in an Orbax checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import grain
import numpy as np

from data_pipeline import masks as masks_lib
from data_pipeline import packing as packing_lib
from data_pipeline import records as records_lib
from data_pipeline import video as video_lib
from vrefer_jax import batch as batch_lib
from vrefer_jax.text.multimodal import build_training_example

log = logging.getLogger(__name__)

# cap names = policy keys; append new ones (the order indexes the skip-count vectors)
CAPS = ("input_ids", "region_frames", "objects", "object_frames", "expanded_len")
# VRVL3's caps (`data_pipeline.vl3.loader`): text rows L, packed patches N, visual tokens V, regions
# R, cells per region C (the padded sizes of `vrefer_jax.vl3_batch`)
VL3_CAPS = ("input_ids", "patches", "visual_tokens", "regions", "region_cells")
_MODAL_TOKEN = {"video": "<video>", "image": "<image>", "text": None}


class CapExceededError(ValueError):
    """A sample exceeds a static-shape cap under the "error" policy."""

    def __init__(self, sample_id: str, field: str, size: int, cap: int):
        super().__init__(f"sample {sample_id}: {field} needs {size} but the cap is {cap}")
        self.sample_id, self.field, self.size, self.cap = sample_id, field, size, cap


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """Static shapes and pipeline options (gin-configurable: the trainer builds its train and eval
    loaders in the gin scopes `train/` and `eval/`; `for_model` fills what the model fixes).

    seq_len L (text tokens before expansion), num_frames T, image_size S, grid g (vision grid),
    max_region_frames F, max_objects K, max_object_frames M.
    overflow: "error" | "skip", or {cap name: policy} for the names in `CAPS`
      ("input_ids", "region_frames", "objects", "object_frames", "expanded_len"); missing names
      default to "error".
    max_expanded_len: None = off; else the cap "expanded_len" on the sequence after <video>/<image>
      and <region> expansion (the model's static `out_len`): `vrefer_jax.batch.expanded_length`,
      the bound `check_batch` uses: len(ids) + P (num_video_tokens - 1) + sum_k
      min(region_tokens_per_object, M_k) - R for P placeholders, R <region> tokens, M_k masks of
      object k. Needs num_video_tokens
      (for T frames) and region_tokens_per_object (`region_token_num`); `for_model` fills both.
    shard_index / num_shards: None = this JAX process of all (`jax.process_index/count`).
    num_epochs: None repeats forever. worker_count 0 = in-process. Keep read_threads x worker_count
      near the CPU count: the transform is CPU-bound (JPEG decode, normalisation) and each example
      holds (T + F) S^2 3 fp32 values (44 MB at T=16, F=9, S=384).
    """

    batch_size: int
    seq_len: int
    num_frames: int = 16
    image_size: int = 384
    grid: int = 27
    max_region_frames: int = 8
    max_objects: int = 4
    max_object_frames: int = 8
    aspect: str = "square"
    pad_token_id: int = 0
    overflow: str | Mapping[str, str] = "error"
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    shard_index: int | None = None
    num_shards: int | None = None
    worker_count: int = 0
    worker_buffer_size: int = 1
    read_threads: int = 1  # threads per process running the per-sample transform
    read_buffer_size: int = 4  # examples prefetched by those threads
    drop_remainder: bool = True
    max_expanded_len: int | None = None
    num_video_tokens: int | None = None
    region_tokens_per_object: int | None = None
    # VRVL3 (`data_pipeline.vl3.loader`; VideoRefer-7B ignores these). seq_len is L there: the final
    # rows with every visual / region token, which is also the model's `out_len`.
    max_patches: int | None = None  # N: packed pixel patches (frames + region crops)
    max_visual_tokens: int | None = None  # V: merged visual tokens after pruning
    max_regions: int | None = None  # R: regions (one per object and annotated frame)
    max_region_cells: int | None = None  # C: mask-grid cells per region
    fps: float | None = 1.0  # frame sampling (`VL3HostConfig.fps`); None = every frame
    max_frames: int = 768  # frame cap after fps sampling (`VL3HostConfig.max_frames`)
    media_root: str = ""  # media paths are relative to it; "" = each sample file's folder
    length_group_window: int = 0  # batches per length-grouping window; 0 = batches in sample order
    # Packing (module docstring): several samples per row, each its own segment. pack_window:
    # samples per first-fit-decreasing window (the window holds their decoded frames in memory).
    # pack_videos: video slots per row (VideoRefer-7B; P of packed frames), a row budget.
    # pack_pool_rows > 0 (VideoRefer-7B): videos in pools shared by groups of that many rows (the
    # rows one device holds, or a divisor of them: a pool never spans devices), pack_pool_videos
    # (V) entries each, instead of P slots per row; pack_videos then caps a row's videos (P of
    # video_index). 0 = per-row slots.
    pack: bool = False
    pack_window: int = 64
    pack_videos: int = 4
    pack_pool_rows: int = 0
    pack_pool_videos: int = 0

    def policy(self, cap: str) -> str:
        p = self.overflow if isinstance(self.overflow, str) else self.overflow.get(cap, "error")
        if p not in ("error", "skip"):
            raise ValueError(f"overflow policy for {cap} must be 'error' or 'skip', got {p!r}")
        return p

    def __post_init__(self):
        if not isinstance(self.overflow, str):
            unknown = set(self.overflow) - set(CAPS) - set(VL3_CAPS)
            if unknown:
                raise ValueError(f"unknown caps in overflow: {sorted(unknown)}; expected {CAPS} (VideoRefer-7B) "
                                 f"or {VL3_CAPS} (VRVL3)")
        for cap in CAPS:
            self.policy(cap)
        if self.aspect not in ("square", "pad"):
            raise ValueError(f"aspect must be 'square' or 'pad', got {self.aspect!r}")
        if self.pack and (self.pack_window < 1 or self.pack_videos < 1):
            raise ValueError(f"packing needs pack_window >= 1 and pack_videos >= 1, got {self.pack_window}, "
                             f"{self.pack_videos}")
        if self.pack and self.pack_pool_rows:
            if self.pack_pool_rows < 0 or self.batch_size % self.pack_pool_rows:
                raise ValueError(f"pack_pool_rows {self.pack_pool_rows} must divide batch_size {self.batch_size}")
            if self.pack_pool_videos < self.pack_pool_rows:
                raise ValueError(f"pack_pool_videos {self.pack_pool_videos} must be at least pack_pool_rows "
                                 f"{self.pack_pool_rows} (one video per row)")
        if self.max_expanded_len is not None and None in (self.num_video_tokens, self.region_tokens_per_object):
            raise ValueError("max_expanded_len needs num_video_tokens and region_tokens_per_object "
                             "(LoaderConfig.for_model fills them from the model config)")

    @classmethod
    def for_model(cls, model_cfg, **kw) -> LoaderConfig:
        """Take T, S, g, the pad id, the aspect mode (`image_aspect_ratio`), the video token count
        (for T) and region_token_num from a `vrefer_jax.config.ModelConfig`."""
        kw.setdefault("num_frames", model_cfg.num_frames)
        kw.setdefault("image_size", model_cfg.vision.image_size)
        kw.setdefault("grid", model_cfg.vision.grid)
        kw.setdefault("pad_token_id", model_cfg.pad_token_id)
        kw.setdefault("aspect", model_cfg.image_aspect_ratio)  # a 'pad' checkpoint pads frames and masks
        kw.setdefault("num_video_tokens",
                      batch_lib.model_video_tokens(model_cfg, kw["num_frames"]))
        kw.setdefault("region_tokens_per_object", model_cfg.object_encoder.region_token_num)
        return cls(**kw)


# ----------------------------------------------------------------------------- one sample


def to_example(sample_id: str, modality: str, frames: Sequence[np.ndarray], region_frames: Sequence[np.ndarray],
               objects: Sequence[tuple[Sequence[int], np.ndarray]], input_ids: Sequence[int],
               labels: Sequence[int] | None = None, *, num_frames: int, image_size: int, grid: int,
               aspect: str) -> batch_lib.Example:
    """The per-sample host transform shared by the loader and the predictor, so both give the model
    the same arrays: uint8 frames at `image_size` -> SigLIP-normalised float32 (an image repeated
    `num_frames` times, a text-only sample all zeros), and each object's full-resolution bool masks
    [M, H, W] -> the vision grid (`pad_mask_to_square` first in 'pad' mode, then `grid_masks`).

    objects: (indices into `region_frames`, masks) per object.
    """
    S, T = image_size, num_frames

    def normalise(imgs) -> np.ndarray:
        out = np.empty((len(imgs), S, S, 3), np.float32)
        for i, img in enumerate(imgs):
            if img.shape[:2] != (S, S):
                raise ValueError(f"sample {sample_id}: frame {i} is {img.shape[:2]}, expected {S}x{S}")
            video_lib.siglip_normalize(img, out[i])
        return out

    if modality == "video":
        if len(frames) != T:
            raise ValueError(f"sample {sample_id}: record has {len(frames)} sampled frames, the loader wants "
                             f"{T} (convert with num_frames={T})")
        x = normalise(frames)
    elif modality == "image":  # the image repeated T times (official)
        x = np.broadcast_to(normalise(frames[:1]), (T, S, S, 3))
    else:
        x = np.zeros((T, S, S, 3), np.float32)
    masks = []
    for _, m in objects:
        if aspect == "pad":
            m = masks_lib.pad_mask_to_square(m)
        masks.append(masks_lib.grid_masks(m, grid))
    return batch_lib.Example(sample_id, input_ids, x, normalise(region_frames),
                             [list(idx) for idx, _ in objects], masks, labels)


SKIP_LOG_LIMIT = 20  # warnings per cap and process before skips are logged at debug level


class SampleTransform:
    """`Record` -> one unbatched example (contract shapes without B) or a skip marker.

    Picklable (the tokenizer must be), so it runs in Grain worker processes.
    """

    def __init__(self, cfg: LoaderConfig, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self._skip_logged: dict[str, int] = {}  # per process: warnings written per cap

    def _frames(self, rec: records_lib.Record, encoded) -> list[np.ndarray]:
        """Stored frames -> uint8 [S, S, 3] each."""
        c = self.cfg
        out = []
        for b in encoded:
            img = video_lib.decode_image(b)
            if img.shape[:2] != (c.image_size, c.image_size):
                if rec.stored_size not in (0, img.shape[0]):
                    raise ValueError(f"sample {rec.sample_id}: stored frame {img.shape[:2]} != stored_size {rec.stored_size}")
                # Converter-stored frames of another size: the converter's resize (from the stored
                # frame: exact only for size-0 records, which keep the original resolution).
                img = video_lib.resize_frame(img, c.image_size, c.aspect if rec.stored_size == 0 else "square")
            out.append(img)
        return out

    def expanded_len(self, ids: Sequence[int], rec: records_lib.Record) -> int:
        """Upper bound of the sequence length after placeholder expansion (`batch.expanded_length`)."""
        try:
            region_id = self.tokenizer.region_id
        except KeyError:  # a vocabulary without <region>: no region tokens
            region_id = None
        return batch_lib.expanded_length(
            ids, [len(o.frames) for o in rec.objects], region_token_id=region_id,
            num_video_tokens=self.cfg.num_video_tokens, region_token_num=self.cfg.region_tokens_per_object)

    def __call__(self, rec: records_lib.Record) -> dict[str, Any]:
        c = self.cfg
        sid = rec.sample_id
        modal = _MODAL_TOKEN.get(rec.modality)
        if rec.modality not in _MODAL_TOKEN:
            raise ValueError(f"sample {sid}: unknown modality {rec.modality!r}")

        if rec.stored_size and rec.aspect and rec.aspect != c.aspect:
            raise ValueError(f"sample {sid}: frames were stored with aspect {rec.aspect!r}, the loader uses "
                             f"{c.aspect!r} (masks would not line up)")
        ids, labels = build_training_example(self.tokenizer, rec.conversations, modal)
        K, F = len(rec.objects), len(rec.region_frames)
        M = max((len(o.frames) for o in rec.objects), default=0)
        caps = [("input_ids", len(ids), c.seq_len), ("region_frames", F, c.max_region_frames),
                ("objects", K, c.max_objects), ("object_frames", M, c.max_object_frames)]
        if c.max_expanded_len is not None:
            caps.append(("expanded_len", self.expanded_len(ids, rec), c.max_expanded_len))
        for cap, size, limit in caps:
            if size > limit:
                if c.policy(cap) == "error":
                    raise CapExceededError(sid, cap, size, limit)
                self._skip_logged[cap] = self._skip_logged.get(cap, 0) + 1
                n_logged = self._skip_logged[cap]
                if n_logged <= SKIP_LOG_LIMIT:
                    log.warning("skipping sample %s: %s needs %d > cap %d%s", sid, cap, size, limit,
                                " (later skips of this cap are logged at debug level; the totals are in "
                                "the training metrics)" if n_logged == SKIP_LOG_LIMIT else "")
                else:
                    log.debug("skipping sample %s: %s needs %d > cap %d", sid, cap, size, limit)
                return {"_skip": cap}

        if c.pack and batch_lib.num_placeholders(ids) > c.pack_videos:
            raise CapExceededError(sid, "pack_videos", batch_lib.num_placeholders(ids), c.pack_videos)
        frames = self._frames(rec, rec.frames) if rec.modality in ("video", "image") else []
        ex = to_example(sid, rec.modality, frames, self._frames(rec, rec.region_frames),
                        [(o.region_index, o.decode()) for o in rec.objects], ids, labels,
                        num_frames=c.num_frames, image_size=c.image_size, grid=c.grid, aspect=c.aspect)
        if c.pack:  # unpadded: the packer concatenates samples into rows
            sizes = dict(L=len(ids), videos=batch_lib.num_placeholders(ids), F=F, K=K)
            if c.max_expanded_len is not None:
                sizes["expanded"] = self.expanded_len(ids, rec)
            return {packing_lib.PACK_KEY: sizes, "_item": ex}
        return batch_lib.pad_example(ex, seq_len=c.seq_len, region_frames=c.max_region_frames,
                                     objects=c.max_objects, object_frames=c.max_object_frames,
                                     mask_size=c.grid, pad_token_id=c.pad_token_id)


# ----------------------------------------------------------------------------- skip counting


class _BatchCountingSkips(grain.IterDataset):
    """Batches examples, dropping skip markers. Each batch carries `num_skipped`, the counts by cap of
    the markers dropped while it was filled. At the end of a finite stream, markers met after the
    last batch's examples (or before a dropped remainder) come as a counts-only batch
    `{"num_skipped": ...}`, so no count is lost; `LoaderIterator` absorbs it. No state beyond the
    parent's: between batches nothing is pending. (In Grain workers each runs on its slice, and
    every worker ends with its own counts-only batch.)"""

    def __init__(self, parent: grain.IterDataset, batch_size: int, drop_remainder: bool):
        super().__init__(parent)
        self._batch_size, self._drop_remainder = batch_size, drop_remainder

    def __iter__(self):
        return _BatchCountingSkipsIterator(self._parent.__iter__(), self._batch_size, self._drop_remainder)


class _BatchCountingSkipsIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, batch_size: int, drop_remainder: bool):
        super().__init__(parent)
        self._batch_size, self._drop_remainder = batch_size, drop_remainder

    def __next__(self):
        xs, counts = [], np.zeros((len(CAPS),), np.int64)
        while len(xs) < self._batch_size:
            try:
                x = next(self._parent)
            except StopIteration:
                if xs and not self._drop_remainder:
                    break
                if counts.any():
                    return {"num_skipped": counts}
                raise
            if "_skip" in x:
                counts[CAPS.index(x["_skip"])] += 1
            else:
                xs.append(x)
        return stack_examples(xs, counts)

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


def stack_examples(xs: Sequence[dict[str, Any]], num_skipped: np.ndarray | None = None) -> dict[str, Any]:
    """Examples -> batch; sample ids as a str array `sample_ids`, skip counts by cap as `num_skipped`."""
    out = batch_lib.stack(xs)
    out["num_skipped"] = np.zeros((len(CAPS),), np.int64) if num_skipped is None else num_skipped
    return out


# ----------------------------------------------------------------------------- pipeline


def _shard(cfg: LoaderConfig) -> tuple[int, int]:
    if cfg.num_shards is not None:
        idx, count = cfg.shard_index or 0, cfg.num_shards
    else:
        import jax

        idx, count = jax.process_index(), jax.process_count()
    if not 0 <= idx < count:
        raise ValueError(f"shard_index {idx} not in [0, {count})")
    return idx, count


def _component(reader, cfg: LoaderConfig, seed: int, shard: tuple[int, int]) -> grain.MapDataset:
    ds = grain.MapDataset.source(reader)
    if cfg.shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(cfg.num_epochs)
    idx, count = shard
    if cfg.num_epochs is not None:  # equal length on every process: drop the last len % count
        ds = ds[: len(ds) - len(ds) % count]
    return ds[idx::count]


TFDS_PREFIX = "tfds:"


def open_source(source: Any):
    """A loader source -> a random-access reader of `Record`s: a 'tfds:<data_dir>/<name>:<split>'
    spec -> `tfds_data.TfdsRecords` (TFDS imported only then); a path / glob / folder of TFRecord or
    ArrayRecord shards -> `records.RecordReader`; a reader is returned as it is."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    if str(source).startswith(TFDS_PREFIX):
        from data_pipeline.tfds_data import TfdsRecords

        return TfdsRecords(str(source))
    return records_lib.RecordReader(source)


def make_dataset(
    sources: records_lib.RecordReader | str | Sequence[Any],
    cfg: LoaderConfig,
    tokenizer,
    weights: Sequence[float] | None = None,
) -> grain.IterDataset:
    """The batched `grain.IterDataset` (see the module docstring).

    sources: one RecordReader (or a path/glob/dir of TFRecord / ArrayRecord shards, or a TFDS split
    `tfds:<data_dir>/<name>:<split>`, `tfds_data`), or a list of them for a mixture with `weights`
    (each component is shuffled with seed + its position and repeated per `cfg.num_epochs`; a
    mixture of finite components ends with its shortest one, so mixtures usually use num_epochs=None).
    Batches carry `num_skipped` [len(CAPS)]; a finite stream may end with counts-only batches
    `{"num_skipped": ...}` (one per worker at most), which `make_loader`'s iterator absorbs.
    """
    if not isinstance(sources, (list, tuple)):
        sources = [sources]
    readers = [open_source(s) for s in sources]
    if weights is not None and len(weights) != len(readers):
        raise ValueError(f"{len(weights)} weights for {len(readers)} record sets")
    shard = _shard(cfg)
    comps = [_component(r, cfg, cfg.seed + i, shard) for i, r in enumerate(readers)]
    ds = comps[0] if len(comps) == 1 else grain.MapDataset.mix(comps, weights)
    ds = ds.map(SampleTransform(cfg, tokenizer))
    read = grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.read_buffer_size)
    if cfg.pack:
        it = packing_lib.videorefer_batches(ds.to_iter_dataset(read), cfg, caps=CAPS, finish=stack_examples)
    else:
        it = _BatchCountingSkips(ds.to_iter_dataset(read), cfg.batch_size, cfg.drop_remainder)
    if cfg.worker_count > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count,
                                                         per_worker_buffer_size=cfg.worker_buffer_size))
    return it


class LoaderIterator(grain.DatasetIterator):
    """Yields contract batches (+ `sample_ids`); keeps skip totals by cap in `skipped` (also in the
    state; complete once a finite stream has raised StopIteration). A `grain.DatasetIterator`, so
    `grain.checkpoint.CheckpointSave(it)` works with Orbax."""

    def __init__(self, parent: grain.DatasetIterator, caps: Sequence[str] = CAPS):
        super().__init__(parent)
        self.caps = tuple(caps)  # the names the `num_skipped` vectors count, in order
        self.skipped = {c: 0 for c in self.caps}

    def __next__(self) -> dict[str, Any]:
        while True:
            batch = next(self._parent)
            for cap, n in zip(self.caps, batch.pop("num_skipped").tolist()):
                self.skipped[cap] += int(n)
            if batch:  # else a counts-only batch: skips after the last examples of a worker's stream
                return batch

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": self._parent.get_state(), "skipped": dict(self.skipped)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._parent.set_state(state["pipeline"])
        self.skipped = {c: int(state.get("skipped", {}).get(c, 0)) for c in self.caps}

    def close(self) -> None:
        close = getattr(self._parent, "close", None)
        if close is not None:
            close()


def make_loader(sources, cfg: LoaderConfig, tokenizer, weights: Sequence[float] | None = None) -> LoaderIterator:
    """An iterator of host-local batches (see `make_dataset`)."""
    if cfg.worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain reads an absl flag when it starts workers
            flags.FLAGS.mark_as_parsed()
    return LoaderIterator(iter(make_dataset(sources, cfg, tokenizer, weights)))
