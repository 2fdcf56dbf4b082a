"""`tf.train.Example` without TensorFlow: the message declared in a private protobuf descriptor pool
(package `vrefer_data.example`, so nothing clashes with TensorFlow's registered names), with
TensorFlow's field numbers and types (`tensorflow/core/example/{example,feature}.proto`), so the
bytes are TensorFlow's wire format."""

from __future__ import annotations

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory


def _example_classes() -> dict[str, type]:
    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="vrefer_data/example.proto", package="vrefer_data.example",
                                             syntax="proto3")

    def message(name, parent=None):
        m = (parent.nested_type if parent else fdp.message_type).add()
        m.name = name
        return m

    def field(m, name, number, ftype, label=F.LABEL_OPTIONAL, type_name=None, oneof=None, packed=False):
        f = m.field.add(name=name, number=number, type=ftype, label=label)
        if type_name:
            f.type_name = type_name
        if oneof is not None:
            f.oneof_index = oneof
        if packed:
            f.options.packed = True

    field(message("BytesList"), "value", 1, F.TYPE_BYTES, F.LABEL_REPEATED)
    field(message("FloatList"), "value", 1, F.TYPE_FLOAT, F.LABEL_REPEATED, packed=True)
    field(message("Int64List"), "value", 1, F.TYPE_INT64, F.LABEL_REPEATED, packed=True)
    feat = message("Feature")
    feat.oneof_decl.add(name="kind")
    for number, (kind, name) in enumerate((("bytes_list", "BytesList"), ("float_list", "FloatList"),
                                           ("int64_list", "Int64List")), start=1):
        field(feat, kind, number, F.TYPE_MESSAGE, type_name=f".vrefer_data.example.{name}", oneof=0)
    feats = message("Features")
    entry = message("FeatureEntry", feats)
    entry.options.map_entry = True
    field(entry, "key", 1, F.TYPE_STRING)
    field(entry, "value", 2, F.TYPE_MESSAGE, type_name=".vrefer_data.example.Feature")
    field(feats, "feature", 1, F.TYPE_MESSAGE, F.LABEL_REPEATED, type_name=".vrefer_data.example.Features.FeatureEntry")
    field(message("Example"), "features", 1, F.TYPE_MESSAGE, type_name=".vrefer_data.example.Features")

    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"vrefer_data.example.{n}"))
            for n in ("Example", "Feature", "Features", "BytesList", "Int64List", "FloatList")}


_PB = _example_classes()
Example = _PB["Example"]


def make_example(features: dict[str, list[bytes] | list[int] | bytes | int]) -> bytes:
    """{name: bytes | int | list of bytes | list of ints} -> serialized `tf.train.Example`."""
    ex = Example()
    fmap = ex.features.feature
    for name, value in features.items():
        if isinstance(value, (bytes, int, np.integer)):
            value = [value]
        value = list(value)
        if value and isinstance(value[0], (bytes, bytearray)):
            fmap[name].bytes_list.value.extend(value)
        else:  # ints; an empty list is stored as an empty int64 list
            fmap[name].int64_list.value.extend(int(v) for v in value)
    return ex.SerializeToString(deterministic=True)  # sorted map keys: byte-identical shards


def parse_example(data: bytes) -> dict[str, list]:
    """Serialized `tf.train.Example` -> {name: list of bytes | list of ints | list of floats}."""
    ex = Example()
    ex.ParseFromString(data)
    out = {}
    for name, feat in ex.features.feature.items():
        kind = feat.WhichOneof("kind")
        out[name] = list(getattr(feat, kind).value) if kind else []
    return out
