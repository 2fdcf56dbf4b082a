"""data_pipeline.records: Example layout, TFRecord framing (checked independently), random access."""

import pickle
import struct

import numpy as np
import pytest

from data_pipeline import masks, records as R

# ----------------------------------------------------------------------------- independent CRC32C

_POLY = 0x82F63B78  # Castagnoli, reflected
_TABLE = []
for _n in range(256):
    _c = _n
    for _ in range(8):
        _c = (_c >> 1) ^ _POLY if _c & 1 else _c >> 1
    _TABLE.append(_c)


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    c = _crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _parse_framing(blob: bytes):
    """Walk a TFRecord file by hand: (offset, payload) per record, all CRCs recomputed here."""
    out, off = [], 0
    while off < len(blob):
        header = blob[off:off + 8]
        (n,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", blob[off + 8:off + 12])[0] == _masked(header)
        data = blob[off + 12:off + 12 + n]
        assert struct.unpack("<I", blob[off + 12 + n:off + 16 + n])[0] == _masked(data)
        out.append((off, data))
        off += 16 + n
    assert off == len(blob)
    return out


# ----------------------------------------------------------------------------- helpers


def _record(i: int, n_objects: int = 2) -> R.Record:
    rs = np.random.RandomState(i)
    objs = []
    for k in range(n_objects):
        frames = tuple(int(f) for f in sorted(rs.choice(20, 2, replace=False)))
        ms = [rs.rand(6, 8) < 0.4 for _ in frames]
        objs.append(R.ObjectMasks(frames=frames, region_index=tuple(range(len(frames))), sizes=((6, 8),) * len(frames),
                                  rles=tuple(masks.encode_mask(m) for m in ms), null=(False, k == 1)))
    return R.Record(
        sample_id=f"s{i}", source="unit.json", index=i, modality="video", media=f"v{i}.mp4",
        conversations=({"from": "human", "value": "<video>\n<region> é"}, {"from": "gpt", "value": "ok"}),
        extra={"k": i}, orig_size=(6, 8), num_source_frames=20, stored_size=384, aspect="square",
        image_format="jpeg", frame_indices=(0, 0, 5), frames=(b"a" * i, b"b", b"\x00\xff"),
        region_frame_indices=(1, 5), region_frames=(b"r1", b"r5"), objects=tuple(objs))


def _write_shards(tmp_path, sizes):
    recs, paths, i = [], [], 0
    for s, n in enumerate(sizes):
        p = str(tmp_path / f"d-{s:05d}-of-{len(sizes):05d}.tfrecord")
        with R.TFRecordWriter(p, R.index_path_for(p)) as w:
            for _ in range(n):
                recs.append(_record(i))
                w.write(recs[-1].to_bytes())
                i += 1
        paths.append(p)
    return recs, paths


# ----------------------------------------------------------------------------- tests


def test_record_roundtrip_and_tf_example_compat():
    rec = _record(3)
    data = rec.to_bytes()
    back = R.Record.from_bytes(data)
    assert back == rec
    assert rec.to_bytes() == data  # deterministic serialisation
    m = back.objects[0].decode()
    assert m.shape == (2, 6, 8) and m.dtype == bool
    tfr = pytest.importorskip("tfrecord")
    from tfrecord import example_pb2  # TensorFlow's own Example proto, as the tfrecord package ships it

    ex = example_pb2.Example()
    ex.ParseFromString(data)
    f = ex.features.feature
    assert f["id"].bytes_list.value == [b"s3"]
    assert list(f["frame_indices"].int64_list.value) == [0, 0, 5]
    assert list(f["object_num_masks"].int64_list.value) == [2, 2]
    assert f["mask_rle"].bytes_list.value[0] == rec.objects[0].rles[0]
    assert tfr is not None


def test_tfrecord_framing_and_index_independently_checked(tmp_path):
    recs, paths = _write_shards(tmp_path, [4])
    blob = open(paths[0], "rb").read()
    framed = _parse_framing(blob)  # CRCs recomputed with the table implementation above
    assert [R.Record.from_bytes(d) for _, d in framed] == recs
    idx = R.read_index(R.index_path_for(paths[0]))
    assert idx[:, 0].tolist() == [o for o, _ in framed]
    assert idx[:, 1].tolist() == [len(d) + 16 for _, d in framed]
    np.testing.assert_array_equal(R.build_index(paths[0]), idx)
    pytest.importorskip("tfrecord")
    from tfrecord.reader import tfrecord_iterator
    from tfrecord.tools.tfrecord2idx import create_index

    ref_index = str(tmp_path / "ref.index")
    create_index(paths[0], ref_index)
    assert open(ref_index).read() == open(R.index_path_for(paths[0])).read()
    assert [bytes(b) for b in tfrecord_iterator(paths[0])] == [d for _, d in framed]


def test_reads_files_written_by_the_tfrecord_package(tmp_path):
    pytest.importorskip("tfrecord")
    from tfrecord.tools.tfrecord2idx import create_index
    from tfrecord.writer import TFRecordWriter

    p = str(tmp_path / "foreign.tfrecord")
    w = TFRecordWriter(p)
    w.write({"id": (b"x", "byte"), "frame_indices": ([1, 2, 3], "int")})
    w.write({"id": (b"y", "byte"), "frame_indices": ([4], "int")})
    w.close()
    create_index(p, R.index_path_for(p))
    reader = R.RecordReader(p, parse=False)
    assert len(reader) == 2
    assert R.parse_example(reader[1]) == {"id": [b"y"], "frame_indices": [4]}
    assert R.Record.from_bytes(reader[0]).frame_indices == (1, 2, 3)


def test_random_access_across_shards(tmp_path):
    recs, paths = _write_shards(tmp_path, [3, 0, 5, 1])
    reader = R.RecordReader(str(tmp_path))
    assert reader.paths == sorted(paths) and len(reader) == 9
    order = np.random.RandomState(0).permutation(9)
    for i in order:
        assert reader[int(i)] == recs[i]
    assert reader[-1] == recs[-1]
    assert reader.locate(3) == (2, 0) and reader.locate(8) == (3, 0)
    with pytest.raises(IndexError):
        reader[9]
    clone = pickle.loads(pickle.dumps(reader))
    assert len(clone) == 9 and clone[7] == recs[7]
    assert "shards=4" in repr(reader) and "records=9" in repr(reader)
    assert R.RecordReader(paths[2:]).__getitem__(0) == recs[3]  # a list of files
    assert len(R.RecordReader(str(tmp_path / "*-00000-of-*.tfrecord"))) == 3  # a glob


def test_concurrent_reads_from_threads(tmp_path):
    """Grain reads a source from several threads: one shared reader must stay correct."""
    from concurrent.futures import ThreadPoolExecutor

    recs, _ = _write_shards(tmp_path, [40, 40])
    reader = R.RecordReader(str(tmp_path))
    order = [int(i) for i in np.random.RandomState(1).randint(0, 80, size=2000)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(reader.__getitem__, order))
    assert all(g == recs[i] for g, i in zip(got, order))


def test_corruption_and_missing_index_are_errors(tmp_path):
    recs, paths = _write_shards(tmp_path, [3])
    blob = bytearray(open(paths[0], "rb").read())
    off = int(R.read_index(R.index_path_for(paths[0]))[1, 0])
    blob[off + 20] ^= 0xFF
    open(paths[0], "wb").write(bytes(blob))
    reader = R.RecordReader(paths)
    assert reader[0] == recs[0]
    with pytest.raises(R.RecordError, match="CRC"):
        reader[1]
    assert R.RecordReader(paths, verify_crc=False, parse=False)[1] != recs[1].to_bytes()
    lone = tmp_path / "lone.tfrecord"
    lone.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="offset index"):
        R.RecordReader(str(lone))
    with pytest.raises(FileNotFoundError):
        R.RecordReader(str(tmp_path / "empty_dir_*"))


def test_array_record_output(tmp_path):
    pytest.importorskip("array_record")
    recs = [_record(i) for i in range(5)]
    p = str(tmp_path / "d-00000-of-00001.array_record")
    with R.ArrayRecordWriter(p) as w:
        for r in recs:
            w.write(r.to_bytes())
    reader = R.RecordReader(str(tmp_path))
    assert len(reader) == 5 and reader[3] == recs[3]
    assert pickle.loads(pickle.dumps(reader))[4] == recs[4]
