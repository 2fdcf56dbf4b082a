"""TFDS datasets: prepared without TensorFlow, the converter's records and skips, and the loader
gives the same batches from the TFDS split as from the TFRecord shards of the same samples."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline import convert, inputs, records, tfds_data

pytest.importorskip("tensorflow_datasets")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = dict(num_frames=4, image_size=30, image_format="png")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A small synthetic set whose train JSON also holds a duplicate id and a media path outside the
    root (two skips), converted to TFRecord shards."""
    from data_pipeline.synthetic import dataset, scene

    d = str(tmp_path_factory.mktemp("synth"))
    dataset.generate(d, seed=5, train_videos=4, eval_videos=2, vocab_size=512,
                     cfg=scene.SynthConfig(num_frames=8, size=32, mask_frames=1))
    train = json.load(open(os.path.join(d, "train.json")))
    bad = dict(train[1], video="../outside.mp4", id="escape")
    train = train[:3] + [dict(train[0]), bad] + train[3:]
    with open(os.path.join(d, "train_mixed.json"), "w") as f:
        json.dump(train, f)
    convert.convert(inputs.load_entries(os.path.join(d, "train_mixed.json")), os.path.join(d, "rec"), media_root=d,
                    num_shards=2, config=convert.ConvertConfig(**CFG), prefix="train", progress=False,
                    source="train_mixed.json")
    return d


# Runs in a fresh interpreter of this venv, which has no TensorFlow (`pip install -e .` does not
# bring it): the import is asserted to fail first, and TensorFlow is still not loaded at the end.
PREPARE = """
import importlib.util, json, sys
if importlib.util.find_spec("tensorflow") is not None:
    print("TF_INSTALLED")
    sys.exit(0)
try:
    import tensorflow  # noqa: F401
    print("TF_IMPORTED")
except ImportError:
    print("TF_BLOCKED")
from data_pipeline import convert, tfds_data
d, data_dir = sys.argv[1], sys.argv[2]
cfg = convert.ConvertConfig(num_frames=4, image_size=30, image_format="png", output_format="array_record")
r = tfds_data.prepare("videorefer_synthetic", data_dir, {"train": d + "/train_mixed.json"}, media_root=d, config=cfg)
q = tfds_data.prepare("videorefer_bench_q", data_dir, {"test": d + "/bench_q.json"}, media_root=d, config=cfg)
dd = tfds_data.prepare("videorefer_bench_d", data_dir, {"test": d + "/bench_d.json"}, media_root=d, config=cfg)
print("REPORT", json.dumps({"train": r["train"], "q": q["test"]["written"], "d": dd["test"]["written"]}))
print("TF_LOADED" if any(m == "tensorflow" or m.startswith("tensorflow.") for m, v in sys.modules.items()
                         if v is not None) else "TF_NOT_LOADED")
"""


@pytest.fixture(scope="module")
def prepared(synth, tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    out = subprocess.run([sys.executable, "-c", PREPARE, synth, data_dir], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    if "TF_INSTALLED" in lines:
        pytest.skip("this venv has TensorFlow; the no-TensorFlow check needs one without it")
    assert "TF_BLOCKED" in lines and "TF_NOT_LOADED" in lines, out.stdout
    report = json.loads(next(x for x in lines if x.startswith("REPORT "))[7:])
    return data_dir, report


def test_prepares_without_tensorflow_with_the_converters_skips(synth, prepared):
    data_dir, report = prepared
    conv = json.load(open(os.path.join(synth, "rec", "train.report.json")))
    assert report["train"]["skipped"] == conv["skipped"] == {"duplicate_id": 1, "media_outside_root": 1}
    assert [(s["index"], s["id"], s["reason"]) for s in report["train"]["skips"]] == \
        [(s["index"], s["id"], s["reason"]) for s in conv["skips"]]
    assert report["train"]["written"] == conv["written"]
    assert report["q"] > 0 and report["d"] > 0
    files = os.listdir(os.path.join(data_dir, "videorefer_synthetic", tfds_data.DATASET_VERSION))
    assert any(".array_record" in f for f in files) and "train.report.json" in files


def test_records_equal_the_tfrecord_shards(synth, prepared):
    data_dir, _ = prepared
    tf = records.RecordReader(os.path.join(synth, "rec"))
    ds = tfds_data.TfdsRecords(f"tfds:{data_dir}/videorefer_synthetic:train")
    assert len(ds) == len(tf) > 0
    for i in range(len(tf)):
        assert ds[i] == tf[i], i
    # a version in the spec, and a clear error for a dataset that is not there
    assert len(tfds_data.TfdsRecords(f"tfds:{data_dir}/videorefer_synthetic/{tfds_data.DATASET_VERSION}:train")) == len(tf)
    with pytest.raises(FileNotFoundError, match="no prepared dataset"):
        tfds_data.TfdsRecords(f"tfds:{data_dir}/videorefer_train:train")
    with pytest.raises(ValueError, match="expected tfds:"):
        tfds_data.parse_source("tfds:nosplit")


def test_loader_gives_the_same_batches(synth, prepared):
    from data_pipeline.loader import LoaderConfig, make_loader
    from vrefer_jax.text.tokenizer import load_tokenizer

    data_dir, _ = prepared
    tok = load_tokenizer(os.path.join(synth, "tokenizer.json"))
    cfg = LoaderConfig(batch_size=2, seq_len=160, num_frames=4, image_size=30, grid=4, pad_token_id=0,
                       max_region_frames=2, max_objects=2, max_object_frames=1, overflow="skip", read_threads=1,
                       shuffle=True, seed=3, num_epochs=2, num_shards=1, shard_index=0)
    a = list(make_loader(os.path.join(synth, "rec", "train-*.tfrecord"), cfg, tok))
    b = list(make_loader(f"tfds:{data_dir}/videorefer_synthetic:train", cfg, tok))
    assert len(a) == len(b) > 1
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        for k in x:
            assert np.array_equal(np.asarray(x[k]), np.asarray(y[k])), k


def test_prefix_is_the_loaders():
    from data_pipeline import loader

    assert tfds_data.PREFIX == loader.TFDS_PREFIX


def test_setup_makes_tfds_a_dependency_without_tensorflow():
    text = open(os.path.join(ROOT, "setup.py")).read()
    assert '"tensorflow-datasets' in text and '"array-record' in text
    assert '"tensorflow>' not in text and '"tensorflow=' not in text and '"tensorflow"' not in text
