"""Ahead-of-time memory check (vrefer_jax/training/aot.py) on the tiny config and 8 fake CPU devices."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vrefer_jax.config import model_config_from_gin
from vrefer_jax import batch as batch_lib
from vrefer_jax.models import videorefer
from vrefer_jax.sharding import logical_axis_rules
from vrefer_jax.training import aot, train_state
from vrefer_jax.sharding import MeshConfig, make_mesh
from vrefer_jax.training.optimizer import OptimizerConfig, make_optimizer
from vrefer_jax.training.stages import stage_file, stage_trainable

TINY = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny.gin")


@pytest.fixture(scope="module")
def cfg():
    return model_config_from_gin([TINY]).replace(remat_policy="full")


def test_parse_target():
    t = aot.parse_target("v5p-64")
    assert (t.platform, t.num_devices, t.hbm_gib) == ("tpu", 32, 95.0)
    assert aot.parse_target("v5e-16").num_devices == 16 and aot.parse_target("v5e-16").hbm_gib == 16.0
    assert aot.parse_target("v4-32").num_devices == 16
    t = aot.parse_target("8xH100")
    assert (t.platform, t.num_devices, t.hbm_gib) == ("gpu", 8, 80.0)
    with pytest.raises(ValueError, match="unknown target"):
        aot.parse_target("tpu-9000")


def test_compile_and_report(cfg):
    """(2, 2, 2) mesh, global batch 8 = 4 batch shards x 2 = accum 2 x micro-batch 1."""
    assert len(jax.devices("cpu")) >= 8, "conftest sets 8 fake CPU devices"
    r = aot.check(cfg, aot.parse_target("cpu-8"), global_batch=8, seq_len=64, stage="stage3", micro_batch=1,
                  mesh="2,2,2", log=lambda *_: None)
    assert r["mesh"] == (2, 2, 2) and r["accum_steps"] == 2
    c, a = r["compiled"], r["analytic"]
    print({k: v for k, v in c.items()}, f"compile {r['times']['compile_s']:.1f} s")
    for k in ("arguments", "outputs", "temporaries", "total"):
        assert c[k] > 0, k
    assert c["aliased"] > 0  # the state is donated
    # Arguments = this device's state shard + batch shard (+ the rng / step scalars).
    state_dev = r["state_bytes"]["params_per_device"] + r["state_bytes"]["opt_state_per_device"]
    assert state_dev + a["batch"] <= c["arguments"] <= state_dev + a["batch"] + 4096

    # Analytic parameter / optimizer bytes equal the state's leaf sizes exactly.
    s = r["state_bytes"]
    assert a["master_params_global"] == s["params_global"]
    assert s["opt_state_global"] == a["adam_moments_global"] + a["opt_scalars"]  # scalars: replicated
    assert a["master_params"] == s["params_per_device"]
    assert a["adam_moments"] + a["opt_scalars"] == s["opt_state_per_device"]
    txt = aot.format_report(r)
    assert "approximate" in txt and "fake CPU devices" in txt
    print(txt)


@pytest.mark.parametrize("stage", ["stage2", "stage3"])
def test_analytic_bytes_exact(cfg, stage):
    """Parameter count x 4 bytes and 2 x trainable count x 4 bytes == sums over the abstract state,
    globally and per device (shard shapes over a (1, 8, 1) mesh computed here independently)."""
    trainable = stage_trainable(stage)
    mesh = make_mesh(MeshConfig(1, 8, 1), jax.devices("cpu")[:8])
    tx, _ = make_optimizer(OptimizerConfig(trainable=trainable), total_steps=10)
    state = train_state.abstract_unboxed(cfg, tx, train_state.state_shardings(cfg, tx, mesh, logical_axis_rules()))
    batch = aot.batch_shapes(cfg, 8, 64)
    a = aot.analytic_memory(cfg, state, trainable, batch, 8, 8, micro_batch=1, seq_len=64)

    params = jax.tree.leaves(state.params)
    opt = jax.tree.leaves(state.opt_state)
    n_total = sum(int(np.prod(x.shape)) for x in params)
    n_train = sum(videorefer.count_params(state.params[g]) for g in trainable)
    assert a["params_total"] == n_total and a["params_trainable"] == n_train
    assert a["master_params_global"] == sum(x.size * x.dtype.itemsize for x in params) == 4 * n_total
    moments = [x for x in opt if x.ndim > 0]
    assert a["adam_moments_global"] == sum(x.size * x.dtype.itemsize for x in moments) == 8 * n_train
    shard = lambda x: int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize  # noqa: E731
    assert a["master_params"] == sum(shard(x) for x in params)
    assert a["adam_moments"] == sum(shard(x) for x in moments)
    assert a["master_params"] < a["master_params_global"]  # something is sharded over fsdp
    print(stage, {k: a[k] for k in ("master_params_global", "master_params", "adam_moments_global", "adam_moments")})


def test_with_depth(cfg):
    small = aot.with_depth(cfg, 1, 1)
    assert small.text.num_hidden_layers == 1 and small.vision.num_layers_run == 1
    assert small.vision.select_layer == cfg.vision.select_layer


def test_stages_are_read_from_their_gin_files(tmp_path):
    """The stage recipes live only in configs/stages: includes followed, later bindings win."""
    assert stage_trainable("stage2") == ("region_encoder",)
    assert stage_trainable("stage2.5") == stage_trainable("stage2_5") == ("mm_projector", "region_encoder", "llm",
                                                                          "lm_head")
    assert stage_trainable("stage3") == stage_trainable("stage2_5")  # stage3 includes stage2_5
    custom = tmp_path / "llm_only.gin"
    custom.write_text("include 'configs/stages/stage2.gin'\nOptimizerConfig.trainable = ('llm',)\n")
    assert stage_trainable(str(custom)) == ("llm",)
    with pytest.raises(ValueError, match="unknown stage"):
        stage_file("stage9")


def test_inference_compile_and_report(cfg):
    """Generation compiled on a (1, 4, 2) mesh of fake devices: parameters split 8 ways (fsdp x
    tensor), the report's figures consistent with the abstract inputs."""
    from vrefer_jax.inference import aot as inf_aot
    from vrefer_jax.models import qwen2

    r = inf_aot.check(cfg, aot.parse_target("cpu-8"), batch=8, text_len=32, new_tokens=8, mesh=(1, 4, 2),
                      param_dtype="float32", log=lambda *_: None)
    assert r["out_len"] == 32 + batch_lib.model_video_tokens(cfg) + cfg.object_encoder.region_token_num
    assert r["params_global"] == 4 * videorefer.count_params(videorefer.abstract_params(cfg))
    assert r["params_global"] / 8 <= r["params_per_device"] < r["params_global"] / 2
    assert r["compiled"]["arguments"] >= r["params_per_device"] and r["compiled"]["total"] > 0
    cache = qwen2.init_cache(cfg.text, 8, r["out_len"] + 8, jnp.float32)
    assert r["kv_cache_global"] == cache.k.nbytes + cache.v.nbytes
    assert "generation, batch 8" in inf_aot.format_report(r)
    assert inf_aot.default_mesh(aot.parse_target("v5e-8")) == (1, 2, 4)
    assert inf_aot.default_mesh(aot.parse_target("1xH100")) == (1, 1, 1)
