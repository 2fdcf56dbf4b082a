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


# ----------------------------------------------------------------------------- VRVL3


def _vl3_tiny(**kw):
    from vrefer_jax.config import TextConfig
    from vrefer_jax.vl3_config import NaViTConfig, VL3Config

    return VL3Config(
        vision=NaViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        text=TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
        image_token_id=508, region_token_id=511, pad_token_id=505, remat_policy="full", **kw)


def _vl3_workload(seq_len=64):
    from vrefer_jax.families.workloads import Workload

    # 2 frames of 56x84 pixels -> 4x6 patches (6 merged tokens each), one 12-cell region (8x8 crop)
    return Workload(total_len=seq_len, frames=2, frame_hw=(56, 84), regions=1, region_cells=12, labels=True)


def test_vl3_compile_and_report():
    """A tiny VRVL3 train step compiled on a (2, 2, 2) mesh with the VRVL3 stage: the vision encoder
    frozen (no optimizer state), state and batch bytes consistent with the compiled arguments, the
    analytic counts exact, the report naming the family's groups and rows."""
    from vrefer_jax import families

    cfg = _vl3_tiny()
    r = aot.check(cfg, aot.parse_target("cpu-8"), global_batch=8, seq_len=64, micro_batch=1, mesh="2,2,2",
                  workload=_vl3_workload(), log=lambda *_: None)
    assert r["stage"] == "vl3_finetune" and r["family"] == "videorefer_videollama3"
    assert r["trained_groups"] == ["mm_projector", "region_encoder", "llm"]
    assert r["frozen_groups"] == ["vision_encoder"]
    s, a, c = r["sizes"], r["analytic"], r["compiled"]
    assert (s["L"], s["visual_tokens"], s["frame_grid"], s["patches"]) == (64, 12, (4, 6), 2 * 24 + 64)
    assert c["total"] > 0 and c["aliased"] > 0
    state_dev = r["state_bytes"]["params_per_device"] + r["state_bytes"]["opt_state_per_device"]
    assert state_dev + a["batch"] <= c["arguments"] <= state_dev + a["batch"] + 4096
    params = families.for_config(cfg).abstract_params(cfg)
    n = {g: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params[g])) for g in params}
    assert a["params_total"] == sum(n.values())
    assert a["params_trainable"] == sum(n.values()) - n["vision_encoder"]
    assert a["adam_moments_global"] == 8 * a["params_trainable"]
    assert "frozen: forward only" in a["vision_note"] and "dense" in a["vision_note"]
    txt = aot.format_report(r)
    assert "videorefer_videollama3" in txt and "frozen ['vision_encoder']" in txt and "N 112 patches" in txt
    print(txt)


def test_vl3_depth_and_stage_checks():
    """Reduced depth touches the NaViT layer count; a VideoRefer-only stage is refused for VRVL3;
    block attention shrinks the analytic attention scores by N / P."""
    cfg = _vl3_tiny()
    small = aot.with_depth(cfg, 1, 1)
    assert small.text.num_hidden_layers == 1 and small.vision.num_hidden_layers == 1
    assert aot.vision_layers(cfg) == 2
    with pytest.raises(ValueError, match="vision_tower"):
        aot.trainable_groups(cfg, ("vision_tower", "llm"))
    assert aot.trainable_groups(cfg, ("llm", "lm_head"))[0] == ["llm"]
    batch = aot.batch_shapes(cfg, 1, 64, _vl3_workload())
    dense = aot._encoder_activations(cfg, batch, ("llm",), 1, 4)
    chunked_cfg = cfg.replace(vision_attention_chunk=64)
    batch_c = aot.batch_shapes(chunked_cfg, 1, 64, _vl3_workload())
    chunked = aot._encoder_activations(chunked_cfg, batch_c, ("llm",), 1, 4)
    N = batch["patches"].shape[1]
    assert batch_c["patches"].shape[1] == 128 and N == 112  # frames share a block; the crop gets one
    assert dense[0] > chunked[0] and "blocks of 64" in chunked[2]


def test_generate_benchmark_vl3_batch_is_valid():
    """The generate benchmark's batch for a VRVL3 config passes the family's `validate`: 16 frames
    of 224x392 pixels (16x28 patches, 112 merged tokens each, none pruned), 2 regions of 30 cells
    (k-means: more cells than region tokens), 64 text rows; likewise laid out for block attention."""
    import importlib.util

    from vrefer_jax import families, vl3_batch
    from vrefer_jax.families.workloads import Workload

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "generate.py"
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    fam = families.get("videorefer_videollama3")
    cfg = _vl3_tiny()
    wl = Workload(text_len=64, frames=16, frame_hw=(224, 392), regions=2, region_cells=30)
    batch, out_len, sizes = bench.make_batch(cfg, 2, wl)
    fam.validate(cfg, batch, out_len)
    assert sizes["frame_grid"] == (16, 28) and sizes["visual_tokens"] == 16 * 112
    assert (batch["input_ids"] == cfg.image_token_id).sum(1).tolist() == [16 * 112] * 2
    assert batch["region_num_cells"].tolist() == [[30, 30]] * 2 and cfg.region_token_num < 30
    assert (batch["input_ids"] == cfg.region_token_id).sum(1).tolist() == [20, 20]
    assert out_len == batch["input_ids"].shape[1] == 16 * 112 + 20 + 64
    assert "labels" not in batch
    chunked = cfg.replace(vision_attention_chunk=448)
    cb, cl, _ = bench.make_batch(chunked, 1, wl)
    fam.validate(chunked, cb, cl)
    assert cb["patches"].shape[1] % 448 == 0
    with pytest.raises(vl3_batch.BatchError, match="multiple of vision_attention_chunk"):
        fam.validate(chunked, batch, out_len)


def test_vl3_inference_compile():
    """Generation of the tiny VRVL3 compiled on a (1, 4, 2) mesh from the family's prompt: out_len is
    the host-expanded length (visual + region + text rows)."""
    from vrefer_jax import families
    from vrefer_jax.families.workloads import Workload
    from vrefer_jax.inference import aot as inf_aot

    cfg = _vl3_tiny()
    wl = Workload(text_len=32, frames=2, frame_hw=(56, 84), regions=2, region_cells=12)
    r = inf_aot.check(cfg, aot.parse_target("cpu-8"), batch=8, text_len=32, new_tokens=8, mesh=(1, 4, 2),
                      param_dtype="float32", workload=wl, log=lambda *_: None)
    assert r["out_len"] == 2 * 6 + 2 * 10 + 32
    params = families.for_config(cfg).abstract_params(cfg)
    assert r["params_global"] == 4 * sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert r["compiled"]["arguments"] >= r["params_per_device"] and r["compiled"]["total"] > 0
    assert "2 regions" in inf_aot.format_report(r)


def test_lora_stage_reports_less_state_than_full_fine_tuning(cfg, tmp_path):
    """Same batch and mesh: a LoRA stage (qlora.gin at rank 4: int8 base) gives the model adapters;
    the AdamW moments and the gradient accumulator then cover only the adapters and the groups
    trained in full (projector, region encoder), and the compiled step takes less state."""
    stage = tmp_path / "qlora_r4.gin"
    stage.write_text(f"include '{stage_file('qlora')}'\nLoraConfig.rank = 4\n")
    kw = dict(global_batch=8, seq_len=64, micro_batch=1, mesh="1,8,1", log=lambda *_: None)
    full = aot.check(cfg, aot.parse_target("cpu-8"), stage="stage3", **kw)
    lora = aot.check(cfg, aot.parse_target("cpu-8"), stage=str(stage), **kw)
    a, s = lora["analytic"], lora["state_bytes"]
    assert s["opt_state_global"] == a["adam_moments_global"] + a["opt_scalars"]
    assert a["master_params_global"] == s["params_global"] < full["state_bytes"]["params_global"]  # int8 base
    assert a["params_trainable"] < full["analytic"]["params_trainable"]
    assert a["adam_moments"] < full["analytic"]["adam_moments"]
    assert a["grad_accumulator"] < full["analytic"]["grad_accumulator"]
    # the state the compiled step takes (at this tiny size its temporaries dominate the total)
    assert lora["compiled"]["arguments"] < full["compiled"]["arguments"]
    assert "LoRA rank 4" in aot.format_report(lora) and "int8" in aot.format_report(lora)
