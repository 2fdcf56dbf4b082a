"""The VRVL3 training loader: JSON / JSONL sample files + media -> static-shape VRVL3 batches
(the contract of `vrefer_jax.vl3_batch`), on Grain.

Pipeline per sample file (one, or several mixed with weights):

    entries (VideoRefer-700K format) -> MapDataset.source -> shuffle(seed + i) -> repeat(num_epochs)
    -> [shard::num_shards] -> mix(weights) -> map(VL3SampleTransform) -> to_iter_dataset
    -> length-grouped batches (skips dropped and counted) -> mp_prefetch(worker_count)

* The per-sample transform is THE host entry point, `data_pipeline.vl3.preprocess.preprocess(...,
  training=True)` (fps frame sampling with a `max_frames` cap, masks, crops, prompt and labels), then
  `vl3_batch.pad_example` to the fixed sizes from gin (`LoaderConfig.seq_len` = L, `max_patches` N,
  `max_visual_tokens` V, `max_regions` R, `max_region_cells` C). It runs in Grain's read threads /
  worker processes. A malformed sample raises `schema.SampleError` naming it and the field (strict:
  nothing is silently replaced, unlike the official loader).
* Caps never truncate: a sample over one (`loader.VL3_CAPS`: input_ids, patches, visual_tokens,
  regions, region_cells) raises `CapExceededError` ("error") or is dropped, counted by cap name and
  logged ("skip"); `LoaderIterator.skipped` holds the totals (also in its state).
* Length grouping (`length_group_window` W > 1): the next W x B kept examples are sorted by their
  text length L (stable, ties in arrival order), cut into W batches of B, and the W batches emitted
  in an order drawn from (seed, window index): rows of a batch have similar lengths (less padding
  work to tell the model nothing), the order over windows stays random. Deterministic: same seed,
  same batches.
* Packing (`LoaderConfig.pack`, `data_pipeline.packing`): rows are final on the host, so packing
  is concatenation with remapped indices (`vl3_batch.pack_examples`): first-fit decreasing on the
  text length within windows of `pack_window` samples, under the row budgets L (`seq_len`), N
  (`max_patches`), V (`max_visual_tokens`) and R (`max_regions`); C stays a per-region cap. It
  replaces length grouping (packing sorts by length itself). Same resumable state.
* Resumable: `LoaderIterator.get_state()` is the pipeline state at the current window's start plus
  the number of its batches already emitted; `set_state` rebuilds that window (the transform is a
  pure function of the sample: k-means starts are seeded by the sample id) and continues after the
  emitted batches, so a restored run sees exactly the batches the original would have.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from data_pipeline import inputs as inputs_lib
from data_pipeline import loader as loader_lib
from data_pipeline import packing as packing_lib
from data_pipeline import schema
from data_pipeline.loader import VL3_CAPS, CapExceededError, LoaderConfig, LoaderIterator, stack_examples
from data_pipeline.vl3 import preprocess as pre
from vrefer_jax import vl3_batch
from vrefer_jax.vl3_config import VL3Config

# cap name -> (`vl3_batch.Example.sizes()` key, LoaderConfig field)
_CAP_FIELDS = {"input_ids": ("L", "seq_len"), "patches": ("N", "max_patches"),
               "visual_tokens": ("V", "max_visual_tokens"), "regions": ("R", "max_regions"),
               "region_cells": ("C", "max_region_cells")}


def padded_sizes(cfg: LoaderConfig) -> dict[str, int]:
    """{L, N, V, R, C}: the static sizes every batch is padded to. Raises naming an unset field."""
    out = {}
    for cap, (key, field) in _CAP_FIELDS.items():
        v = getattr(cfg, field)
        if v is None or v < (0 if key in ("R", "C") else 1):
            raise ValueError(f"VRVL3 loader: LoaderConfig.{field} ({key}, cap {cap!r}) must be bound to a static "
                             f"size, got {v}")
        out[key] = int(v)
    out["R"], out["C"] = max(out["R"], 1), max(out["C"], 1)  # an empty region slot keeps the shapes
    return out


def host_config(cfg: LoaderConfig) -> pre.VL3HostConfig:
    """The preprocessing options of training: fps / max_frames from the loader config; the crop
    budget is not divided by the number of masks (the official training's `num_images=1`)."""
    return pre.VL3HostConfig(fps=cfg.fps, max_frames=cfg.max_frames, divide_crop_budget=False)


_PACK_BUDGET = ("L", "N", "V", "R")  # additive over a row's samples; C bounds each region


def packed_batches(parent: grain.IterDataset, cfg: LoaderConfig, model_cfg: VL3Config) -> grain.IterDataset:
    """VRVL3 packed batches over the transform's unpadded examples (`data_pipeline.packing`)."""
    sizes = padded_sizes(cfg)
    Q = model_cfg.region_token_num

    def build_row(examples):
        row = vl3_batch.pack_examples(examples, Q=Q)
        return vl3_batch.pad_example(row, **sizes, Q=Q, pad_token_id=model_cfg.pad_token_id, with_labels=True)

    return packing_lib.PackedBatches(
        parent, batch_size=cfg.batch_size, window=cfg.pack_window, budget={k: sizes[k] for k in _PACK_BUDGET},
        key="L", build_row=build_row, finish=stack_examples, caps=VL3_CAPS, seed=cfg.seed,
        drop_remainder=cfg.drop_remainder)


class VL3SampleTransform:
    """(file index, sample index, raw entry) -> one padded example (+ `_len`, its text length) or a
    skip marker `{"_skip": cap}`. Picklable (the tokenizer must be), so it runs in Grain workers."""

    def __init__(self, cfg: LoaderConfig, model_cfg: VL3Config, tokenizer, media_roots: Sequence[str]):
        self.cfg, self.model_cfg, self.tokenizer = cfg, model_cfg, tokenizer
        self.media_roots = list(media_roots)
        self.sizes = padded_sizes(cfg)
        self.host = host_config(cfg)
        self._skip_logged: dict[str, int] = {}

    def __call__(self, item) -> dict[str, Any]:
        src, index, raw = item
        sample = schema.parse_sample(raw, index, allow_text_only=True)
        ex = pre.preprocess(sample, self.media_roots[src], self.model_cfg, self.tokenizer, self.host, training=True)
        need = ex.sizes()
        for cap, (key, _) in _CAP_FIELDS.items():
            if need[key] > self.sizes[key]:
                if self.cfg.policy(cap) == "error":
                    raise CapExceededError(ex.sample_id, cap, need[key], self.sizes[key])
                n = self._skip_logged[cap] = self._skip_logged.get(cap, 0) + 1
                log = loader_lib.log.warning if n <= loader_lib.SKIP_LOG_LIMIT else loader_lib.log.debug
                log("skipping sample %s: %s needs %d > cap %d", ex.sample_id, cap, need[key], self.sizes[key])
                return {"_skip": cap}
        if self.cfg.pack:  # unpadded: the packer concatenates samples into rows
            return {packing_lib.PACK_KEY: {k: need[k] for k in _PACK_BUDGET}, "_item": ex}
        out = vl3_batch.pad_example(ex, **self.sizes, Q=self.model_cfg.region_token_num,
                                    pad_token_id=self.model_cfg.pad_token_id, with_labels=True)
        out["_len"] = need["L"]
        return out


# ----------------------------------------------------------------------------- length-grouped batches


class _GroupedBatches(grain.IterDataset):
    """Batches of `batch_size` kept examples, length-grouped within windows of `window` batches
    (see the module docstring); each batch carries `num_skipped` (counts by cap of the markers
    dropped while its window filled: on the window's first batch). A finite stream ends with its
    last window's remainder (kept unless `drop_remainder`) or a counts-only batch."""

    def __init__(self, parent: grain.IterDataset, batch_size: int, window: int, seed: int, drop_remainder: bool):
        super().__init__(parent)
        self._args = (batch_size, max(window, 1), seed, drop_remainder)

    def __iter__(self):
        return _GroupedBatchesIterator(self._parent.__iter__(), *self._args)


class _GroupedBatchesIterator(packing_lib.WindowedIterator):
    def __init__(self, parent: grain.DatasetIterator, batch_size: int, window: int, seed: int, drop_remainder: bool):
        super().__init__(parent)
        self._B, self._W, self._seed, self._drop = batch_size, window, seed, drop_remainder

    def _fill(self) -> None:
        self._start = self._parent.get_state()
        xs, counts = [], np.zeros((len(VL3_CAPS),), np.int64)
        while len(xs) < self._B * self._W:
            try:
                x = next(self._parent)
            except StopIteration:
                break
            if "_skip" in x:
                counts[VL3_CAPS.index(x["_skip"])] += 1
            else:
                xs.append(x)
        w, self._window = self._window, self._window + 1
        if self._W > 1:  # stable: equal lengths keep their arrival order
            xs = [xs[i] for i in np.argsort([x["_len"] for x in xs], kind="stable")]
        groups = [xs[i:i + self._B] for i in range(0, len(xs), self._B)]
        if groups and len(groups[-1]) < self._B and self._drop:
            groups.pop()
        if self._W > 1 and len(groups) > 1:
            order = np.random.default_rng(np.random.SeedSequence([self._seed, w])).permutation(len(groups))
            groups = [groups[i] for i in order]
        batches = []
        for j, g in enumerate(groups):
            batches.append(stack_examples([{k: v for k, v in x.items() if k != "_len"} for x in g],
                                          counts if j == 0 else np.zeros_like(counts)))
        if not batches and counts.any():
            batches = [{"num_skipped": counts}]
        self._batches, self._k = batches, 0

    def __next__(self):
        if self._k >= len(self._batches):
            self._fill()
            if not self._batches:
                raise StopIteration
        b = self._batches[self._k]
        self._k += 1
        return b


# ----------------------------------------------------------------------------- pipeline


def _entries(path: str) -> list:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VRVL3 loader: no sample file {path}")
    return inputs_lib.load_entries(path)


def make_dataset(sources: str | Sequence[str], cfg: LoaderConfig, tokenizer, model_cfg: VL3Config,
                 weights: Sequence[float] | None = None) -> grain.IterDataset:
    """The batched `grain.IterDataset` (module docstring). sources: JSON / JSONL sample files (a
    mixture with `weights`); media paths resolve under `cfg.media_root`, or each file's folder."""
    paths = [sources] if isinstance(sources, str) else list(sources)
    if not paths:
        raise ValueError("VRVL3 loader: no sample files")
    if weights is not None and len(weights) != len(paths):
        raise ValueError(f"{len(weights)} weights for {len(paths)} sample files")
    shard = loader_lib._shard(cfg)
    comps = []
    for i, p in enumerate(paths):
        items = [(i, j, e) for j, e in enumerate(_entries(p))]
        if not items:
            raise ValueError(f"VRVL3 loader: {p} holds no samples")
        comps.append(loader_lib._component(items, cfg, cfg.seed + i, shard))
    roots = [cfg.media_root or os.path.dirname(os.path.abspath(p)) for p in paths]
    ds = comps[0] if len(comps) == 1 else grain.MapDataset.mix(comps, weights)
    ds = ds.map(VL3SampleTransform(cfg, model_cfg, tokenizer, roots))
    read = grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.read_buffer_size)
    if cfg.pack:
        it = packed_batches(ds.to_iter_dataset(read), cfg, model_cfg)
    else:
        it = _GroupedBatches(ds.to_iter_dataset(read), cfg.batch_size, cfg.length_group_window, cfg.seed,
                             cfg.drop_remainder)
    if cfg.worker_count > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count,
                                                         per_worker_buffer_size=cfg.worker_buffer_size))
    return it


def make_loader(sources, cfg: LoaderConfig, tokenizer, model_cfg: VL3Config,
                weights: Sequence[float] | None = None) -> LoaderIterator:
    """An iterator of host-local VRVL3 batches (+ `sample_ids`), skip totals in `.skipped`."""
    if cfg.worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain reads an absl flag when it starts workers
            flags.FLAGS.mark_as_parsed()
    return LoaderIterator(iter(make_dataset(sources, cfg, tokenizer, model_cfg, weights)), caps=VL3_CAPS)


def loader_config(model_cfg: VL3Config, **kw) -> LoaderConfig:
    """`LoaderConfig` for a VRVL3 model: the pad id from the model; `max_expanded_len` (the
    trainer's `out_len`), when given, must equal `seq_len` (VRVL3 rows are final on the host)."""
    out_len = kw.pop("max_expanded_len", None)
    for k in ("num_video_tokens", "region_tokens_per_object"):
        kw.pop(k, None)
    kw.setdefault("pad_token_id", model_cfg.pad_token_id)
    cfg = LoaderConfig(**kw)
    if out_len is not None and out_len != cfg.seq_len:
        raise ValueError(f"VRVL3: StepConfig.out_len {out_len} must equal LoaderConfig.seq_len {cfg.seq_len} "
                         "(the batch's rows are the model's input rows)")
    return cfg
