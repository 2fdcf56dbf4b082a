"""The shipped gin experiments: what a user must give is `%gin.REQUIRED`, and leaving it out is one
clear line from `vrefer-train`, before anything starts."""

import glob
import os

import pytest

from vrefer_jax.training import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POD_EXPERIMENTS = sorted(glob.glob(os.path.join(ROOT, "configs/experiments/videorefer7b_*.gin")))
REQUIRED = {"DataConfig.train": "DataConfig.train = ('/data/rec/*.tfrecord',)",
            "DataConfig.tokenizer": "DataConfig.tokenizer = '/ckpt/tok'",
            "TrainConfig.init_from": "TrainConfig.init_from = '/ckpt/init'"}


@pytest.mark.parametrize("path", POD_EXPERIMENTS, ids=os.path.basename)
def test_user_paths_are_required_not_placeholders(path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    argv = ["--gin_file", os.path.relpath(path, ROOT), "--workdir", "/tmp/never-used"]
    for missing in REQUIRED:  # each one alone is named, and nothing runs
        given = [x for k, v in REQUIRED.items() if k != missing for x in ("--gin_bindings", v)]
        assert cli.main(argv + given) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and missing in err[0] and "%gin.REQUIRED" in err[0]
    text = open(path).read()
    assert "YOUR_BUCKET" not in text and "experiment.workdir = %gin.REQUIRED" in text
    # without --workdir the workdir itself is what is missing
    given = [x for v in REQUIRED.values() for x in ("--gin_bindings", v)]
    assert cli.main(["--gin_file", os.path.relpath(path, ROOT)] + given) == 2
    assert "experiment.workdir" in capsys.readouterr().err


def test_each_experiment_kind_has_its_own_command(capsys, monkeypatch):
    """vrefer-train runs training experiments, vrefer-demo the main job; each names the other."""
    from vrefer_jax import main_job

    monkeypatch.chdir(ROOT)
    assert cli.main(["--gin_file", "configs/experiments/synthetic_tiny.gin"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vrefer-demo" in err[0]
    given = [x for v in REQUIRED.values() for x in ("--gin_bindings", v)]
    assert main_job.main(["--gin_file", os.path.relpath(POD_EXPERIMENTS[0], ROOT), "--workdir", "/tmp/x"] + given) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vrefer-train" in err[0]
    assert cli.main([]) == 2 and "give --gin_file" in capsys.readouterr().err
