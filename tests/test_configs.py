"""The shipped gin experiments: what a user must give is `%gin.REQUIRED`, and leaving it out is one
clear line from `vrefer-train`, before anything starts."""

import glob
import os

import gin
import pytest

from vrefer_jax.training import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POD_EXPERIMENTS = sorted(glob.glob(os.path.join(ROOT, "configs/experiments/videorefer7b_*.gin")))
REQUIRED = {"DataConfig.train": "DataConfig.train = ('/data/rec/*.tfrecord',)",
            "DataConfig.tokenizer": "DataConfig.tokenizer = '/ckpt/tok'",
            "TrainConfig.init_from": "TrainConfig.init_from = '/ckpt/init'"}


@pytest.fixture(autouse=True)
def clear_gin():
    """A parsed experiment must not leak its bindings (LoaderConfig, ...) into later tests."""
    yield
    gin.clear_config()


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


def test_loader_bindings_per_scope(monkeypatch):
    """One LoaderConfig for both trainer loaders: unscoped bindings apply to both, `eval/` ones
    only to the eval loader; what the model fixes comes from the model config."""
    from data_pipeline.loader import LoaderConfig
    from vrefer_jax.config import model_config_from_gin
    from vrefer_jax.training import trainer

    cfg = model_config_from_gin([os.path.join(ROOT, "configs/models/tiny.gin")])
    gin.parse_config(["LoaderConfig.seq_len = 96", "LoaderConfig.overflow = 'skip'",
                      "eval/LoaderConfig.overflow = 'error'", "LoaderConfig.num_frames = 99"])
    got = {}
    monkeypatch.setattr("data_pipeline.loader.make_loader",
                        lambda sources, lcfg, tokenizer, weights: got.setdefault(sources[0], lcfg))
    for scope in ("train", "eval"):
        trainer._loader(scope, cfg, 4, 0, [scope], None)
    assert isinstance(got["train"], LoaderConfig) and got["train"].seq_len == got["eval"].seq_len == 96
    assert (got["train"].overflow, got["eval"].overflow) == ("skip", "error")
    assert got["train"].num_frames == cfg.num_frames  # fixed by the model
    gin.clear_config()
    with pytest.raises(trainer.ConfigError, match="seq_len"):
        trainer._loader("train", cfg, 4, 0, ["x"], None)
