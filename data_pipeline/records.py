"""Record layout (`tf.train.Example`), TFRecord/ArrayRecord shard writers and a random-access reader.

No TensorFlow: `tf.train.Example` comes from `data_pipeline.tf_example` (TensorFlow's wire format from
a private protobuf descriptor pool).

One record = one sample. Features (T sampled frames, F region frames, K objects, N = total masks):

    id, source, media, modality            bytes      sample id, source JSON name, media path, video|image|text
    index                                  int64      position of the sample in its source list
    conversations, extra                   bytes      JSON: the conversation list; free metadata (benchmarks)
    orig_size                              int64[2]   (H, W) of the first sampled frame (masks of null segmentations)
    num_source_frames                      int64      frames in the video (1 for an image, 0 for text)
    stored_size                            int64      side S of the stored frames; 0 = original resolution
    aspect, image_format                   bytes      square|pad ; png|raw|jpeg
    frame_indices / frames                 int64[T] / bytes[T]   'v1'-sampled absolute indices / encoded frames
    region_frame_indices / region_frames   int64[F] / bytes[F]   `all_frames` (ascending) / encoded frames
    object_num_masks                       int64[K]   masks per object; the flat arrays below are object-major
    mask_frames                            int64[N]   absolute frame of each mask (object's JSON key order)
    mask_region_index                      int64[N]   its index into region_frame_indices (`ann_indices`)
    mask_size                              int64[2N]  (h, w) per mask, original resolution
    mask_rle                               bytes[N]   COCO compressed RLE counts
    mask_null                              int64[N]   1 where the annotation was null (stored as all-zero)

TFRecord framing: uint64 length, uint32 masked CRC32C of the length bytes, data, uint32 masked
CRC32C of the data (all little-endian). Each `X.tfrecord` has an offset index `X.index`, one line
"offset length" per record (the `tfrecord` package's format).
"""

from __future__ import annotations

import bisect
import dataclasses
import glob
import json
import os
import struct
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import google_crc32c
import numpy as np

from data_pipeline import masks as masks_lib
from data_pipeline.tf_example import Example, make_example, parse_example  # noqa: F401  (part of this module's API)
from data_pipeline import video as video_lib

TFRECORD_EXT = ".tfrecord"
ARRAY_RECORD_EXT = ".array_record"
INDEX_EXT = ".index"


# ----------------------------------------------------------------------------- record

# Every stored feature and its kind (each a list): the one layout of TFRecord, ArrayRecord and TFDS.
FEATURE_KINDS: dict[str, str] = {
    "id": "bytes", "source": "bytes", "index": "int", "modality": "bytes", "media": "bytes",
    "conversations": "bytes", "extra": "bytes", "orig_size": "int", "num_source_frames": "int",
    "stored_size": "int", "aspect": "bytes", "image_format": "bytes", "frame_indices": "int", "frames": "bytes",
    "region_frame_indices": "int", "region_frames": "bytes", "object_num_masks": "int", "mask_frames": "int",
    "mask_region_index": "int", "mask_size": "int", "mask_rle": "bytes", "mask_null": "int",
}


@dataclasses.dataclass(frozen=True)
class ObjectMasks:
    """One object's masks in its JSON key order, at original resolution."""

    frames: tuple[int, ...]  # absolute frame indices
    region_index: tuple[int, ...]  # indices into Record.region_frame_indices
    sizes: tuple[tuple[int, int], ...]  # (h, w) per mask
    rles: tuple[bytes, ...]  # COCO compressed RLE counts
    null: tuple[bool, ...]  # the annotation was null

    def decode(self) -> np.ndarray:
        """[M, H, W] bool (all masks of an object have their frames' size)."""
        return np.stack([masks_lib.decode_rle(r, h, w) for r, (h, w) in zip(self.rles, self.sizes)])


@dataclasses.dataclass(frozen=True)
class Record:
    """A converted sample (see the module docstring for the stored features)."""

    sample_id: str
    source: str
    index: int
    modality: str
    media: str
    conversations: tuple[dict, ...]
    extra: dict
    orig_size: tuple[int, int]
    num_source_frames: int
    stored_size: int
    aspect: str
    image_format: str
    frame_indices: tuple[int, ...]
    frames: tuple[bytes, ...]
    region_frame_indices: tuple[int, ...]
    region_frames: tuple[bytes, ...]
    objects: tuple[ObjectMasks, ...]

    def to_features(self) -> dict[str, list]:
        """The stored features (`FEATURE_KINDS`), every one a list of bytes or of ints: one
        `tf.train.Feature` each in a TFRecord / ArrayRecord shard, one raw TFDS feature each
        (`data_pipeline.tfds_data`)."""
        objs = self.objects
        return {
            "id": [self.sample_id.encode()], "source": [self.source.encode()], "index": [self.index],
            "modality": [self.modality.encode()], "media": [self.media.encode()],
            "conversations": [json.dumps(list(self.conversations), ensure_ascii=False).encode()],
            "extra": [json.dumps(self.extra, ensure_ascii=False, sort_keys=True).encode()],
            "orig_size": list(self.orig_size), "num_source_frames": [self.num_source_frames],
            "stored_size": [self.stored_size], "aspect": [self.aspect.encode()],
            "image_format": [self.image_format.encode()],
            "frame_indices": list(self.frame_indices), "frames": list(self.frames),
            "region_frame_indices": list(self.region_frame_indices), "region_frames": list(self.region_frames),
            "object_num_masks": [len(o.frames) for o in objs],
            "mask_frames": [f for o in objs for f in o.frames],
            "mask_region_index": [f for o in objs for f in o.region_index],
            "mask_size": [v for o in objs for hw in o.sizes for v in hw],
            "mask_rle": [r for o in objs for r in o.rles],
            "mask_null": [int(n) for o in objs for n in o.null],
        }

    def to_bytes(self) -> bytes:
        return make_example(self.to_features())

    @classmethod
    def from_bytes(cls, data: bytes) -> Record:
        return cls.from_features(parse_example(data))

    @classmethod
    def from_features(cls, f: dict) -> Record:
        """The inverse of `to_features` (lists, or numpy arrays for the int features; a feature
        stored empty may be missing)."""
        def s(name):
            return bytes(f[name][0]).decode() if len(f.get(name, ())) else ""

        def ints(name, default=()):
            return tuple(int(v) for v in f.get(name, default))

        def i(name):
            v = ints(name)
            return v[0] if v else 0

        objects, start = [], 0
        sizes, mframes, mreg, mnull = ints("mask_size"), ints("mask_frames"), ints("mask_region_index"), ints("mask_null")
        rles = [bytes(r) for r in f.get("mask_rle", [])]
        for n in ints("object_num_masks"):
            sl = slice(start, start + n)
            objects.append(ObjectMasks(
                frames=mframes[sl], region_index=mreg[sl],
                sizes=tuple((sizes[2 * j], sizes[2 * j + 1]) for j in range(start, start + n)),
                rles=tuple(rles[sl]), null=tuple(bool(v) for v in mnull[sl])))
            start += n
        return cls(
            sample_id=s("id"), source=s("source"), index=i("index"), modality=s("modality"), media=s("media"),
            conversations=tuple(json.loads(s("conversations") or "[]")), extra=json.loads(s("extra") or "{}"),
            orig_size=ints("orig_size", (0, 0)), num_source_frames=i("num_source_frames"),
            stored_size=i("stored_size"), aspect=s("aspect"), image_format=s("image_format"),
            frame_indices=ints("frame_indices"), frames=tuple(bytes(b) for b in f.get("frames", [])),
            region_frame_indices=ints("region_frame_indices"),
            region_frames=tuple(bytes(b) for b in f.get("region_frames", [])), objects=tuple(objects))

    def decode_frames(self) -> np.ndarray:
        """Sampled frames [T, S, S, 3] uint8 (for original-resolution storage all must share a size)."""
        return np.stack([video_lib.decode_image(b) for b in self.frames])

    def decode_region_frames(self) -> np.ndarray:
        """Region frames [F, S, S, 3] uint8 (F may be 0: shape [0, 0, 0, 3])."""
        if not self.region_frames:
            return np.zeros((0, 0, 0, 3), np.uint8)
        return np.stack([video_lib.decode_image(b) for b in self.region_frames])


# ----------------------------------------------------------------------------- TFRecord framing

_MASK_DELTA = 0xA282EAD8
_U64, _U32 = struct.Struct("<Q"), struct.Struct("<I")


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC32C: rotate right by 15 bits, add 0xa282ead8 (mod 2^32)."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


class RecordError(IOError):
    """A corrupt or truncated record."""


class TFRecordWriter:
    """Appends framed records to `path`; `close()` also writes the offset index if `index_path`."""

    def __init__(self, path: str, index_path: str | None = None):
        self.path, self.index_path = path, index_path
        self._f = open(path, "wb")
        self.offsets: list[int] = []
        self.lengths: list[int] = []

    def write(self, data: bytes) -> None:
        header = _U64.pack(len(data))
        offset = self._f.tell()
        self._f.write(header)
        self._f.write(_U32.pack(masked_crc32c(header)))
        self._f.write(data)
        self._f.write(_U32.pack(masked_crc32c(data)))
        self.offsets.append(offset)
        self.lengths.append(len(data) + 16)

    def __len__(self) -> int:
        return len(self.offsets)

    def close(self) -> None:
        if self._f.closed:
            return
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        if self.index_path:
            write_index(self.index_path, self.offsets, self.lengths)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ArrayRecordWriter:
    """The same records in Grain's native ArrayRecord format (no separate index)."""

    def __init__(self, path: str, index_path: str | None = None):
        from array_record.python.array_record_module import ArrayRecordWriter as _W

        self.path, self._n = path, 0
        self._w = _W(path, "group_size:1")

    def write(self, data: bytes) -> None:
        self._w.write(data)
        self._n += 1

    def __len__(self) -> int:
        return self._n

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_index(path: str, offsets: Sequence[int], lengths: Sequence[int]) -> None:
    with open(path, "w") as f:
        f.writelines(f"{o} {n}\n" for o, n in zip(offsets, lengths))
        f.flush()
        os.fsync(f.fileno())


def read_index(path: str) -> np.ndarray:
    """Offset index -> [N, 2] int64 (offset, framed length)."""
    with open(path) as f:
        rows = [line.split() for line in f if line.strip()]
    return np.asarray(rows, np.int64).reshape(-1, 2)


def index_path_for(record_path: str) -> str:
    base = record_path[: -len(TFRECORD_EXT)] if record_path.endswith(TFRECORD_EXT) else record_path
    return base + INDEX_EXT


def _read_framed(f, offset: int | None, verify: bool, where: str) -> bytes | None:
    if offset is not None:
        f.seek(offset)
    header = f.read(12)
    if not header:
        return None
    if len(header) < 12:
        raise RecordError(f"{where}: truncated record header")
    (length,), (crc,) = _U64.unpack_from(header), _U32.unpack_from(header, 8)
    if verify and crc != masked_crc32c(header[:8]):
        raise RecordError(f"{where}: length CRC mismatch")
    data = f.read(length)
    footer = f.read(4)
    if len(data) < length or len(footer) < 4:
        raise RecordError(f"{where}: truncated record")
    if verify and _U32.unpack(footer)[0] != masked_crc32c(data):
        raise RecordError(f"{where}: data CRC mismatch")
    return data


def iter_tfrecord(path: str, verify: bool = True) -> Iterator[bytes]:
    """Sequential read of every record of a TFRecord file, checking CRCs."""
    with open(path, "rb") as f:
        while True:
            data = _read_framed(f, None, verify, path)
            if data is None:
                return
            yield data


def build_index(path: str) -> np.ndarray:
    """Scan a TFRecord file -> [N, 2] (offset, framed length), e.g. to index a foreign file."""
    rows, offset = [], 0
    for data in iter_tfrecord(path):
        rows.append((offset, len(data) + 16))
        offset += len(data) + 16
    return np.asarray(rows, np.int64).reshape(-1, 2)


# ----------------------------------------------------------------------------- reader


def resolve_shards(paths: str | Sequence[str]) -> list[str]:
    """A directory, a glob, a file or a list of them -> sorted record files (.tfrecord/.array_record)."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    out = []
    for p in items:
        p = os.fspath(p)
        if os.path.isdir(p):
            found = sorted(glob.glob(os.path.join(p, "*" + TFRECORD_EXT))
                           + glob.glob(os.path.join(p, "*" + ARRAY_RECORD_EXT)))
        elif any(ch in p for ch in "*?["):
            found = sorted(glob.glob(p))
        else:
            found = [p]
        out.extend(x for x in found if not os.path.basename(x).startswith("."))
    if not out:
        raise FileNotFoundError(f"no record files in {paths!r}")
    return out


class RecordReader:
    """Random access over record shards: `len(reader)`, `reader[i]` -> `Record` (or bytes with
    `parse=False`), by global index across shards in sorted shard order.

    TFRecord shards are read through their `.index` files (seek + read + CRC check); ArrayRecord
    shards through array_record's reader. Thread-safe (each thread reads through its own lazily
    opened handles: a shared handle's seek + read would interleave) and picklable (handles are
    reopened in each process), so it serves as a Grain random-access data source.
    """

    def __init__(self, paths: str | Sequence[str], verify_crc: bool = True, parse: bool = True):
        self.paths = resolve_shards(paths)
        self.verify_crc, self.parse = verify_crc, parse
        self._index: list[np.ndarray | None] = []
        sizes = []
        for p in self.paths:
            if p.endswith(ARRAY_RECORD_EXT):
                from array_record.python.array_record_module import ArrayRecordReader

                r = ArrayRecordReader(p)
                sizes.append(r.num_records())
                r.close()
                self._index.append(None)
            else:
                ip = index_path_for(p)
                if not os.path.exists(ip):
                    raise FileNotFoundError(f"{p} has no offset index {ip} (build one with records.build_index)")
                idx = read_index(ip)
                sizes.append(len(idx))
                self._index.append(idx[:, 0].copy())
        self._starts = [0] + list(np.cumsum(sizes, dtype=np.int64).tolist())
        self._local = threading.local()

    @property
    def _handles(self) -> dict[int, Any]:
        """This thread's open shard handles."""
        h = getattr(self._local, "handles", None)
        if h is None:
            h = self._local.handles = {}
        return h

    def __len__(self) -> int:
        return self._starts[-1]

    def locate(self, i: int) -> tuple[int, int]:
        """Global index -> (shard number, index within the shard)."""
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"record {i} out of range for {n} records")
        s = bisect.bisect_right(self._starts, i) - 1
        return s, i - self._starts[s]

    def read_bytes(self, i: int) -> bytes:
        s, j = self.locate(int(i))
        h = self._handles.get(s)
        if self._index[s] is None:
            if h is None:
                from array_record.python.array_record_module import ArrayRecordReader

                h = self._handles[s] = ArrayRecordReader(self.paths[s])
            return h.read([j])[0]
        if h is None:
            h = self._handles[s] = open(self.paths[s], "rb")
        return _read_framed(h, int(self._index[s][j]), self.verify_crc, f"{self.paths[s]}[{j}]")

    def __getitem__(self, i: int) -> Record | bytes:
        data = self.read_bytes(i)
        return Record.from_bytes(data) if self.parse else data

    def close(self) -> None:
        """Close the calling thread's handles (other threads' close with their thread)."""
        handles = self._handles
        for h in handles.values():
            h.close()
        handles.clear()

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_local"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        common = os.path.commonpath(self.paths) if len(self.paths) > 1 else self.paths[0]
        return (f"RecordReader(paths={common!r}, shards={len(self.paths)}, records={len(self)}, "
                f"verify_crc={self.verify_crc}, parse={self.parse})")
