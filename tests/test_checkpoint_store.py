"""Checkpoint I/O as a library (issue #16 item 4): imported folders restore straight into a target
with the parameter shardings (8 fake CPU devices, set by conftest), one device without a mesh."""

import json
import os
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from vrefer_jax.checkpoints import key_map, store
from vrefer_jax.config import model_config_from_gin
from vrefer_jax.models import videorefer
from vrefer_jax.sharding import logical_axis_rules

TINY = pathlib.Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny.gin"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An imported folder written from one device, and the values written."""
    cfg = model_config_from_gin([str(TINY)])
    params = jax.tree.map(np.asarray, videorefer.init_params(cfg, jax.random.PRNGKey(3)))
    out = str(tmp_path_factory.mktemp("store") / "ck")
    store.save_imported(out, cfg, params, None, None)
    return cfg, params, out


def mesh8():
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))


def assert_same_values(got, want):
    g, w = key_map.flatten_paths(got), key_map.flatten_paths(want)
    assert g.keys() == w.keys()
    for k in w:
        assert g[k].dtype == w[k].dtype, k
        np.testing.assert_array_equal(np.asarray(g[k]), w[k], err_msg="/".join(k))


def test_restore_on_8_devices_reads_the_target_shardings(saved, monkeypatch):
    assert len(jax.devices()) >= 8
    cfg, params, folder = saved
    mesh, rules = mesh8(), logical_axis_rules()
    want = key_map.flatten_paths(store.param_shardings(cfg, mesh, rules))
    targets = []
    real_restore = ocp.StandardCheckpointer.restore

    def spy(self, directory, target=None, *a, **k):  # what Orbax is asked to read, and into what
        targets.append(target)
        return real_restore(self, directory, target, *a, **k)

    monkeypatch.setattr(ocp.StandardCheckpointer, "restore", spy)
    cfg2, restored = store.load_imported(folder, mesh, rules)
    assert cfg2 == cfg
    # Orbax got abstract arrays carrying the requested shardings: each host reads its own shards
    (target,) = targets
    for k, t in key_map.flatten_paths(target).items():
        assert isinstance(t, jax.ShapeDtypeStruct) and t.sharding == want[k], k
    got = key_map.flatten_paths(restored)
    assert got.keys() == want.keys()
    for k, x in got.items():
        assert x.sharding.is_equivalent_to(want[k], x.ndim), (k, x.sharding, want[k])
    lm_head = restored["lm_head"]["kernel"]
    assert lm_head.sharding.spec == P("fsdp", "tensor") and len(lm_head.addressable_shards) == 8
    assert lm_head.addressable_shards[0].data.shape == (lm_head.shape[0] // 2, lm_head.shape[1] // 2)
    assert restored["llm"]["layers"]["mlp"]["gate_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    assert_same_values(restored, params)


def test_restore_without_mesh_is_one_device(saved):
    cfg, params, folder = saved
    _, restored = store.load_imported(folder)
    for x in jax.tree.leaves(restored):
        assert x.sharding.device_set == {jax.local_devices()[0]}
    assert_same_values(restored, params)


def test_trainer_init_from_restores_sharded(saved):
    """The trainer's `init_from` reads an imported folder into the state's parameter shardings."""
    from vrefer_jax.training import trainer

    cfg, params, folder = saved
    mesh, rules = mesh8(), logical_axis_rules()
    _, restored = trainer.load_init_params(folder, mesh, rules)
    want = key_map.flatten_paths(store.param_shardings(cfg, mesh, rules))
    for k, x in key_map.flatten_paths(restored).items():
        assert x.sharding.is_equivalent_to(want[k], x.ndim), k
    assert_same_values(restored, params)


def test_config_not_matching_params_is_refused(saved, tmp_path, capsys):
    """A model_config.json that does not describe params/: a clear error naming the folder and the
    parameter, one line from the CLI, not an Orbax traceback."""
    import shutil

    from vrefer_jax.checkpoints import cli

    _, _, folder = saved
    bad = str(tmp_path / "bad")
    shutil.copytree(folder, bad)
    path = os.path.join(bad, store.MODEL_CONFIG)
    d = json.load(open(path))
    d["text"]["vocab_size"] += 8
    json.dump(d, open(path, "w"))
    with pytest.raises(ValueError, match=r"bad: params/ does not match its model_config.json: .*"
                                         r"llm/embed_tokens/embedding has shape"):
        store.load_imported(bad, mesh8())
    assert cli.main(["export", bad, str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "lm_head/kernel" in err, err
    shutil.rmtree(os.path.join(bad, store.PARAMS))
    with pytest.raises(FileNotFoundError, match="no params/ folder"):
        store.load_imported(bad)
