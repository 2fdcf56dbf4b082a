"""Training checkpoints and re-runs: corrupt steps fall back to the newest intact one, special ids
are checked against the tokenizer, a finished run re-run is a no-op, an extended run replaces
final/, and metrics.jsonl keeps one line per step across resumes."""

import dataclasses
import json
import logging
import os
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_train import _configs, _train, records  # noqa: F401  (records is a fixture)
from vrefer_jax.training import checkpointing, trainer
from vrefer_jax.training.checkpointing import MANIFEST, Checkpointer, CheckpointError

CKPT_LOG = "vrefer_jax.training.checkpointing"


def _state(step):
    return {"w": jnp.arange(4096.0) * step, "b": {"x": jnp.ones((64, 64)) * step}}


def _abstract():
    sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), _state(1))


def _data_iter():
    return iter(grain.MapDataset.range(100).to_iter_dataset())


def _two_steps(d, manifests=True):
    """Steps 1 and 2 saved (the iterator one element further at each); returns the folder."""
    ck = Checkpointer(d, save_every=1, keep_last=3)
    it = _data_iter()
    for step in (1, 2):
        next(it)
        ck.save(step, _state(step), it, {"step": step})
    ck.close()
    if not manifests:
        for step in (1, 2):
            os.remove(os.path.join(d, str(step), MANIFEST))
    return d


def _array_file(step_dir):
    """The largest file of the state item: array bytes."""
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
    return max(files, key=os.path.getsize)


def _flip(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x10]))


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


CORRUPTIONS = {
    "flipped_array_byte": lambda s: _flip(_array_file(s)),
    "truncated_metadata": lambda s: _truncate(os.path.join(s, "state", "_METADATA")),
    "truncated_array_file": lambda s: _truncate(_array_file(s)),
    "truncated_data_file": lambda s: _truncate(os.path.join(s, "data", "process_0-of-1.json")),
    "deleted_file": lambda s: os.remove(_array_file(s)),
}


def _restore(d):
    ck = Checkpointer(d, save_every=1, keep_last=3)
    it = _data_iter()
    try:
        state, meta = ck.restore(_abstract(), it)
        return ck, state, meta, it
    except BaseException:
        ck.close()
        raise


def _corrupt_lines(caplog, step):
    return [r for r in caplog.records if r.name == CKPT_LOG and r.levelno >= logging.WARNING
            and f"checkpoint step {step} " in r.getMessage()]


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_latest_step_falls_back_to_previous(tmp_path, caplog, capfd, kind):
    d = _two_steps(str(tmp_path / "ckpt"))
    CORRUPTIONS[kind](os.path.join(d, "2"))
    capfd.readouterr()
    with caplog.at_level(logging.INFO):
        ck, state, meta, it = _restore(d)
    assert meta["step"] == 1
    assert np.array_equal(np.asarray(state["w"]), np.arange(4096.0))
    assert next(it) == 1  # the iterator restored to step 1's position
    lines = _corrupt_lines(caplog, 2)
    assert len(lines) == 1 and d in lines[0].getMessage(), [r.getMessage() for r in caplog.records]
    assert not [r for r in caplog.records if r.exc_info]
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Event loop is closed" not in err, err[-2000:]
    # the corrupt step is moved aside, so the run can save step 2 again
    assert ck.manager.all_steps() == [1] and os.path.isdir(d + ".corrupt/2")
    assert ck.save(2, _state(2), it, {"step": 2}, force=True)
    ck.close()
    assert checkpointing.verify_step(os.path.join(d, "2")) is None


def test_intact_steps_have_manifests_and_restore_the_latest(tmp_path, caplog):
    d = _two_steps(str(tmp_path / "ckpt"))
    for s in ("1", "2"):
        assert os.path.isfile(os.path.join(d, s, MANIFEST))
    with caplog.at_level(logging.WARNING):
        ck, state, meta, _ = _restore(d)
    ck.close()
    assert meta["step"] == 2 and not caplog.records


@pytest.mark.parametrize("kind", ["truncated_metadata", "truncated_array_file", "truncated_data_file", "deleted_file"])
def test_steps_without_manifest_restore_unverified_and_still_fall_back(tmp_path, caplog, kind):
    """Steps from before manifests: an intact one restores; one Orbax cannot read falls back with
    one log line. (A flipped byte in such a step cannot be seen: it restores.)"""
    d = _two_steps(str(tmp_path / "ckpt"), manifests=False)
    ck, _, meta, _ = _restore(d)
    ck.close()
    assert meta["step"] == 2
    CORRUPTIONS[kind](os.path.join(d, "2"))
    with caplog.at_level(logging.WARNING):
        ck, _, meta, _ = _restore(d)
    ck.close()
    assert meta["step"] == 1 and len(_corrupt_lines(caplog, 2)) == 1
    assert not [r for r in caplog.records if r.exc_info]


LEGACY_RESTORES = r"""
import os, shutil, sys
import test_train_checkpoints as T
for i, kind in enumerate(["truncated_array_file", "deleted_file"] * 3):
    d = os.path.join(sys.argv[1], str(i))
    T._two_steps(d, manifests=False)
    T.CORRUPTIONS[kind](os.path.join(d, "2"))
    ck, _, meta, _ = T._restore(d)
    ck.close()
    assert meta["step"] == 1
print("ok")
"""


def test_failed_restores_leave_no_tracebacks_at_exit(tmp_path):
    """Orbax's abandoned reads of a step without manifest that failed to restore used to print
    "Exception ignored" tracebacks when collected, often only at exit: run failed restores in a
    child and read its stderr."""
    import subprocess

    from test_train import ROOT

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-c", LEGACY_RESTORES, str(tmp_path)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-3000:]
    # (TensorStore may still print one "Event loop is closed" traceback from its own thread for a
    # step without manifest; steps with one are refused before anything is read.)
    assert "Exception ignored" not in p.stderr, p.stderr[-3000:]


def test_no_intact_step_is_one_clear_error(tmp_path, caplog):
    d = _two_steps(str(tmp_path / "ckpt"))
    for s in ("1", "2"):
        _flip(_array_file(os.path.join(d, s)))
    with caplog.at_level(logging.WARNING), pytest.raises(CheckpointError, match="no intact checkpoint") as e:
        _restore(d)
    assert "step 2:" in str(e.value) and "step 1:" in str(e.value)
    assert sorted(os.listdir(d)) == ["1", "2"]  # nothing moved when nothing could be restored


# ----------------------------------------------------------------------------- through the trainer


def test_trainer_resumes_from_previous_step_when_latest_is_corrupt(records, tmp_path, caplog, capfd):  # noqa: F811
    w = str(tmp_path / "run")
    _train(w, records, 4)  # checkpoints 2 and 4
    _flip(_array_file(os.path.join(w, "checkpoints", "4")))
    capfd.readouterr()
    steps = []
    with caplog.at_level(logging.INFO):
        out = _train(w, records, 6, on_step=lambda s, m: steps.append(s))
    assert steps == [3, 4, 5, 6] and out["step"] == 6
    assert len(_corrupt_lines(caplog, 4)) == 1
    assert "Traceback" not in capfd.readouterr().err
    assert sorted(int(s) for s in os.listdir(os.path.join(w, "checkpoints")) if s.isdigit()) == [4, 6]


def test_special_ids_must_match_the_tokenizer(records, tmp_path):  # noqa: F811
    """A region id that is an ordinary text token (or a pad id that is not the tokenizer's) is
    refused before anything trains, naming both ids."""
    cfg, data, opt, step, tok = _configs(records)
    tc = trainer.TrainConfig(total_steps=1, global_batch_size=4, progress_bar=False, save_final=False)
    other = tok.encode("red")[0]
    bad = {"region_token_id": cfg.replace(region_token_id=other), "pad_token_id": cfg.replace(pad_token_id=other),
           "vocab_size": cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=16))}
    for field, c in bad.items():
        with pytest.raises(trainer.ConfigError, match=field):
            trainer.train(str(tmp_path / field), model_cfg=c, data_cfg=data, train_cfg=tc, opt_cfg=opt,
                          step_cfg=step, tokenizer=tok)
    assert f"is {tok.region_id}" in str(pytest.raises(trainer.ConfigError, trainer.check_special_ids,
                                                      bad["region_token_id"], tok).value)
    trainer.check_special_ids(cfg, tok)  # the matching config passes


def _metric_steps(w):
    return [json.loads(line)["step"] for line in open(os.path.join(w, "metrics.jsonl"))]


def test_rerun_is_a_noop_and_extension_replaces_final(records, tmp_path, caplog):  # noqa: F811
    from vrefer_jax.checkpoints.store import load_imported

    w = str(tmp_path / "run")
    first = _train(w, records, 4, eval_every=2)
    assert not first["already_done"]
    stamp = os.path.getmtime(os.path.join(w, "final", "model_config.json"))
    steps = []
    with caplog.at_level(logging.INFO):
        again = _train(w, records, 4, eval_every=2, on_step=lambda s, m: steps.append(s))
    assert again["already_done"] and again["step"] == 4 and steps == []
    assert any("already finished at step 4" in r.getMessage() for r in caplog.records)
    assert os.path.getmtime(os.path.join(w, "final", "model_config.json")) == stamp
    assert [h["step"] for h in again["history"]] == [1, 2, 3, 4]

    # a run killed after its step-4 checkpoint had logged steps 5-6 (and half a line)
    with open(os.path.join(w, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 5, "loss": -1.0}) + "\n" + json.dumps({"step": 6, "loss": -1.0}) + "\n{\"st")
    more = _train(w, records, 6, eval_every=2)
    assert more["step"] == 6 and not more["already_done"]
    _, params = load_imported(os.path.join(w, "final"))
    a, b = jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, more["state"].params)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert not os.path.exists(os.path.join(w, "final.partial")) and not os.path.exists(os.path.join(w, "final.old"))

    # one line per step; an eval's loss is on its step's line; the stale lines were replaced
    assert _metric_steps(w) == [1, 2, 3, 4, 5, 6]
    rows = [json.loads(line) for line in open(os.path.join(w, "metrics.jsonl"))]
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4, 6]
    assert all("loss" in r and r["loss"] > 0 for r in rows)

    # --no-resume on it is refused before anything (metrics included) is touched
    with pytest.raises(trainer.ConfigError, match="holds checkpoints up to step 6"):
        _train(w, records, 6, resume=False)
    assert _metric_steps(w) == [1, 2, 3, 4, 5, 6]


def test_metrics_log_merges_and_drops_later_steps(tmp_path):
    p = str(tmp_path / "metrics.jsonl")
    with open(p, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in ({"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0},
                                                   {"step": 2, "eval_loss": 2.5}, {"step": 3, "loss": 1.0}))
        f.write('{"step": 4, "lo')
    m = trainer.MetricsLog(p, start=2)
    assert trainer.MetricsLog.read(p) == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0, "eval_loss": 2.5}]
    m.write({"step": 3, "loss": 0.5})
    m.write({"step": 3, "eval_loss": 0.7})
    m.write({"step": 4, "loss": 0.4})
    assert [json.loads(line) for line in open(p)][2:] == [{"step": 3, "loss": 0.5, "eval_loss": 0.7},
                                                         {"step": 4, "loss": 0.4}]


def test_cli_refuses_mismatched_special_ids_in_one_line(records, tmp_path, capsys):  # noqa: F811
    """configs/models/tiny.gin's region id 511 is an ordinary token of the synthetic tokenizer."""
    import gin

    from test_train import ROOT
    from vrefer_jax.training import cli

    rec = os.path.join(records, "rec", "train-*.tfrecord")
    try:
        rc = cli.main(["--gin_file", os.path.join(ROOT, "configs/models/tiny.gin"), "--workdir", str(tmp_path / "w"),
                       "--gin_bindings", "experiment.kind = 'train'",
                       "--gin_bindings", f"DataConfig.train = ('{rec}',)",
                       "--gin_bindings", f"DataConfig.tokenizer = '{os.path.join(records, 'tokenizer.json')}'",
                       "--gin_bindings", "TrainConfig.total_steps = 1"])
    finally:
        gin.clear_config()
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "region_token_id is 511" in err, err


TWO_PROCESS_RESUME = r"""
import json, sys
from vrefer_jax.distributed import maybe_initialize_distributed
maybe_initialize_distributed()
import jax
import test_train
out = test_train._train(sys.argv[2], sys.argv[1], int(sys.argv[3]), mesh=(4, 1, 1))
json.dump({"step": out["step"], "steps": [h["step"] for h in out["history"]]}, open(sys.argv[4], "w"))
"""


def _two_processes(records, w, steps, tmp_path):  # noqa: F811
    from test_train import run_two_processes

    outs = run_two_processes(TWO_PROCESS_RESUME, lambda pid: [records, w, str(steps), str(tmp_path / f"out{pid}.json")])
    return [json.load(open(tmp_path / f"out{i}.json")) for i in range(2)], outs


def test_two_process_fallback_and_extension(records, tmp_path):  # noqa: F811
    """Two jax.distributed processes: manifests come from process 0, both processes fall back to
    the same intact step, and final/ is replaced once both are done."""
    w = str(tmp_path / "run")
    (r0, r1), _ = _two_processes(records, w, 4, tmp_path)
    assert r0["step"] == r1["step"] == 4
    for s in ("2", "4"):
        assert checkpointing.verify_step(os.path.join(w, "checkpoints", s)) is None
        assert os.path.isfile(os.path.join(w, "checkpoints", s, MANIFEST))
    _flip(_array_file(os.path.join(w, "checkpoints", "4")))
    (r0, r1), outs = _two_processes(records, w, 6, tmp_path)
    assert r0 == r1 == {"step": 6, "steps": [3, 4, 5, 6]}
    assert "checkpoint step 4 " in outs[0] and "Traceback" not in outs[0] + outs[1]
    assert os.path.isdir(os.path.join(w, "final", "params")) and not os.path.exists(os.path.join(w, "final.old"))
