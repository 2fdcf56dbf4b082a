"""Grain loader: record shards -> static-shape training batches (the batch contract of
`vrefer_jax.models.videorefer`).

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
* `LoaderIterator.get_state()/set_state()` resume exactly; it is a `grain.DatasetIterator`, so
  `grain.checkpoint.CheckpointSave/CheckpointRestore` store it in an Orbax checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from data_pipeline import records as records_lib
from data_pipeline import video as video_lib
from vrefer_jax.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX, VIDEO_TOKEN_INDEX
from vrefer_jax.models.mask_ops import bilinear_weights
from vrefer_jax.text.multimodal import build_training_example

log = logging.getLogger(__name__)

# cap names = policy keys; append new ones (the order indexes the skip-count vectors)
CAPS = ("input_ids", "region_frames", "objects", "object_frames", "expanded_len")
_MODAL_TOKEN = {"video": "<video>", "image": "<image>", "text": None}


def _siglip_lut() -> np.ndarray:
    """uint8 -> float32 exactly as SiglipImageProcessor: rescale in float64, cast, (x - .5) / .5 in fp32."""
    x = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    return (x - np.float32(0.5)) / np.float32(0.5)


SIGLIP_LUT = _siglip_lut()


def siglip_normalize(img: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 [..., 3] -> float32 in [-1, 1], bit-identical to `SIGLIP_LUT[img]` (checked for all 256
    values in the tests: fp32 x / 255 rounds like HF's fp64 rescale here) and ~3x faster."""
    out = np.empty(img.shape, np.float32) if out is None else out
    np.divide(img, np.float32(255), out=out, dtype=np.float32)
    out -= np.float32(0.5)
    out *= np.float32(2)
    return out


def _support(in_len: int, out_len: int) -> np.ndarray:
    """[out_len, 2] input indices with non-zero bilinear weight (a repeated index where only one)."""
    w = bilinear_weights(in_len, out_len) > 0
    first = np.argmax(w, axis=1)
    last = in_len - 1 - np.argmax(w[:, ::-1], axis=1)
    return np.stack([first, last], axis=1)


def grid_masks(m: np.ndarray, g: int) -> np.ndarray:
    """bool [..., H, W] -> bool [..., g, g], exactly `resize_masks_np(m, g, g) > 0`.

    The bilinear weights are non-negative and each output cell has at most 2x2 input pixels of
    non-zero weight, so the resized value is > 0 iff one of those pixels is set (a sum of positive
    fp32 terms never rounds to 0): a gather of 2 rows and 2 columns per cell instead of two dense
    matmuls over the full-resolution mask (~50x faster at 720x1280).
    """
    h, w = m.shape[-2:]
    rows, cols = _support(h, g), _support(w, g)
    r = m[..., rows, :].any(axis=-2)  # [..., g, W]
    return r[..., cols].any(axis=-1)  # [..., g, g]


class CapExceededError(ValueError):
    """A sample exceeds a static-shape cap under the "error" policy."""

    def __init__(self, sample_id: str, field: str, size: int, cap: int):
        super().__init__(f"sample {sample_id}: {field} needs {size} but the cap is {cap}")
        self.sample_id, self.field, self.size, self.cap = sample_id, field, size, cap


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """Static shapes and pipeline options.

    seq_len L (text tokens before expansion), num_frames T, image_size S, grid g (vision grid),
    max_region_frames F, max_objects K, max_object_frames M.
    overflow: "error" | "skip", or {cap name: policy} for the names in `CAPS`
      ("input_ids", "region_frames", "objects", "object_frames", "expanded_len"); missing names
      default to "error".
    max_expanded_len: None = off; else the cap "expanded_len" on the sequence after <video>/<image>
      and <region> expansion (the model's static `out_len`), checked with the same upper bound as
      `videorefer.validate`: len(ids) + P (num_video_tokens - 1) + sum_k min(region_tokens_per_object,
      M_k) - R for P placeholders, R <region> tokens, M_k masks of object k. Needs num_video_tokens
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

    def policy(self, cap: str) -> str:
        p = self.overflow if isinstance(self.overflow, str) else self.overflow.get(cap, "error")
        if p not in ("error", "skip"):
            raise ValueError(f"overflow policy for {cap} must be 'error' or 'skip', got {p!r}")
        return p

    def __post_init__(self):
        if not isinstance(self.overflow, str):
            unknown = set(self.overflow) - set(CAPS)
            if unknown:
                raise ValueError(f"unknown caps in overflow: {sorted(unknown)}; expected {CAPS}")
        for cap in CAPS:
            self.policy(cap)
        if self.aspect not in ("square", "pad"):
            raise ValueError(f"aspect must be 'square' or 'pad', got {self.aspect!r}")
        if self.max_expanded_len is not None and None in (self.num_video_tokens, self.region_tokens_per_object):
            raise ValueError("max_expanded_len needs num_video_tokens and region_tokens_per_object "
                             "(LoaderConfig.for_model fills them from the model config)")

    @classmethod
    def for_model(cls, model_cfg, **kw) -> LoaderConfig:
        """Take T, S, g, the pad id, the aspect mode (`image_aspect_ratio`), the video token count
        (for T) and region_token_num from a `vrefer_jax.config.ModelConfig`."""
        from vrefer_jax.models.connector import num_video_tokens  # lazy: the model code is not needed otherwise

        kw.setdefault("num_frames", model_cfg.num_frames)
        kw.setdefault("image_size", model_cfg.vision.image_size)
        kw.setdefault("grid", model_cfg.vision.grid)
        kw.setdefault("pad_token_id", model_cfg.pad_token_id)
        kw.setdefault("aspect", model_cfg.image_aspect_ratio)  # a 'pad' checkpoint pads frames and masks
        kw.setdefault("num_video_tokens",
                      num_video_tokens(model_cfg.connector, kw["num_frames"], model_cfg.vision.grid))
        kw.setdefault("region_tokens_per_object", model_cfg.object_encoder.region_token_num)
        return cls(**kw)


# ----------------------------------------------------------------------------- one sample


def pad_mask_to_square(m: np.ndarray) -> np.ndarray:
    """[..., H, W] -> [..., s, s] zero padded like `expand2square` (offset (long - short) // 2)."""
    h, w = m.shape[-2:]
    if h == w:
        return m
    s = max(h, w)
    out = np.zeros(m.shape[:-2] + (s, s), m.dtype)
    top, left = (s - h) // 2, (s - w) // 2
    out[..., top:top + h, left:left + w] = m
    return out


SKIP_LOG_LIMIT = 20  # warnings per cap and process before skips are logged at debug level


class SampleTransform:
    """`Record` -> one unbatched example (contract shapes without B) or a skip marker.

    Picklable (the tokenizer must be), so it runs in Grain worker processes.
    """

    def __init__(self, cfg: LoaderConfig, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self._skip_logged: dict[str, int] = {}  # per process: warnings written per cap

    def _frames(self, rec: records_lib.Record, encoded) -> np.ndarray:
        c = self.cfg
        out = np.empty((len(encoded), c.image_size, c.image_size, 3), np.float32)
        for i, b in enumerate(encoded):
            img = video_lib.decode_image(b)
            if img.shape[:2] != (c.image_size, c.image_size):
                if rec.stored_size not in (0, img.shape[0]):
                    raise ValueError(f"sample {rec.sample_id}: stored frame {img.shape[:2]} != stored_size {rec.stored_size}")
                # Converter-stored frames of another size: the converter's resize (from the stored
                # frame: exact only for size-0 records, which keep the original resolution).
                img = video_lib.resize_frame(img, c.image_size, c.aspect if rec.stored_size == 0 else "square")
            siglip_normalize(img, out[i])
        return out

    def _masks(self, obj: records_lib.ObjectMasks) -> np.ndarray:
        m = obj.decode()  # [M, H, W] bool at original resolution
        if self.cfg.aspect == "pad":
            m = pad_mask_to_square(m)
        return grid_masks(m, self.cfg.grid)

    def expanded_len(self, ids: Sequence[int], rec: records_lib.Record) -> int:
        """Upper bound of the sequence length after placeholder expansion (as `videorefer.validate`)."""
        c = self.cfg
        a = np.asarray(ids)
        placeholders = int(((a == IMAGE_TOKEN_INDEX) | (a == VIDEO_TOKEN_INDEX)).sum())
        try:
            regions = int((a == self.tokenizer.region_id).sum())
        except KeyError:  # a vocabulary without <region>: no region tokens
            regions = 0
        objects = sum(min(c.region_tokens_per_object, len(o.frames)) for o in rec.objects)
        return len(ids) + placeholders * (c.num_video_tokens - 1) + objects - regions

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

        L, S, T = c.seq_len, c.image_size, c.num_frames
        n = len(ids)
        input_ids = np.full((L,), c.pad_token_id, np.int32)
        input_ids[:n] = ids
        lab = np.full((L,), IGNORE_INDEX, np.int32)
        lab[:n] = labels
        seg = np.zeros((L,), np.int32)
        seg[:n] = 1

        frames = np.zeros((T, S, S, 3), np.float32)
        if rec.modality == "video":
            if len(rec.frames) != T:
                raise ValueError(f"sample {sid}: record has {len(rec.frames)} sampled frames, the loader wants "
                                 f"{T} (convert with num_frames={T})")
            frames[:] = self._frames(rec, rec.frames)
        elif rec.modality == "image":
            frames[:] = self._frames(rec, rec.frames[:1])  # the image repeated T times
        region = np.zeros((c.max_region_frames, S, S, 3), np.float32)
        if F:
            region[:F] = self._frames(rec, rec.region_frames)

        g = c.grid
        obj_frames = np.full((c.max_objects, c.max_object_frames), -1, np.int32)
        obj_masks = np.zeros((c.max_objects, c.max_object_frames, g, g), bool)
        obj_valid = np.zeros((c.max_objects,), bool)
        for k, obj in enumerate(rec.objects):
            m = len(obj.frames)
            obj_frames[k, :m] = obj.region_index
            obj_masks[k, :m] = self._masks(obj)
            obj_valid[k] = True
        return dict(input_ids=input_ids, labels=lab, segment_ids=seg, frames=frames, region_frames=region,
                    object_frames=obj_frames, object_masks=obj_masks, object_valid=obj_valid,
                    sample_id=sid)


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
    out = {k: np.stack([x[k] for x in xs]) for k in xs[0] if k != "sample_id"}
    out["sample_ids"] = np.array([x["sample_id"] for x in xs])
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


def make_dataset(
    sources: records_lib.RecordReader | str | Sequence[Any],
    cfg: LoaderConfig,
    tokenizer,
    weights: Sequence[float] | None = None,
) -> grain.IterDataset:
    """The batched `grain.IterDataset` (see the module docstring).

    sources: one RecordReader (or a path/glob/dir), or a list of them for a mixture with `weights`
    (each component is shuffled with seed + its position and repeated per `cfg.num_epochs`; a
    mixture of finite components ends with its shortest one, so mixtures usually use num_epochs=None).
    Batches carry `num_skipped` [len(CAPS)]; a finite stream may end with counts-only batches
    `{"num_skipped": ...}` (one per worker at most), which `make_loader`'s iterator absorbs.
    """
    if isinstance(sources, (records_lib.RecordReader, str)):
        sources = [sources]
    readers = [s if isinstance(s, records_lib.RecordReader) else records_lib.RecordReader(s) for s in sources]
    if weights is not None and len(weights) != len(readers):
        raise ValueError(f"{len(weights)} weights for {len(readers)} record sets")
    shard = _shard(cfg)
    comps = [_component(r, cfg, cfg.seed + i, shard) for i, r in enumerate(readers)]
    ds = comps[0] if len(comps) == 1 else grain.MapDataset.mix(comps, weights)
    ds = ds.map(SampleTransform(cfg, tokenizer))
    read = grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.read_buffer_size)
    it = _BatchCountingSkips(ds.to_iter_dataset(read), cfg.batch_size, cfg.drop_remainder)
    if cfg.worker_count > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count,
                                                         per_worker_buffer_size=cfg.worker_buffer_size))
    return it


class LoaderIterator(grain.DatasetIterator):
    """Yields contract batches (+ `sample_ids`); keeps skip totals by cap in `skipped` (also in the
    state; complete once a finite stream has raised StopIteration). A `grain.DatasetIterator`, so
    `grain.checkpoint.CheckpointSave(it)` works with Orbax."""

    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self.skipped = {c: 0 for c in CAPS}

    def __next__(self) -> dict[str, Any]:
        while True:
            batch = next(self._parent)
            for cap, n in zip(CAPS, batch.pop("num_skipped").tolist()):
                self.skipped[cap] += int(n)
            if batch:  # else a counts-only batch: skips after the last examples of a worker's stream
                return batch

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": self._parent.get_state(), "skipped": dict(self.skipped)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._parent.set_state(state["pipeline"])
        self.skipped = {c: int(state.get("skipped", {}).get(c, 0)) for c in CAPS}

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


def to_global(batch: Mapping[str, Any], mesh, data_axes=("data",)) -> dict[str, Any]:
    """Host-local numpy batch -> global `jax.Array`s sharded over `data_axes` on the batch dim
    (`jax.make_array_from_process_local_data`); `sample_ids` stays on the host."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    out = {}
    for k, v in batch.items():
        if k == "sample_ids":
            out[k] = v
            continue
        spec = PartitionSpec(data_axes, *([None] * (np.ndim(v) - 1)))
        out[k] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), np.asarray(v))
    return out
