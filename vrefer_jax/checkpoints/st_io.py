"""Safetensors checkpoints, one tensor at a time: a lazy reader and a streaming shard writer.

Reader: a folder with `model.safetensors.index.json` + shards, a folder with `model.safetensors`
(or exactly one `*.safetensors`), or a single file. Every `get` opens the file, copies that one
tensor out and closes it again, so no mapping of a whole shard stays resident.

Writer: the header is computed from the tensor list (names, shapes, dtypes) before any data exists,
then each tensor is produced, written and dropped, so a shard never has to be held in memory. The
files follow the safetensors format (8-byte little-endian header length, JSON header padded with
spaces to 8 bytes, then the raw little-endian data in header order) with `{"format": "pt"}` metadata,
which `transformers` expects.
"""

from __future__ import annotations

import glob
import json
import os
import re
import struct
import sys
from collections.abc import Callable, Iterable, Sequence

import ml_dtypes
import numpy as np

from vrefer_jax.json_files import write_json

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_CODES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _CODES.items()}


def dtype_code(dtype) -> str:
    """numpy dtype -> safetensors dtype string ("F16", "BF16", ...)."""
    try:
        return _NAMES[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors") from None


def parse_size(size: int | str) -> int:
    """"5GB" -> 5 * 10**9, "500MiB" -> 500 * 2**20, ints unchanged (the `transformers` convention)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {size!r} (use e.g. 5GB, 500MB, 2GiB or a byte count)")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0]) if unit[0] != "B" else 0
    return int(float(m.group(1)) * base ** power)


class SafetensorsReader:
    """Lazy access to the tensors of a checkpoint folder or file (see module docstring)."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, INDEX_NAME)
        if os.path.isdir(path) and os.path.isfile(index):
            self._file = read_index(path)
            return
        if os.path.isdir(path):
            single = os.path.join(path, SINGLE_NAME)
            files = [single] if os.path.isfile(single) else sorted(glob.glob(os.path.join(path, "*.safetensors")))
            if not files:
                raise FileNotFoundError(f"no {INDEX_NAME} and no *.safetensors in {path}")
        elif os.path.isfile(path):
            files = [path]
        else:
            raise FileNotFoundError(path)
        self._file = {}
        for fname in files:
            for k in read_header(fname):
                if k in self._file:
                    raise ValueError(f"tensor {k!r} is stored in both {self._file[k]} and {fname}")
                self._file[k] = fname

    def keys(self) -> list[str]:
        return list(self._file)

    def __contains__(self, name: str) -> bool:
        return name in self._file

    def file_of(self, name: str) -> str:
        return self._file[name]

    def get(self, name: str, rows: int | None = None) -> np.ndarray:
        """One tensor (only its first `rows` rows when given). KeyError if absent."""
        from safetensors import safe_open

        fname = self._file[name]
        with safe_open(fname, framework="numpy") as f:
            if rows is None:
                return f.get_tensor(name)
            return f.get_slice(name)[:rows]

    def shape(self, name: str) -> tuple[int, ...]:
        from safetensors import safe_open

        with safe_open(self._file[name], framework="numpy") as f:
            return tuple(f.get_slice(name).get_shape())


def read_index(folder: str) -> dict[str, str]:
    """tensor name -> shard path from `folder`'s index. Shard names come from the file, so each is
    resolved inside `folder` (`paths.resolve_under`): a `../` or absolute entry raises
    `PathOutsideRoot` (reason `media_outside_root`) naming the index file and the entry; a
    malformed index raises ValueError naming the index file."""
    from vrefer_jax.paths import PathOutsideRoot, resolve_under

    index = os.path.join(folder, INDEX_NAME)
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a safetensors index with a weight_map ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: weight_map must be an object of tensor name -> shard file")
    out = {}
    for name, shard in weight_map.items():
        try:
            out[name] = resolve_under(folder, shard)
        except PathOutsideRoot as e:
            err = PathOutsideRoot(str(shard), folder, f"(weight_map entry {name!r} of {index}) leaves the "
                                  "checkpoint folder or is absolute")
            raise err from e
    return out


def read_header(fname: str) -> dict:
    """The JSON header of one safetensors file (tensor name -> dtype/shape/offsets), no metadata."""
    with open(fname, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


# ----------------------------------------------------------------------------- writing


def write_file(
    fname: str,
    entries: Sequence[tuple[str, tuple[int, ...], np.dtype]],
    produce: Callable[[str], np.ndarray],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write one safetensors file; `produce(name)` is called once per entry, in order.

    Returns the number of data bytes written.
    """
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dtype in entries:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": dtype_code(dtype), "shape": [int(s) for s in shape],
                        "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    tmp = fname + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype in entries:
            x = np.asarray(produce(name))
            if tuple(x.shape) != tuple(shape) or x.dtype != np.dtype(dtype):
                raise ValueError(f"{name}: produced {x.dtype}{list(x.shape)}, planned {np.dtype(dtype)}{list(shape)}")
            if sys.byteorder != "little":
                x = x.astype(x.dtype.newbyteorder("<"))
            f.write(np.ascontiguousarray(x).reshape(-1).view(np.uint8))
            del x
    os.replace(tmp, fname)
    return offset


def plan_shards(entries: Iterable[tuple[str, tuple[int, ...], np.dtype]], max_bytes: int) -> list[list]:
    """Greedy packing in the given order; a tensor larger than `max_bytes` gets a shard of its own."""
    shards: list[list] = [[]]
    size = 0
    for e in entries:
        n = int(np.prod(e[1], dtype=np.int64)) * np.dtype(e[2]).itemsize
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    return shards if shards[0] else []


def shard_file_names(n: int) -> list[str]:
    """`model.safetensors` for one shard, else `model-00001-of-0000n.safetensors`, ..."""
    if n == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_checkpoint(
    folder: str,
    entries: Sequence[tuple[str, tuple[int, ...], np.dtype]],
    produce: Callable[[str], np.ndarray],
    max_shard_size: int | str = "5GB",
) -> dict[str, str]:
    """Write `entries` as shards (+ the index when more than one) into `folder`.

    Returns the weight map (tensor name -> file name).
    """
    os.makedirs(folder, exist_ok=True)
    shards = plan_shards(entries, parse_size(max_shard_size))
    names = shard_file_names(len(shards))
    weight_map: dict[str, str] = {}
    total = 0
    for fname, shard in zip(names, shards):
        total += write_file(os.path.join(folder, fname), shard, produce)
        weight_map.update({e[0]: fname for e in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        write_json(os.path.join(folder, INDEX_NAME), index, indent=2)  # atomic: no half-written index
    return weight_map
