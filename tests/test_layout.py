"""Issue 16 item 7: one job per file, one shard rule, one JSON writer, no misleading names."""

import importlib
import json
import math
import os
import re

import pytest

from vrefer_jax.json_files import write_json
from vrefer_jax.shard_ranges import shard_bounds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _official_get_chunk(lst, n, k):
    """The official eval scripts' split_list + get_chunk, verbatim in behaviour."""
    chunk_size = math.ceil(len(lst) / n) or 1  # (the official code fails on an empty list)
    chunks = [lst[i:i + chunk_size] for i in range(0, len(lst), chunk_size)]
    return chunks[k] if k < len(chunks) else []


@pytest.mark.parametrize("n", [0, 1, 2, 5, 7, 10, 33])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
def test_shard_bounds_both_roundings(n, k):
    items = list(range(n))
    ceil = [shard_bounds(n, i, k) for i in range(k)]
    assert [items[a:b] for a, b in ceil] == [_official_get_chunk(items, k, i) for i in range(k)]
    bal = [shard_bounds(n, i, k, rounding="balanced") for i in range(k)]
    assert [i * n // k for i in range(k)] == [a for a, _ in bal]  # the converter's old rule
    assert sum((b - a for a, b in bal)) == n and max(b - a for a, b in bal) - min(b - a for a, b in bal) <= 1
    assert all(a1 == b0 for (_, b0), (a1, _) in zip(bal, bal[1:]))


def test_shard_bounds_refuses_bad_arguments():
    for args, kw in [((5, 3, 3), {}), ((5, -1, 3), {}), ((5, 0, 0), {}), ((-1, 0, 1), {}),
                     ((5, 0, 2), {"rounding": "floor"})]:
        with pytest.raises(ValueError):
            shard_bounds(*args, **kw)


def test_write_json_is_atomic_and_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "sub" / "report.json"
    write_json(path, {"b": "é", "a": [1, 2]}, sort_keys=True)
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n") and text.index('"a"') < text.index('"b"') and "é" in text
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})  # not serialisable: the old file stays whole
    assert path.read_text(encoding="utf-8") == text
    assert os.listdir(path.parent) == ["report.json"]  # no temporary file left behind
    write_json(path, [1], indent=None)
    assert json.loads(path.read_text()) == [1]


def test_hf_config_json_goes_through_the_atomic_writer(tmp_path):
    from vrefer_jax.checkpoints import hf_config

    path = tmp_path / "config.json"
    hf_config.write_json(str(path), {"x": 1})
    with pytest.raises(TypeError):
        hf_config.write_json(str(path), {"x": object()})
    assert hf_config.read_json(str(path)) == {"x": 1} and path.read_text() == '{\n  "x": 1\n}\n'


def test_no_module_shadows_a_library_or_shares_a_class_name():
    assert importlib.util.find_spec("vrefer_jax.inference.requests") is None
    from vrefer_jax.evaluation import runner

    assert not hasattr(runner, "Predictor") and hasattr(runner, "AnswerSource")
    from vrefer_jax.training import flops

    assert not hasattr(flops, "device_peak_flops")  # dead code


def test_one_shard_rule_and_one_json_writer_in_the_source():
    hits = {"def shard_bounds": [], "def write_json": [], "def _write_json": [], "def _dump": []}
    for base in ("vrefer_jax", "data_pipeline"):
        for d, _, names in os.walk(os.path.join(ROOT, base)):
            for name in names:
                if name.endswith(".py"):
                    src = open(os.path.join(d, name), encoding="utf-8").read()
                    for key in hits:
                        if re.search(rf"^{key}\(", src, re.M):
                            hits[key].append(os.path.relpath(os.path.join(d, name), ROOT))
    assert hits["def shard_bounds"] == ["vrefer_jax/shard_ranges.py"]
    assert sorted(hits["def write_json"]) == ["vrefer_jax/checkpoints/hf_config.py", "vrefer_jax/json_files.py"]
    assert hits["def _write_json"] == [] and hits["def _dump"] == []


def test_source_comments_point_at_tests_that_exist():
    for rel in ("vrefer_jax/sharding.py",):
        src = open(os.path.join(ROOT, rel), encoding="utf-8").read()
        for ref in re.findall(r"tests/(test_\w+\.py)(?:::(\w+))?", src):
            path = os.path.join(ROOT, "tests", ref[0])
            assert os.path.exists(path), (rel, ref)
            if ref[1]:
                assert f"def {ref[1]}(" in open(path, encoding="utf-8").read(), (rel, ref)


def test_each_mcqa_benchmark_is_its_own_module():
    from vrefer_jax.evaluation import mcqa

    for name in mcqa.BENCHMARKS:
        mod = mcqa.benchmark_module(name)
        assert mod.__name__ == f"vrefer_jax.evaluation.{name}"
        assert callable(mod.load) and callable(mod.judge) and mod.GROUPS
    with pytest.raises(ValueError, match="unknown MCQA benchmark 'mmbench'"):
        mcqa.score([{"id": "a", "pred": "A"}], benchmark="mmbench")
    assert not any(hasattr(mcqa, n) for n in ("load_mvbench", "load_videomme", "load_perception_test", "LOADERS"))


def test_synthetic_is_a_package_of_single_job_modules(capsys):
    import data_pipeline.synthetic as pkg
    from data_pipeline import cli as data_cli
    from vrefer_jax.evaluation import attribute_score

    assert os.path.isdir(os.path.dirname(pkg.__file__)) and not os.path.exists(
        os.path.join(ROOT, "data_pipeline", "synthetic.py"))
    assert not hasattr(pkg, "generate") and not hasattr(pkg, "score_description")  # re-exports nothing
    for name in ("scene", "render", "captions", "questions", "samples", "tokenizer", "dataset"):
        importlib.import_module(f"data_pipeline.synthetic.{name}")
    assert attribute_score.score_description("A red circle moving left.",
                                             {"colour": "red", "shape": "circle", "motion": "left"})["score"] == 1
    # Bench-D scoring lives with the evaluation code, not in the data pipeline.
    for d, _, names in os.walk(os.path.join(ROOT, "data_pipeline")):
        for name in names:
            if name.endswith(".py"):
                assert "def score_description" not in open(os.path.join(d, name), encoding="utf-8").read(), name
    with pytest.raises(SystemExit) as e:
        data_cli.main(["synthetic", "--help"])
    assert e.value.code == 0 and "--train-videos" in capsys.readouterr().out
