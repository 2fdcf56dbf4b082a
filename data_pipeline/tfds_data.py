"""TFDS datasets of converted samples: ArrayRecord written without TensorFlow, read by Grain through
`tfds.data_source`.

Four builders, one per input format, each a `tfds.core.GeneratorBasedBuilder` over the converter's
own per-sample step (`convert.process_sample`: the schema checks, media decoding, mask checks and
`build_record`), so a sample is stored, or skipped for the same reason code, exactly as
`vrefer-data convert` would:

  videorefer_train       VideoRefer-700K-style training JSON / JSON Lines (`schema.parse_sample`)
  videorefer_bench_q     Bench-Q (`bench_formats.parse_bench_q`; `bench_mode` single | multi)
  videorefer_bench_d     Bench-D (`bench_formats.parse_bench_d`)
  videorefer_synthetic   the synthetic task's train / eval JSON (`vrefer-data synthetic`; official format)

Features: the record layout itself (`records.FEATURE_KINDS`), every field a raw list: int fields
`Tensor(shape=(None,), int64)`, bytes fields (PNG / raw / JPEG frames, RLE counts, JSON text)
`Sequence(Tensor(shape=(), object))`. TFDS's Image / Video features would need TensorFlow to
encode; these need only numpy. Record i of a split is the i-th stored sample in source order
(`disable_shuffling`), the same order as the converter's shards.

Skips: `<dataset folder>/<split>.report.json` holds `written`, `skipped` (counts by reason) and
`skips` (index, id, reason, field, message), as the converter's report.

Reading: a loader source `tfds:<data_dir>/<name>[/<version>]:<split>` (`open_source`), e.g.
`tfds:/data/tfds/videorefer_train:train`; `TfdsRecords` gives `Record`s by index, like
`records.RecordReader`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_pipeline import bench_formats, convert, inputs, schema
from data_pipeline.records import FEATURE_KINDS, Record
from vrefer_jax.json_files import write_json

PREFIX = "tfds:"  # = loader.TFDS_PREFIX (the loader does not import TFDS for other sources)
DATASET_VERSION = "1.0.0"


def features() -> tfds.features.FeaturesDict:
    """The TFDS `FeaturesDict` of one record (see the module docstring)."""
    f = tfds.features
    return f.FeaturesDict({
        name: (f.Tensor(shape=(None,), dtype=np.int64) if kind == "int"
               else f.Sequence(f.Tensor(shape=(), dtype=np.object_)))
        for name, kind in FEATURE_KINDS.items()})


def to_example(rec: Record) -> dict[str, Any]:
    """A `Record` -> the TFDS example dict (int lists as int64 arrays)."""
    return {k: (np.asarray(v, np.int64).reshape(-1) if FEATURE_KINDS[k] == "int" else list(v))
            for k, v in rec.to_features().items()}


def _parser(fmt: str, bench_mode: str, allow_text_only: bool):
    if fmt == "train":
        return functools.partial(schema.parse_sample, allow_text_only=allow_text_only)
    return functools.partial(bench_formats.PARSERS[fmt], mode=bench_mode)


class RecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Records of one input format (`FORMAT`: a `vrefer-data --format`) from local files."""

    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "Records of the converter's layout (data_pipeline/records.py)."}
    FORMAT = "train"

    def __init__(self, *, splits: Mapping[str, str] | None = None, media_root: str = "",
                 config: convert.ConvertConfig | None = None, bench_mode: str = "single", **kwargs):
        """splits: split name -> sample file (.json / .jsonl), only for preparing; the other
        arguments are the converter's (`ConvertConfig`, `--media-root`, `--bench-mode`)."""
        self._sources = dict(splits or {})
        self._media_root = media_root
        self._convert = config or convert.ConvertConfig()
        self._bench_mode = bench_mode
        self.reports: dict[str, dict] = {}
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=self.__doc__, features=features(),
            disable_shuffling=True,  # source order: record i is the converter's record i of the same samples
            metadata=tfds.core.MetadataDict(convert_config=dataclasses.asdict(self._convert), format=self.FORMAT,
                                            bench_mode=self._bench_mode))

    def _split_generators(self, dl_manager):
        del dl_manager  # local files only: nothing is downloaded
        if not self._sources:
            raise ValueError(f"{self.name}: no splits to prepare (pass splits={{'train': 'file.json'}})")
        return {split: self._generate_examples(split, path) for split, path in self._sources.items()}

    def _generate_examples(self, split: str, path: str):
        """(source index, example) per stored sample; skips collected into `reports[split]`."""
        entries = inputs.load_entries(path)
        cfg = self._convert
        parse = schema.CheckedParse.over(_parser(self.FORMAT, self._bench_mode, cfg.allow_text_only), entries)
        skips, written = [], 0
        for i, raw in enumerate(entries):
            kind, out = convert.process_sample(parse, self._media_root, cfg, os.path.basename(path), i, raw)
            if kind == "ok":
                written += 1
                yield i, to_example(out)
            else:
                skips.append(out)
        self.reports[split] = {"split": split, "source": path, "samples": len(entries), "written": written,
                               "skipped": convert.skip_counts(skips), "num_skipped": len(skips), "skips": skips}


class VideoreferTrain(RecordBuilder):
    """VideoRefer-700K-style training samples (JSON + media) as records."""


class VideoreferBenchQ(RecordBuilder):
    """VideoRefer-Bench-Q (multiple-choice questions on regions) as records."""

    FORMAT = "bench-q"


class VideoreferBenchD(RecordBuilder):
    """VideoRefer-Bench-D (region descriptions) as records."""

    FORMAT = "bench-d"


class VideoreferSynthetic(RecordBuilder):
    """The synthetic referring-video task (`vrefer-data synthetic`: official JSON + RLE format) as records."""


BUILDERS: dict[str, type[RecordBuilder]] = {
    b.name: b for b in (VideoreferTrain, VideoreferBenchQ, VideoreferBenchD, VideoreferSynthetic)}


def builder_class(name: str) -> type[RecordBuilder]:
    """The registered TFDS builder class of dataset `name` (one of `BUILDERS`)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown TFDS dataset {name!r}; one of {sorted(BUILDERS)}")
    return BUILDERS[name]


def prepare(name: str, data_dir: str, splits: Mapping[str, str], *, media_root: str,
            config: convert.ConvertConfig | None = None, bench_mode: str = "single") -> dict[str, dict]:
    """Build dataset `name` under `data_dir` (ArrayRecord, no TensorFlow) and write each split's
    skip report beside it. Returns {split: report}. A dataset already prepared is not rebuilt."""
    builder = builder_class(name)(data_dir=data_dir, splits=splits, media_root=media_root, config=config,
                                  bench_mode=bench_mode)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    for split, report in builder.reports.items():
        write_json(os.path.join(builder.data_dir, f"{split}.report.json"), report, sort_keys=True)
    reports = {}
    for split in splits:  # also when the dataset was prepared before (its reports are on disk)
        with open(os.path.join(builder.data_dir, f"{split}.report.json")) as f:
            reports[split] = json.load(f)
    return reports


# ----------------------------------------------------------------------------- reading


def parse_source(source: str) -> tuple[str, str, str | None, str]:
    """'tfds:<data_dir>/<name>[/<version>]:<split>' -> (data_dir, name, version or None, split)."""
    spec = source[len(PREFIX):]
    path, sep, split = spec.rpartition(":")
    if not sep or not split or not path:
        raise ValueError(f"{source!r}: expected tfds:<data_dir>/<name>[/<version>]:<split>")
    path = path.rstrip("/")
    head, last = os.path.split(path)
    version = None
    if last.count(".") == 2 and all(p.isdigit() for p in last.split(".")):
        version, (head, last) = last, os.path.split(head)
    return head, last, version, split


class TfdsRecords:
    """`len` / `[i] -> Record` over one split of a prepared dataset (`tfds.data_source`): a Grain
    random-access source, like `records.RecordReader`. Picklable: the data source is opened lazily
    in each process."""

    def __init__(self, source: str):
        self.source = source
        self.data_dir, self.name, self.version, self.split = parse_source(source)
        self._ds = None
        self._len = len(self._open())

    def _open(self):
        if self._ds is None:
            builder_class(self.name)  # a known name (registered on import, so tfds.data_source finds it)
            name = self.name if self.version is None else f"{self.name}:{self.version}"
            if not os.path.isdir(os.path.join(self.data_dir, self.name)):
                raise FileNotFoundError(f"{self.source}: no prepared dataset {self.name!r} in {self.data_dir}")
            self._ds = tfds.data_source(name, split=self.split, data_dir=self.data_dir, download=False)
        return self._ds

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> Record:
        return Record.from_features(self._open()[int(i)])

    def __getstate__(self):
        return {**self.__dict__, "_ds": None}

    def __repr__(self) -> str:
        return f"TfdsRecords({self.source!r}, records={self._len})"


