"""Training: sharded step == single-device step, stage freezing, preemption + resume bit-exact,
loss goes down, two-process jax.distributed training."""

import dataclasses
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from test_videorefer import OUT_LEN, mixed_batch, tiny_cfg
from vrefer_jax.sharding import MeshConfig, logical_axis_rules, make_mesh
from vrefer_jax.training import optimizer, step as step_lib, train_state, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _batch8():
    cfg = tiny_cfg()
    b1, b2 = mixed_batch(cfg, np.random.default_rng(0)), mixed_batch(cfg, np.random.default_rng(1))
    for b in (b1, b2):  # no exact ties in the token merge (ties may break differently per device)
        b["region_frames"][1, 2:6] = np.random.default_rng(5).standard_normal(b["region_frames"][1, 2:6].shape)
    return {k: np.concatenate([b1[k], b2[k]]) for k in b1}


def _one_step(mesh_shape, ocfg, accum=2):
    cfg = tiny_cfg()
    batch = _batch8()
    rules = logical_axis_rules()
    tx, sched = optimizer.make_optimizer(ocfg, 10)
    mesh = make_mesh(MeshConfig(*mesh_shape), jax.devices()[: int(np.prod(mesh_shape))])
    sh = train_state.state_shardings(cfg, tx, mesh, rules)
    state = train_state.create_state(cfg, tx, sh, seed=0)
    before = jax.tree.map(np.asarray, state.params)
    fn = step_lib.make_train_step(cfg, step_lib.StepConfig(out_len=OUT_LEN, accum_steps=accum, logits_chunk=16),
                                  tx, sched, ocfg.trainable, mesh, rules, sh, {k: v.ndim for k, v in batch.items()})
    state, m = fn(state, batch)
    return before, jax.tree.map(np.asarray, state.params), jax.device_get(m), state


def test_sharded_step_matches_single_device():
    """(2, 2, 2) mesh vs one device, 2 micro-batches: loss, grad norm and updated params agree.
    eps = 1e-3 keeps Adam's first update continuous in the gradient (with eps 1e-8 it is ~lr * sign(g),
    so a 1e-9 gradient rounding differently could flip a parameter by 2 lr)."""
    ocfg = optimizer.OptimizerConfig(learning_rate=1e-2, warmup_ratio=0.0, eps=1e-3,
                                     trainable=("mm_projector", "region_encoder", "llm", "lm_head"))
    _, p1, m1, _ = _one_step((1, 1, 1), ocfg)
    _, p8, m8, s8 = _one_step((2, 2, 2), ocfg)
    assert abs(m1["loss"] - m8["loss"]) < 1e-5 * abs(m1["loss"])
    assert abs(m1["grad_norm"] - m8["grad_norm"]) < 1e-5 * m1["grad_norm"]
    assert int(m1["supervised_tokens"]) == int(m8["supervised_tokens"]) > 0
    diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)))
    print(f"loss {m1['loss']:.6f} vs {m8['loss']:.6f}; max param diff {diff:.2e}")
    assert diff < 1e-5
    # the state really is sharded on the mesh
    gate = s8.params["llm"]["layers"]["mlp"]["gate_proj"]["kernel"]
    assert gate.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


def test_stage2_freezes_all_but_the_object_encoder():
    ocfg = optimizer.OptimizerConfig(learning_rate=1e-3, warmup_ratio=0.0, trainable=("region_encoder",))
    before, after, m, state = _one_step((1, 1, 1), ocfg, accum=1)
    for group in before:
        same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[group]), jax.tree.leaves(after[group])))
        assert same == (group != "region_encoder"), group
    # optimizer state: AdamW moments for the object encoder only (+ scalar counters)
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    n_enc = sum(x.size for x in jax.tree.leaves(after["region_encoder"]))
    assert moments == 2 * n_enc, (moments, n_enc)
    assert bool(m["finite"])


def test_nonfinite_step_is_skipped():
    ocfg = optimizer.OptimizerConfig(learning_rate=1e-3, warmup_ratio=0.0, trainable=("region_encoder",))
    cfg = tiny_cfg()
    batch = _batch8()
    batch["frames"][0, 0, 0, 0, 0] = np.nan
    batch["region_frames"][:] = np.nan
    rules = logical_axis_rules()
    tx, sched = optimizer.make_optimizer(ocfg, 10)
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    sh = train_state.state_shardings(cfg, tx, mesh, rules)
    state = train_state.create_state(cfg, tx, sh, seed=0)
    before = jax.tree.map(np.asarray, state.params)
    fn = step_lib.make_train_step(cfg, step_lib.StepConfig(out_len=OUT_LEN, logits_chunk=0), tx, sched,
                                  ocfg.trainable, mesh, rules, sh, {k: v.ndim for k, v in batch.items()})
    state, m = fn(state, batch)
    assert not bool(m["finite"]) and int(m["nonfinite"]) == 1 and int(state.step) == 1
    after = jax.tree.map(np.asarray, state.params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_mesh_config_resolves_minus_one():
    assert MeshConfig(-1, 2, 2).resolve(8) == (2, 2, 2)
    assert MeshConfig(1, -1, 1).resolve(8) == (1, 8, 1)
    with pytest.raises(ValueError):
        MeshConfig(-1, -1, 1).resolve(8)
    with pytest.raises(ValueError):
        MeshConfig(3, 1, 1).resolve(8)


def test_schedule_is_hf_cosine_with_warmup():
    ocfg = optimizer.OptimizerConfig(learning_rate=1.0, warmup_ratio=0.03)
    sched = optimizer.learning_rate_schedule(ocfg, 100)
    warm = 3  # ceil(0.03 * 100)
    for s in range(100):  # transformers.get_cosine_schedule_with_warmup's lambda
        ref = s / warm if s < warm else 0.5 * (1 + np.cos(np.pi * (s - warm) / (100 - warm)))
        assert abs(float(sched(s)) - ref) < 1e-6, s


# ----------------------------------------------------------------------------- loop on real records


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    from data_pipeline import convert, inputs
    from data_pipeline.synthetic import dataset, scene

    d = str(tmp_path_factory.mktemp("synth"))
    dataset.generate(d, seed=3, train_videos=6, eval_videos=1, vocab_size=512,
                       cfg=scene.SynthConfig(num_frames=8, size=32, mask_frames=1))
    cfg = tiny_cfg()
    convert.convert(inputs.load_entries(os.path.join(d, "train.json")), os.path.join(d, "rec"), media_root=d,
                    num_shards=2, config=convert.ConvertConfig(num_frames=cfg.num_frames, image_size=cfg.vision.image_size,
                                                               image_format="png"), prefix="train", progress=False)
    return d


# LoaderConfig fields of these tests (gin's `LoaderConfig.*` in a real run)
LOADER = dict(seq_len=160, max_region_frames=2, max_objects=2, max_object_frames=1, overflow="skip", read_threads=1)


def _configs(d):
    from vrefer_jax.text.tokenizer import load_tokenizer

    tok = load_tokenizer(os.path.join(d, "tokenizer.json"))
    cfg = tiny_cfg().replace(region_token_id=tok.region_id, pad_token_id=tok.token_to_id("<|endoftext|>"))
    data = trainer.DataConfig(train=(os.path.join(d, "rec", "train-*.tfrecord"),), tokenizer=os.path.join(d, "tokenizer.json"))
    opt = optimizer.OptimizerConfig(learning_rate=3e-3, warmup_ratio=0.0)
    step = step_lib.StepConfig(out_len=192, logits_chunk=64)
    return cfg, data, opt, step, tok


def _train(workdir, d, steps, resume=True, on_step=None, mesh=(1, 1, 1), eval_every=0, lr=None):
    cfg, data, opt, step, tok = _configs(d)
    if lr is not None:
        opt = dataclasses.replace(opt, learning_rate=lr)
    if eval_every:
        data = dataclasses.replace(data, eval=data.train[0])
    tc = trainer.TrainConfig(total_steps=steps, global_batch_size=4, seed=1, log_every=1, checkpoint_every=2,
                             keep_last=2, async_checkpoint=True, progress_bar=False, eval_every=eval_every,
                             eval_batches=2)
    return trainer.train(workdir, resume=resume, model_cfg=cfg, data_cfg=data, train_cfg=tc, opt_cfg=opt, step_cfg=step,
                         mesh_cfg=MeshConfig(*mesh), tokenizer=tok, on_step=on_step, loader=LOADER)


def test_sigterm_then_resume_is_bit_exact_and_loss_drops(records, tmp_path):
    full = _train(str(tmp_path / "full"), records, 8, eval_every=4)
    losses = [h["loss"] for h in full["history"] if "loss" in h]
    evals = [h for h in full["history"] if "eval_loss" in h]
    assert [h["step"] for h in evals] == [4, 8] and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    print("losses", np.round(losses, 3))
    assert np.mean(losses[-2:]) < losses[0] - 0.3

    def kill_at_3(step, m):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    part = _train(str(tmp_path / "cut"), records, 8, on_step=kill_at_3)
    # The host reads step 3's metrics (and calls the hook) while step 4 runs: the save lands at 4.
    assert part["preempted"] and part["step"] == 4 and part["final"] is None
    rest = _train(str(tmp_path / "cut"), records, 8)
    assert rest["step"] == 8 and not rest["preempted"]
    a, b = jax.tree.map(np.asarray, full["state"].params), jax.tree.map(np.asarray, rest["state"].params)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    resumed = [h["loss"] for h in part["history"]] + [h["loss"] for h in rest["history"]]
    assert resumed == losses
    assert os.path.isdir(str(tmp_path / "cut" / "final" / "params"))
    assert os.path.isfile(str(tmp_path / "cut" / "operative_config.gin"))


def test_diverged_run_stops_after_max_nonfinite_and_saves(records, tmp_path):
    """A step at lr 1e38 makes the weights inf; the next steps' losses are non-finite, their updates
    are skipped, and after `max_nonfinite` (5) in a row the run saves a checkpoint and raises."""
    seen = []
    with pytest.raises(FloatingPointError, match="5 non-finite steps in a row at step 6"):
        _train(str(tmp_path / "run"), records, 12, lr=1e38, on_step=lambda s, m: seen.append(bool(m["finite"])))
    assert seen == [True, False, False, False, False]  # step 6 raises before its hook
    # the save lands on the step in flight when the host read step 6's metrics
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints"))[-1] == "7"


def run_two_processes(script: str, args, timeout: float = 300) -> list[str]:
    """`python -c script *args(pid)` as two jax.distributed processes on localhost (2 CPU devices
    each); asserts both exit 0 and returns their outputs. Both are killed if either overruns."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for pid in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
                   VREFER_COORDINATOR=f"127.0.0.1:{port}", VREFER_NUM_PROCESSES="2", VREFER_PROCESS_ID=str(pid),
                   PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
        procs.append(subprocess.Popen([sys.executable, "-c", script, *args(pid)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:  # no orphan left waiting on its peer
            p.kill()
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]
    return outs


def test_two_process_training_on_localhost(records, tmp_path):
    """Two jax.distributed processes x 2 CPU devices each train 3 steps on a (4, 1, 1) mesh; each
    reads its own half of every global batch; both see the same (global) losses."""
    run_two_processes(TWO_PROCESS_WORKER, lambda pid: [records, str(tmp_path / "run"), str(tmp_path / f"out{pid}.json")],
                      timeout=240)
    r0, r1 = (json.load(open(tmp_path / f"out{i}.json")) for i in range(2))
    assert r0["process"] == [0, 2] and r1["process"] == [1, 2] and r0["devices"] == 4
    assert r0["losses"] == r1["losses"] and len(r0["losses"]) == 3 and all(np.isfinite(r0["losses"]))
    assert set(r0["ids"]).isdisjoint(r1["ids"])  # data sharded by process
    assert os.path.isdir(str(tmp_path / "run" / "final" / "params"))


TWO_PROCESS_WORKER = r"""
import json, sys
from vrefer_jax.distributed import maybe_initialize_distributed
maybe_initialize_distributed()
import jax
jax.config.update("jax_default_matmul_precision", "highest")
import test_train
from vrefer_jax import distributed
ids = []
orig = distributed.to_global
def spy(batch, mesh, axes):
    ids.extend(batch["sample_ids"].tolist())
    return orig(batch, mesh, axes)
test_train.trainer.to_global = spy
distributed.to_global = spy
out = test_train._train(sys.argv[2], sys.argv[1], 3, mesh=(4, 1, 1))
json.dump({"process": [jax.process_index(), jax.process_count()], "devices": jax.device_count(),
           "losses": [h["loss"] for h in out["history"]], "ids": ids}, open(sys.argv[3], "w"))
"""


def test_tower_training_flags_must_agree(records, tmp_path):
    """'vision_tower' in the trainable groups without ModelConfig.train_vision_tower would get zero
    gradients (stop_gradient), and the reverse would let gradients in with no update: both refused."""
    cfg, data, opt, step, tok = _configs(records)
    tc = trainer.TrainConfig(total_steps=1, global_batch_size=4, progress_bar=False)
    groups = ("vision_tower",) + opt.trainable
    for c, o in ((cfg, dataclasses.replace(opt, trainable=groups)), (cfg.replace(train_vision_tower=True), opt)):
        with pytest.raises(ValueError, match="train_vision_tower"):
            trainer.train(str(tmp_path), model_cfg=c, data_cfg=data, train_cfg=tc, opt_cfg=o, step_cfg=step,
                          tokenizer=tok)


def test_fit_sharding_replicates_what_does_not_divide():
    from jax.sharding import NamedSharding, PartitionSpec as P

    from vrefer_jax.sharding import fit_sharding

    mesh = make_mesh(MeshConfig(1, 2, 4), jax.devices()[:8])
    s = NamedSharding(mesh, P("tensor", "fsdp"))
    assert fit_sharding(s, (151647, 3584)).spec == P(None, "fsdp")  # 151647 rows: not over 4
    assert fit_sharding(s, (152064, 3584)).spec == P("tensor", "fsdp")
    assert fit_sharding(NamedSharding(mesh, P(("fsdp", "tensor"))), (6,)).spec == P("fsdp")
    assert fit_sharding(NamedSharding(mesh, P(None, "tensor")), (3, 5)).spec == P(None, None)


def test_mesh_config_parse():
    assert MeshConfig.parse("data=1,fsdp=1,tensor=8") == MeshConfig(1, 1, 8)
    assert MeshConfig.parse("tensor=4") == MeshConfig(-1, 1, 4)
    assert MeshConfig.parse("2, -1, 2") == MeshConfig(2, -1, 2)
    for bad in ("heads=2", "data=x", "1,2"):
        with pytest.raises(ValueError, match="mesh"):
            MeshConfig.parse(bad)


def test_step_takes_a_plain_optax_transform():
    """A caller's own transform without extra-argument support (here plain SGD) still runs in the
    step: the gradient norm the step hands to our clip is dropped for it, and parameters move."""
    cfg = tiny_cfg()
    batch = _batch8()
    rules = logical_axis_rules()
    sgd = optax.sgd(1e-2)
    tx = optax.GradientTransformation(sgd.init, lambda u, s, p=None: sgd.update(u, s, p))
    sched = optax.constant_schedule(1e-2)
    trainable = ("mm_projector", "region_encoder", "llm", "lm_head")
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    sh = train_state.state_shardings(cfg, tx, mesh, rules)
    state = train_state.create_state(cfg, tx, sh, seed=0)
    before = np.asarray(state.params["llm"]["layers"]["mlp"]["gate_proj"]["kernel"])
    fn = step_lib.make_train_step(cfg, step_lib.StepConfig(out_len=OUT_LEN, logits_chunk=0), tx, sched,
                                  trainable, mesh, rules, sh, {k: v.ndim for k, v in batch.items()})
    state, m = fn(state, batch)
    assert bool(m["finite"]) and int(state.step) == 1
    assert not np.array_equal(before, np.asarray(state.params["llm"]["layers"]["mlp"]["gate_proj"]["kernel"]))
