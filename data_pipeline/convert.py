"""JSON + media -> record shards: multiprocess, sharded by sample range, resumable, with a skip report.

Layout of the output folder for `prefix` P and N shards:

    P.manifest.json                      source, sample count, shard count, conversion config
    P-00003-of-00016.tfrecord            records of shard 3 (contiguous sample range)
    P-00003-of-00016.index               its offset index (TFRecord output only)
    P-00003-of-00016.report.json         what shard 3 wrote and skipped (reason, id, field, message)
    P.report.json                        merged report over every finished shard in the folder

Shard s holds samples [s*n//N, (s+1)*n//N) of the source list, in order; a conversion can be split
across machines by shard ranges. A shard is written under `<name>.tmp` names and renamed when
complete (index and report first, the records last); on restart, shards whose three files exist
are skipped and stale temporary files are overwritten. Output is deterministic: the same inputs
and config give byte-identical shards. The manifest guards against resuming with a different
source, config or input: it records the SHA-256 of the samples (`entries_sha256`), so a JSON file
edited between runs is refused instead of mixing shards of both versions.

Every unusable sample is skipped, counted by reason (`schema.REASONS`) and listed; nothing is
replaced by another sample. A repeated sample id keeps its first sample (`duplicate_id` for the
others); an unreadable JSON Lines line is one `bad_json_line` skip; a media path that is absolute
or leaves `media_root` is `media_outside_root` (absolute paths are read only with
`ConvertConfig.allow_absolute_media`). A worker process that dies (a crash in a decoder, an OOM
kill) never hangs the run: the samples it may have held are re-run alone, the one that kills its
worker again is skipped as `worker_died`, and the run goes on with a fresh pool.

Worker processes are started with 'spawn' (safe when JAX is imported), so a script that calls
`convert(..., workers>0)` needs the usual `if __name__ == "__main__":` guard; the CLI has it.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import functools
import json
import multiprocessing
import os
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from data_pipeline import masks as masks_lib
from data_pipeline.inputs import InputError, entries_sha256
from data_pipeline import records as records_lib
from data_pipeline import schema
from data_pipeline import video as video_lib
from data_pipeline import worker_pool
from vrefer_jax import paths as paths_lib
from vrefer_jax.json_files import write_json
from vrefer_jax.shard_ranges import shard_bounds

ParseFn = Callable[[Any, int], schema.Sample]


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
    """What goes into each record.

    num_frames: frames sampled with the official 'v1' rule (16 for training, 8 for the released
      benchmark scripts); at most 32 (official MAX_FRAMES).
    image_size: side S of the stored frames, resized exactly as SiglipImageProcessor does (PIL
      bicubic, after centring on a grey square canvas in 'pad' mode); 0 stores the decoded frames
      untouched (then the loader pads and resizes).
    image_format: 'png' (default: lossless, the exact resized pixels), 'raw' (lossless, uncompressed:
      ~2.3x PNG's size, no decode cost) or 'jpeg' (4:4:4, `jpeg_quality`; lossy: at q95 pixels are
      off by up to ~25/255 and a tiny model's logits by up to ~1.9 against the official decode).
    output_format: 'tfrecord' (with offset indexes) or 'array_record'.
    allow_absolute_media: read absolute video/image paths from the data as they are; relative
      paths must stay inside the media root either way (else `media_outside_root`).
    """

    num_frames: int = 16
    image_size: int = 384
    aspect: str = "square"
    image_format: str = "png"
    jpeg_quality: int = 95
    output_format: str = "tfrecord"
    allow_text_only: bool = False
    decode_threads: int = 1
    allow_absolute_media: bool = False

    def __post_init__(self):
        if not 1 <= self.num_frames <= video_lib.MAX_FRAMES:
            raise ValueError(f"num_frames must be in [1, {video_lib.MAX_FRAMES}], got {self.num_frames}")
        if self.image_size < 0:
            raise ValueError(f"image_size must be >= 0, got {self.image_size}")
        if self.aspect not in ("square", "pad"):
            raise ValueError(f"aspect must be 'square' or 'pad', got {self.aspect!r}")
        if self.image_format not in video_lib.IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {video_lib.IMAGE_FORMATS}, got {self.image_format!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if self.output_format not in ("tfrecord", "array_record"):
            raise ValueError(f"output_format must be 'tfrecord' or 'array_record', got {self.output_format!r}")

    @property
    def extension(self) -> str:
        return records_lib.TFRECORD_EXT if self.output_format == "tfrecord" else records_lib.ARRAY_RECORD_EXT


# ----------------------------------------------------------------------------- one sample


def media_path(sample: schema.Sample, media_root: str, allow_absolute: bool = False) -> str:
    """The sample's video / image / frame folder inside `media_root` ("" for text). Raises
    `schema.SampleError` (`media_outside_root`) for a path that is absolute (unless allowed) or
    leaves the root with `..`: data must not make the converter read arbitrary files."""
    if not sample.media:
        return ""
    try:
        return paths_lib.resolve_under(media_root, sample.media, allow_absolute=allow_absolute)
    except paths_lib.PathOutsideRoot as e:
        raise schema.SampleError(e.reason, sample.sample_id, sample.modality, str(e)) from None


@dataclasses.dataclass(frozen=True)
class DecodedSample:
    """A checked sample in memory: what `build_record` stores, before any image encoding.

    images: source frame index -> uint8 [S, S, 3], resized exactly as SiglipImageProcessor does
      (`ConvertConfig.image_size` / `aspect`; size 0 keeps the decoded frame); each distinct frame once.
    objects: masks in COCO compressed RLE at the frame's resolution, as pycocotools produces them
      from the annotation (the official `annToMask` path); `ObjectMasks.decode()` gives [M, H, W] bool.
    """

    sample: schema.Sample
    num_source_frames: int
    orig_size: tuple[int, int]
    frame_indices: tuple[int, ...]  # the 'v1'-sampled frames
    region_frame_indices: tuple[int, ...]  # the annotated frames (union over objects)
    images: dict[int, Any]
    objects: tuple[records_lib.ObjectMasks, ...]

    @property
    def frames(self) -> list:
        return [self.images[i] for i in self.frame_indices]

    @property
    def region_frames(self) -> list:
        return [self.images[i] for i in self.region_frame_indices]


def object_masks(sample: schema.Sample, frame_sizes: Mapping[int, tuple[int, int]],
                 ann_indices: Sequence[Sequence[int]]) -> tuple[records_lib.ObjectMasks, ...]:
    """Check every object's masks against its frames' sizes and encode them as COCO compressed RLE
    (the official `annToMask` path). frame_sizes: absolute frame index -> (h, w) of the decoded frame;
    ann_indices: per object, its frames as indices into the region frames (`Sample.region_layout`).
    Raises `schema.SampleError` naming the object and frame key. Shared by both families' host paths."""
    sid = sample.sample_id
    objects = []
    for k, (obj, region_index) in enumerate(zip(sample.objects, ann_indices)):
        rles, sizes, nulls = [], [], []
        for key, f, seg in zip(obj.keys, obj.frames, obj.segmentations):
            fh, fw = frame_sizes[f]
            # Polygons take the sample's height/width (official `annToMask(seg, h, w)`), or the
            # frame's size when the sample has none; null masks take the frame's size.
            ph, pw = (sample.height, sample.width) if sample.height and seg.kind == "polygon" else (fh, fw)
            mh, mw = masks_lib.segmentation_size(seg, ph, pw)
            if (mh, mw) != (fh, fw):
                raise schema.SampleError("mask_size_mismatch", sid, f"annotation[{k}][{key!r}].segmentation",
                                         f"mask is {mh}x{mw} but frame {f} is {fh}x{fw}")
            try:
                counts, size = masks_lib.to_compressed(seg, mh, mw)
            except masks_lib.MaskFormatError as e:
                raise schema.SampleError(e.reason, sid, f"annotation[{k}][{key!r}].segmentation{e.subfield}",
                                         e.message) from None
            rles.append(counts)
            sizes.append(size)
            nulls.append(seg.kind == "null")
        objects.append(records_lib.ObjectMasks(obj.frames, tuple(region_index), tuple(sizes), tuple(rles),
                                               tuple(nulls)))

    return tuple(objects)


def decode_sample(sample: schema.Sample, media_root: str, cfg: ConvertConfig) -> DecodedSample:
    """Decode and check one validated sample into memory (frames sampled and resized, masks checked
    against their frames). The one host preprocessing entry point: the converter encodes its result
    (`encode_record`), the predictor feeds it to the loader's per-sample transform directly.
    Raises `schema.SampleError`."""
    sid = sample.sample_id
    path = media_path(sample, media_root, cfg.allow_absolute_media)
    all_frames, ann_indices = sample.region_layout()
    try:
        if sample.modality == "video":
            reader = video_lib.open_video(path, cfg.decode_threads)
            n = reader.num_frames
            if n == 0:
                raise schema.SampleError("unreadable_media", sid, "video", f"{path}: no frames")
            for k, obj in enumerate(sample.objects):
                for key, f in zip(obj.keys, obj.frames):
                    if f >= n:
                        raise schema.SampleError("frame_index_out_of_range", sid, f"annotation[{k}][{key!r}]",
                                                 f"frame {f} but {sample.media} has {n} frames")
            # A clip bound in seconds (MVBench's start/end, kept in `extra` by its reader).
            sampled = video_lib.sample_clip_v1(n, reader.fps, cfg.num_frames, (sample.extra or {}).get("bound"))
            decoded = reader.get(set(sampled) | set(all_frames))
        elif sample.modality == "image":
            n, sampled = 1, [0]
            decoded = {0: video_lib.read_image(path)}
        else:
            n, sampled, decoded = 0, [], {}
    except video_lib.MediaError as e:
        raise schema.SampleError(e.reason, sid, sample.modality, e.message) from None

    objects = object_masks(sample, {f: decoded[f].shape[:2] for f in all_frames}, ann_indices)

    images = {i: video_lib.resize_frame(decoded[i], cfg.image_size, cfg.aspect)
              for i in dict.fromkeys([*sampled, *all_frames])}  # each distinct frame resized once
    orig = tuple(decoded[sampled[0]].shape[:2]) if sampled else (0, 0)
    return DecodedSample(sample, n, orig, tuple(sampled), tuple(all_frames), images, objects)


def encode_record(d: DecodedSample, cfg: ConvertConfig, source: str = "") -> records_lib.Record:
    """A `DecodedSample` -> the stored `Record` (each distinct frame encoded once)."""
    encoded = {i: video_lib.encode_image(img, cfg.image_format, cfg.jpeg_quality) for i, img in d.images.items()}
    s = d.sample
    return records_lib.Record(
        sample_id=s.sample_id, source=source, index=s.index, modality=s.modality, media=s.media or "",
        conversations=tuple(s.conversations), extra=dict(s.extra), orig_size=d.orig_size,
        num_source_frames=d.num_source_frames, stored_size=cfg.image_size, aspect=cfg.aspect,
        image_format=cfg.image_format, frame_indices=d.frame_indices,
        frames=tuple(encoded[i] for i in d.frame_indices), region_frame_indices=d.region_frame_indices,
        region_frames=tuple(encoded[i] for i in d.region_frame_indices), objects=d.objects)


def build_record(sample: schema.Sample, media_root: str, cfg: ConvertConfig, source: str = "") -> records_lib.Record:
    """Decode, check and encode one validated sample (`decode_sample` + `encode_record`).
    Raises `schema.SampleError`."""
    return encode_record(decode_sample(sample, media_root, cfg), cfg, source)


# ----------------------------------------------------------------------------- workers

_WORKER: dict[str, Any] = {}


def _init_worker(parse: ParseFn, media_root: str, cfg: ConvertConfig, source: str) -> None:
    faulthandler.enable()  # a worker killed by a signal (segfault in a decoder) leaves a traceback on stderr
    _WORKER.update(parse=parse, media_root=media_root, cfg=cfg, source=source)


def process_sample(parse: ParseFn, media_root: str, cfg: ConvertConfig, source: str, index: int,
                   raw: Any) -> tuple[str, Any]:
    """(index, raw entry) -> ("ok", `Record`) | ("skip", skip dict: index, id, reason, field,
    message). Never raises: what the converter and the TFDS builders (`tfds_data`) both run."""
    sid = f"#{index}"
    try:
        sample = parse(raw, index)
        sid = sample.sample_id
        return "ok", build_record(sample, media_root, cfg, source)
    except schema.SampleError as e:
        return "skip", dict(index=index, **e.to_dict())
    except Exception as e:  # noqa: BLE001 - one odd file must not stop a 700K-sample run; it is reported
        where = traceback.extract_tb(e.__traceback__)[-1]
        msg = f"{type(e).__name__}: {e} (at {os.path.basename(where.filename)}:{where.lineno})"
        return "skip", dict(index=index, id=sid, reason="unexpected_error", field="<sample>", message=msg)


def skip_counts(skips: Sequence[Mapping]) -> dict[str, int]:
    """Skips counted by reason (sorted), as every report lists them."""
    return dict(sorted(Counter(s["reason"] for s in skips).items()))


def _process(task: tuple[int, Any]) -> tuple[str, Any]:
    """(index, raw entry) -> ("ok", serialized record) | ("skip", skip dict). Never raises."""
    index, raw = task
    kind, out = process_sample(_WORKER["parse"], _WORKER["media_root"], _WORKER["cfg"], _WORKER["source"], index, raw)
    return kind, out.to_bytes() if kind == "ok" else out


def _process_chunk(chunk: list[tuple[int, Any]]) -> list[tuple[str, Any]]:
    return [_process(t) for t in chunk]


def _worker_died(task: tuple[int, Any]) -> tuple[str, dict]:
    index, raw = task
    sid = str(raw["id"]) if isinstance(raw, dict) and raw.get("id") is not None else f"#{index}"
    return "skip", dict(index=index, id=sid, reason="worker_died", field="<sample>",
                        message="the worker process died while converting this sample, also when run alone "
                                "(a crash in a decoder, or killed; see the worker's stderr)")


# ----------------------------------------------------------------------------- shards


def shard_name(prefix: str, shard: int, num_shards: int) -> str:
    return f"{prefix}-{shard:05d}-of-{num_shards:05d}"


def _shard_files(out_dir: str, prefix: str, shard: int, num_shards: int, cfg: ConvertConfig) -> dict[str, str]:
    base = os.path.join(out_dir, shard_name(prefix, shard, num_shards))
    files = {"records": base + cfg.extension, "report": base + ".report.json"}
    if cfg.output_format == "tfrecord":
        files["index"] = base + records_lib.INDEX_EXT
    return files


def shard_done(out_dir: str, prefix: str, shard: int, num_shards: int, cfg: ConvertConfig) -> bool:
    return all(os.path.exists(p) for p in _shard_files(out_dir, prefix, shard, num_shards, cfg).values())


class _ShardWriter:
    """Writes one shard under temporary names; `finish()` renames it into place."""

    def __init__(self, out_dir: str, prefix: str, shard: int, num_shards: int, bounds: tuple[int, int],
                 cfg: ConvertConfig):
        self.files = _shard_files(out_dir, prefix, shard, num_shards, cfg)
        self.shard, self.num_shards, self.bounds = shard, num_shards, bounds
        writer_cls = records_lib.TFRecordWriter if cfg.output_format == "tfrecord" else records_lib.ArrayRecordWriter
        idx = self.files.get("index")
        self.writer = writer_cls(self.files["records"] + ".tmp", idx + ".tmp" if idx else None)
        self.skips: list[dict] = []

    def add(self, result: tuple[str, Any]) -> None:
        kind, payload = result
        if kind == "ok":
            self.writer.write(payload)
        else:
            self.skips.append(payload)

    def finish(self) -> dict:
        self.writer.close()
        report = {
            "shard": self.shard, "num_shards": self.num_shards, "samples": list(self.bounds),
            "written": len(self.writer), "skipped": skip_counts(self.skips),
            "skips": self.skips,
        }
        if "index" in self.files:
            os.replace(self.files["index"] + ".tmp", self.files["index"])
        write_json(self.files["report"], report, sort_keys=True)
        os.replace(self.files["records"] + ".tmp", self.files["records"])  # last: marks the shard complete
        return report


# ----------------------------------------------------------------------------- driver


def _check_manifest(path: str, manifest: dict) -> None:
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old != manifest:
            diff = {k: (old.get(k), manifest.get(k)) for k in set(old) | set(manifest) if old.get(k) != manifest.get(k)}
            if set(diff) == {"input_sha256"} and "input_sha256" not in old:
                raise InputError(f"{path} was written for a different conversion: by a version that did not record "
                                 "its input's hash, so resuming cannot be checked; use another --out or --prefix")
            if set(diff) == {"input_sha256"}:
                raise InputError(
                    f"{path} was written for a different conversion: the input samples changed since it was "
                    f"started (sha256 {str(old.get('input_sha256'))[:12]}... then, {manifest['input_sha256'][:12]}... "
                    "now); resuming would mix records of both. Restore the original input, or use another "
                    "--out or --prefix")
            raise InputError(f"{path} was written for a different conversion (old, new): {diff}; "
                             "use another --out or --prefix")
    else:
        write_json(path, manifest, sort_keys=True)


def convert(
    entries: Sequence[Any],
    out_dir: str,
    *,
    media_root: str,
    num_shards: int,
    shard_range: tuple[int, int] | None = None,
    workers: int = 0,
    config: ConvertConfig = ConvertConfig(),
    parse: ParseFn | None = None,
    source: str = "",
    prefix: str = "data",
    progress: bool = True,
    start_method: str = "spawn",
    chunksize: int = 1,
) -> dict:
    """Convert `entries` (parsed by `parse`, default `schema.parse_sample`) into shards
    `shard_range = (a, b)` (b exclusive; default all) of `num_shards`. `workers=0` runs in this
    process. Returns the merged report (also written to `<out_dir>/<prefix>.report.json`)."""
    from tqdm import tqdm

    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    a, b = shard_range or (0, num_shards)
    if not 0 <= a < b <= num_shards:
        raise ValueError(f"shard range {a}:{b} not within 0:{num_shards}")
    parse = parse or functools.partial(schema.parse_sample, allow_text_only=config.allow_text_only)
    os.makedirs(out_dir, exist_ok=True)
    n = len(entries)
    func = getattr(parse, "func", parse)
    parse_name = f"{func.__module__}.{func.__qualname__}{sorted(getattr(parse, 'keywords', {}).items())}"
    _check_manifest(os.path.join(out_dir, f"{prefix}.manifest.json"), {
        "source": source, "num_samples": n, "num_shards": num_shards, "parse": parse_name,
        "config": dataclasses.asdict(config), "input_sha256": entries_sha256(entries)})
    parse = schema.CheckedParse.over(parse, entries)  # duplicate ids, unreadable lines

    pending = [s for s in range(a, b) if not shard_done(out_dir, prefix, s, num_shards, config)]
    total = sum(hi - lo for lo, hi in (shard_bounds(n, s, num_shards, rounding="balanced") for s in pending))

    def tasks() -> Iterator[tuple[int, Any]]:
        for s in pending:
            lo, hi = shard_bounds(n, s, num_shards, rounding="balanced")
            for i in range(lo, hi):
                yield i, entries[i]

    init_args = (parse, media_root, config, source)
    if workers > 0:
        results = worker_pool.ordered_map(_process_chunk, tasks(), workers, multiprocessing.get_context(start_method),
                                          _init_worker, init_args, chunksize, _worker_died)
    else:
        _WORKER.update(parse=parse, media_root=media_root, cfg=config, source=source)
        results = map(_process, tasks())

    t0 = time.perf_counter()
    done = skipped = 0
    bar = tqdm(total=total, unit="sample", desc=f"{prefix} shards {a}:{b}", disable=not progress, smoothing=0.05)
    try:
        for s in pending:
            lo, hi = shard_bounds(n, s, num_shards, rounding="balanced")
            w = _ShardWriter(out_dir, prefix, s, num_shards, (lo, hi), config)
            for _ in range(hi - lo):
                res = next(results)
                w.add(res)
                done += 1
                skipped += res[0] == "skip"
                bar.update(1)
                bar.set_postfix(skipped=skipped, refresh=False)
            w.finish()
    finally:
        bar.close()
        if workers > 0:
            results.close()  # shuts the worker pool down
    elapsed = time.perf_counter() - t0
    report = merge_reports(out_dir, prefix, num_shards, config)
    report["run"] = {"shards": [a, b], "converted_shards": pending, "samples": done, "seconds": round(elapsed, 3),
                     "samples_per_second": round(done / elapsed, 3) if elapsed > 0 else None, "workers": workers}
    write_json(os.path.join(out_dir, f"{prefix}.report.json"), report, sort_keys=True)
    return report


def merge_reports(out_dir: str, prefix: str, num_shards: int, cfg: ConvertConfig) -> dict:
    """Totals over every finished shard of `prefix` in `out_dir`."""
    written, counts, skips, done, missing = 0, Counter(), [], [], []
    for s in range(num_shards):
        if not shard_done(out_dir, prefix, s, num_shards, cfg):
            missing.append(s)
            continue
        with open(_shard_files(out_dir, prefix, s, num_shards, cfg)["report"]) as f:
            r = json.load(f)
        done.append(s)
        written += r["written"]
        counts.update(r["skipped"])
        skips.extend(r["skips"])
    return {"written": written, "skipped": dict(sorted(counts.items())), "num_skipped": sum(counts.values()),
            "shards_done": len(done), "shards_missing": missing,
            "skips": sorted(skips, key=lambda x: x["index"])}
