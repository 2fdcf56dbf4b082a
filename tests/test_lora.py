"""LoRA / QLoRA on the decoder, both families: a zero B changes nothing, training moves only the
adapters, merging equals the adapted model, int8 storage, shardings, remat and dropout."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from vrefer_jax import families
from vrefer_jax.config import LoraConfig
from vrefer_jax.models import lora as lora_lib
from vrefer_jax.sharding import MeshConfig, logical_axis_rules, make_mesh
from vrefer_jax.training import adapters, optimizer, step as step_lib, train_state

GINS = {"videorefer": "configs/models/tiny.gin", "videorefer_videollama3": "configs/models/vl3_tiny.gin"}


def base_cfg(family: str):
    return families.config_from_gin([GINS[family]], family=family)


def with_lora(cfg, **kw):
    return cfg.replace(text=dataclasses.replace(cfg.text, lora=LoraConfig(**{"rank": 4, **kw})))


def batch_of(cfg, batch_size: int = 2):
    """The family's dummy batch with supervised text (labels on every non-visual row)."""
    fam = families.for_config(cfg)
    b = {k: np.array(v) for k, v in fam.dummy_batch(cfg, batch_size=batch_size).items()}
    rng = np.random.default_rng(0)
    text = b["input_ids"] >= 0
    if fam.name == "videorefer_videollama3":
        text &= b["input_ids"] != cfg.image_token_id
    b["input_ids"] = np.where(text, rng.integers(1, 100, b["input_ids"].shape), b["input_ids"]).astype(np.int32)
    b["labels"] = np.where(text, b["input_ids"], -100).astype(np.int32)
    for k in ("frames", "region_frames", "patches"):  # nonzero pixels: the projector gets gradients
        if k in b:
            b[k] = rng.standard_normal(b[k].shape).astype(b[k].dtype)
    return b


@functools.lru_cache(maxsize=None)
def _forward(cfg, out_len: int):
    model = families.for_config(cfg).module(cfg)
    return jax.jit(lambda p, b: model.apply({"params": p}, b, out_len=out_len)[0])


def logits(cfg, params, batch):
    return np.asarray(_forward(cfg, batch["input_ids"].shape[1])(params, batch))


def random_b(params, seed=1, scale=0.05):
    """Adapters with a nonzero B (as after training)."""
    flat = traverse_util.flatten_dict(params)
    rng = np.random.default_rng(seed)
    for p in flat:
        if p[-1] == "lora_b":
            flat[p] = jnp.asarray(rng.normal(0, scale, flat[p].shape), flat[p].dtype)
    return traverse_util.unflatten_dict(flat)


def one_device_shardings(cfg):
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda _: one, families.for_config(cfg).abstract_params(cfg))


@pytest.mark.parametrize("family", sorted(GINS))
def test_zero_b_gives_exactly_the_base_logits_and_merging_equals_the_adapters(family):
    cfg = base_cfg(family)
    base = families.for_config(cfg).init_params(cfg, jax.random.PRNGKey(0))
    lcfg = with_lora(cfg, alpha=8.0)
    params = adapters.attach(lcfg, base, one_device_shardings(lcfg), seed=3)
    names = {p[-1] for p in traverse_util.flatten_dict(params)} - {p[-1] for p in traverse_util.flatten_dict(base)}
    assert names == {"lora_a", "lora_b"}
    n_adapted = sum(1 for _ in lora_lib.projections(params))
    assert n_adapted == 7  # q k v o gate up down (scanned: one dict each)
    a = params["llm"]["layers"]["self_attn"]["q_proj"]["lora_a"]
    assert float(jnp.abs(a).max()) > 0  # A is drawn, B is zero
    batch = batch_of(cfg)
    ref = logits(cfg, base, batch)
    np.testing.assert_array_equal(logits(lcfg, params, batch), ref)
    # a nonzero B changes them (the adapters are in the path), and folding it into the kernels
    # (the merged export's tree, the plain model) gives the adapted model's logits
    trained = random_b(params)
    adapted = logits(lcfg, trained, batch)
    assert np.abs(adapted - ref).max() > 1e-3
    merged = lora_lib.merge_params(trained, lcfg.text.lora.scaling)
    assert not lora_lib.has_adapters(merged) and jax.tree.structure(merged) == jax.tree.structure(base)
    assert np.abs(logits(cfg, merged, batch) - adapted).max() < 1e-4 * max(1.0, np.abs(adapted).max())


def test_int8_base_roundtrip_and_merge():
    cfg = base_cfg("videorefer")
    base = families.for_config(cfg).init_params(cfg, jax.random.PRNGKey(0))
    lcfg = with_lora(cfg, base_dtype="int8")
    params = adapters.attach(lcfg, base, one_device_shardings(lcfg))
    q = params["llm"]["layers"]["mlp"]["gate_proj"]
    assert q["kernel"].dtype == jnp.int8 and q["kernel_scale"].shape == (cfg.text.num_hidden_layers, cfg.text.intermediate_size)
    w = np.asarray(base["llm"]["layers"]["mlp"]["gate_proj"]["kernel"])
    deq = np.asarray(lora_lib.base_kernel(q))
    # symmetric rounding: within half a step of each output channel (and layer)
    step = np.asarray(q["kernel_scale"])[:, None, :]
    assert np.all(np.abs(deq - w) <= 0.5 * step + 1e-7)
    batch = batch_of(cfg)
    ref = logits(cfg, base, batch)
    got = logits(lcfg, params, batch)
    assert 0 < np.abs(got - ref).max() < 0.05 * np.abs(ref).max()  # int8 base: close, not equal
    trained = random_b(params)
    merged = lora_lib.merge_params(trained, lcfg.text.lora.scaling)
    assert np.abs(logits(lcfg, trained, batch) - logits(cfg, merged, batch)).max() < 1e-4


def test_bf16_base_storage():
    cfg = base_cfg("videorefer")
    lcfg = with_lora(cfg, base_dtype="bfloat16")
    p = families.for_config(lcfg).abstract_params(lcfg)["llm"]["layers"]["self_attn"]["k_proj"]
    assert p["kernel"].dtype == jnp.bfloat16 and p["lora_a"].dtype == jnp.float32 and p["bias"].dtype == jnp.float32


def _step(cfg, ocfg, batch, mesh_shape=(1, 1, 1), params=None, accum=1):
    rules = logical_axis_rules()
    tx, sched = optimizer.make_optimizer(ocfg, 10)
    mesh = make_mesh(MeshConfig(*mesh_shape), jax.devices()[: int(np.prod(mesh_shape))])
    sh = train_state.state_shardings(cfg, tx, mesh, rules)
    if params is not None:  # placed in the state's shardings (create_state donates them)
        params = jax.device_put(jax.tree.map(np.asarray, params), sh.params)
    state = train_state.create_state(cfg, tx, sh, seed=0, params=params)
    before = jax.tree.map(np.asarray, state.params)
    fn = step_lib.make_train_step(cfg, step_lib.StepConfig(out_len=batch["input_ids"].shape[1], accum_steps=accum,
                                                           logits_chunk=0),
                                  tx, sched, ocfg.trainable, mesh, rules, sh, {k: v.ndim for k, v in batch.items()})
    state, m = fn(state, batch)
    return before, jax.tree.map(np.asarray, state.params), jax.device_get(m), state


@pytest.mark.parametrize("family", ["videorefer", pytest.param("videorefer_videollama3", marks=pytest.mark.slow)])
def test_training_moves_only_the_adapters(family):
    """LLM trainable through its adapters (base and LM head frozen), the projector trained in full,
    the rest frozen; two steps so that A moves too (B is zero at the first)."""
    cfg = with_lora(base_cfg(family), dropout=0.1)
    ocfg = optimizer.OptimizerConfig(learning_rate=1e-2, warmup_ratio=0.0,
                                     trainable=("mm_projector", "llm", "lm_head"))
    batch = batch_of(cfg, batch_size=2)
    before, after, m, state = _step(cfg, ocfg, batch)
    assert bool(m["finite"]) and int(m["supervised_tokens"]) > 0
    for path, a in traverse_util.flatten_dict(after).items():
        changed = not np.array_equal(traverse_util.flatten_dict(before)[path], a)
        should = path[-1] == "lora_b" or path[0] == "mm_projector"  # A gets no gradient while B = 0
        assert changed == should, "/".join(path)
    # AdamW moments exist for the adapters and the projector only
    flat = traverse_util.flatten_dict(after)
    n_train = sum(v.size for p, v in flat.items() if p[-1] in ("lora_a", "lora_b") or p[0] == "mm_projector")
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert moments == 2 * n_train


def _decoder(remat="none", dropout=0.5):
    """The tiny decoder alone (Qwen2ForCausalLM) with adapters, its params with a nonzero B, and ids."""
    from vrefer_jax.models import qwen2

    text = with_lora(base_cfg("videorefer"), dropout=dropout).text
    model = qwen2.Qwen2ForCausalLM(text, remat_policy=remat)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, text.vocab_size, (2, 12)), jnp.int32)
    params = random_b(nn.meta.unbox(model.init(jax.random.PRNGKey(0), input_ids=ids)["params"]))
    return model, params, ids


def test_dropout_only_with_a_dropout_rng():
    model, params, ids = _decoder()
    run = jax.jit(lambda p, r: model.apply({"params": p}, input_ids=ids, rngs={"dropout": r})[0])
    plain = np.asarray(jax.jit(lambda p: model.apply({"params": p}, input_ids=ids)[0])(params))
    d1, d1b, d2 = (np.asarray(run(params, jax.random.PRNGKey(k))) for k in (1, 1, 2))
    assert np.abs(d1 - plain).max() > 1e-4 and np.array_equal(d1, d1b) and np.abs(d2 - d1).max() > 1e-4


@pytest.mark.slow
def test_remat_is_transparent_with_adapters():
    model, params, ids = _decoder(dropout=0.0)
    remat, _, _ = _decoder("full", dropout=0.0)

    def loss(m):
        return jax.jit(jax.value_and_grad(lambda p: jnp.mean(m.apply({"params": p}, input_ids=ids)[0] ** 2)))

    (l0, g0), (l1, g1) = loss(model)(params), loss(remat)(params)
    assert abs(float(l0) - float(l1)) < 1e-6 * abs(float(l0))
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_adapters_shard_like_their_base_kernel():
    cfg = with_lora(base_cfg("videorefer"))
    tx, _ = optimizer.make_optimizer(optimizer.OptimizerConfig(trainable=("llm",)), 10)
    mesh = make_mesh(MeshConfig(1, 2, 2), jax.devices()[:4])
    sh = train_state.state_shardings(cfg, tx, mesh, logical_axis_rules()).params["llm"]["layers"]
    P = jax.sharding.PartitionSpec
    q = sh["self_attn"]["q_proj"]
    assert q["kernel"].spec == P(None, "fsdp", "tensor", None)
    assert q["lora_a"].spec == P(None, "fsdp", None)  # embed -> fsdp, like the kernel's input
    assert q["lora_b"].spec == P(None, None, "tensor", None)  # heads -> tensor, like its output
    down = sh["mlp"]["down_proj"]
    assert down["lora_a"].spec == P(None, "tensor", None) and down["lora_b"].spec == P(None, None, "fsdp")


@pytest.mark.slow
def test_sharded_lora_step_matches_one_device():
    cfg = with_lora(base_cfg("videorefer"), base_dtype="int8")
    ocfg = optimizer.OptimizerConfig(learning_rate=1e-2, warmup_ratio=0.0, eps=1e-3, trainable=("llm",))
    batch = {k: np.concatenate([v, v]) for k, v in batch_of(cfg, batch_size=4).items()}
    params = random_b(families.for_config(cfg).init_params(cfg, jax.random.PRNGKey(0)))
    _, p1, m1, _ = _step(cfg, ocfg, batch, (1, 1, 1), params=params, accum=2)
    _, p8, m8, _ = _step(cfg, ocfg, batch, (2, 2, 2), params=params, accum=2)
    assert abs(m1["loss"] - m8["loss"]) < 1e-5 * abs(m1["loss"])
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_config_checks():
    with pytest.raises(ValueError, match="targets"):
        LoraConfig(rank=4, targets=("qkv",))
    with pytest.raises(ValueError, match="base_dtype"):
        LoraConfig(rank=4, base_dtype="int4")
    assert not LoraConfig().enabled and LoraConfig(rank=8, alpha=16).scaling == 2.0
