"""Per-part learning rates (the official VRVL3 `*_lr` arguments), freezing by a None / 0 rate,
decay / no-decay groups, and the VideoRefer-7B `trainable` mode unchanged.

Adam's first update is lr * g / (|g| + eps) ~ lr * sign(g) for |g| >> eps, so with a constant
schedule and no warmup each parameter moves by its part's rate on step one: the update sizes name
the rate each group got. With zero gradients only weight decay moves a parameter (by lr * wd * p)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vrefer_jax.training import optimizer
from vrefer_jax.training.optimizer import OptimizerConfig
from vrefer_jax.training.stages import stage_bindings, stage_trainable

RATES = dict(llm_lr=1e-2, mm_projector_lr=3e-3, region_encoder_lr=7e-4)  # vision: None (frozen)


def _params(rng=np.random.default_rng(0)):
    """A VRVL3-shaped tree (top-level names of the family) with kernels, biases, norm scales and an
    embedding, including scanned (stacked) biases and scales."""
    r = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    return {
        "vision_encoder": {"patch_embedding": {"kernel": r(12, 8), "bias": r(8)}, "post_layernorm": {"scale": r(8)}},
        "mm_projector": {"readout_0": {"kernel": r(8, 6), "bias": r(6)}},
        "region_encoder": {"feat_linear_0": {"kernel": r(8, 6), "bias": r(6)}},
        "llm": {"embed_tokens": {"embedding": r(20, 6)},
                "layers": {"q_proj": {"kernel": r(2, 6, 6), "bias": r(2, 6)}, "norm": {"scale": r(2, 6)}}},
        "lm_head": {"kernel": r(6, 20)},
    }


def _update(cfg, params, grads):
    tx, _ = optimizer.make_optimizer(cfg, total_steps=10)
    upd, _ = tx.update(grads, tx.init(params), params)
    return jax.tree.map(np.asarray, upd)


def _part(path):
    return {"vision_encoder": "vision_encoder", "mm_projector": "mm_projector", "region_encoder": "region_encoder",
            "llm": "llm", "lm_head": "llm"}[path[0].key]


def test_each_part_gets_its_own_rate_and_frozen_parts_do_not_move():
    cfg = OptimizerConfig(**RATES, warmup_ratio=0.0, schedule="constant", max_grad_norm=None)
    assert cfg.per_part and set(cfg.trainable) == {"llm", "lm_head", "mm_projector", "region_encoder"}
    params = _params()
    grads = jax.tree.map(lambda p: jnp.asarray(np.random.default_rng(1).standard_normal(p.shape), jnp.float32), params)
    upd = _update(cfg, params, grads)
    want = {"llm": 1e-2, "mm_projector": 3e-3, "region_encoder": 7e-4, "vision_encoder": 0.0}
    seen = set()
    for path, u in jax.tree_util.tree_leaves_with_path(upd):
        part = _part(path)
        seen.add(part)
        np.testing.assert_allclose(np.abs(u), want[part], rtol=1e-4, err_msg=jax.tree_util.keystr(path))
    assert seen == set(want)


def test_decay_only_on_kernels_and_embeddings():
    """Zero gradients, wd 0.1: decay leaves move by -lr * wd * p, biases and norm scales not at all."""
    cfg = OptimizerConfig(**RATES, weight_decay=0.1, warmup_ratio=0.0, schedule="constant", max_grad_norm=None)
    params = _params()
    upd = _update(cfg, params, jax.tree.map(jnp.zeros_like, params))
    lr = {"llm": 1e-2, "mm_projector": 3e-3, "region_encoder": 7e-4, "vision_encoder": 0.0}
    decayed = []
    for (path, u), p in zip(jax.tree_util.tree_leaves_with_path(upd), jax.tree.leaves(params)):
        leaf = path[-1].key
        if leaf in ("bias", "scale"):
            assert not np.any(u), jax.tree_util.keystr(path)
        else:
            np.testing.assert_allclose(u, -lr[_part(path)] * 0.1 * np.asarray(p), rtol=1e-5, atol=1e-12)
            decayed.append(leaf)
    assert sorted(set(decayed)) == ["embedding", "kernel"]
    # the VideoRefer-7B mode takes the same groups
    legacy = OptimizerConfig(learning_rate=1e-2, weight_decay=0.1, warmup_ratio=0.0, schedule="constant",
                             max_grad_norm=None, trainable=("llm", "lm_head"))
    u2 = _update(legacy, params, jax.tree.map(jnp.zeros_like, params))
    assert not np.any(u2["llm"]["layers"]["norm"]["scale"]) and np.any(u2["llm"]["layers"]["q_proj"]["kernel"])
    assert not np.any(u2["mm_projector"]["readout_0"]["kernel"])  # not trainable


def test_zero_or_none_rate_freezes_and_rates_and_trainable_must_agree():
    cfg = OptimizerConfig(llm_lr=1e-5, mm_projector_lr=1e-5, region_encoder_lr=1e-5, vision_encoder_lr=0.0)
    assert cfg.trainable == ("llm", "lm_head", "mm_projector", "region_encoder")
    assert OptimizerConfig(region_encoder_lr=1e-3).trainable == ("region_encoder",)
    with pytest.raises(ValueError, match="disagrees"):
        OptimizerConfig(region_encoder_lr=1e-3, trainable=("llm",))
    with pytest.raises(ValueError, match="nothing would train"):
        OptimizerConfig(llm_lr=0.0)
    with pytest.raises(ValueError, match="llm_lr"):
        OptimizerConfig(llm_lr=-1.0)
    # the logged schedule follows the largest rate, with 3% warmup and cosine decay to 0
    tx, sched = optimizer.make_optimizer(OptimizerConfig(llm_lr=1e-5, region_encoder_lr=1e-3), 100)
    assert float(sched(0)) == 0.0 and abs(float(sched(3)) - 1e-3) < 1e-9 and float(sched(100)) < 1e-9


def test_legacy_mode_state_is_unchanged():
    """`trainable` + `learning_rate` builds the same transform (same state tree) as before per-part
    rates existed, so VideoRefer-7B checkpoints restore."""
    cfg = OptimizerConfig(learning_rate=1e-3, trainable=("region_encoder",))
    tx, _ = optimizer.make_optimizer(cfg, 10)
    sched = optimizer.learning_rate_schedule(cfg, 10)
    old = optax.multi_transform(
        {"train": optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.0)),
         "freeze": optax.set_to_zero()}, optimizer.param_labels(cfg.trainable))
    params = _params()
    assert jax.tree.structure(tx.init(params)) == jax.tree.structure(old.init(params))


def test_stage_gins():
    """VideoRefer-7B's stage gins mean what they did; the VRVL3 ones follow §15."""
    assert stage_trainable("stage2") == ("region_encoder",)
    assert stage_trainable("stage3") == ("mm_projector", "region_encoder", "llm", "lm_head")
    assert stage_trainable("vl3_stage1") == ("region_encoder",)
    assert set(stage_trainable("vl3_stage2")) == {"llm", "lm_head", "mm_projector", "region_encoder"}
    b = {k[1]: v for k, v in stage_bindings("vl3_stage2").items() if k[0] == "OptimizerConfig"}
    assert b == dict(llm_lr=1e-5, mm_projector_lr=1e-5, region_encoder_lr=1e-5, vision_encoder_lr=0.0,
                     warmup_ratio=0.03, schedule="cosine", weight_decay=0.0)
    assert stage_bindings("vl3_stage1")[("OptimizerConfig", "region_encoder_lr")] == 1e-3


def test_frozen_parts_bit_identical_through_the_train_step():
    """The shared train step on a tiny VRVL3 with stage-1 rates: after two steps only the region
    encoder has moved; every other parameter is bit-identical."""
    from vrefer_jax import families
    from vrefer_jax.sharding import MeshConfig, logical_axis_rules, make_mesh
    from vrefer_jax.training import step as step_lib, train_state
    from vrefer_jax.vl3_config import NaViTConfig, VL3Config
    from vrefer_jax.config import TextConfig

    cfg = VL3Config(vision=NaViTConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=1),
                    text=TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False),
                    image_token_id=60, region_token_id=61, pad_token_id=0, train_vision_tower=False)
    fam = families.for_config(cfg)
    batch = fam.dummy_batch(cfg, batch_size=2)
    batch["labels"][:, 4:] = 7
    ocfg = OptimizerConfig(region_encoder_lr=1e-2, llm_lr=1e-2, warmup_ratio=0.0)  # vision / projector frozen
    tx, sched = optimizer.make_optimizer(ocfg, 10)
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    rules = logical_axis_rules()
    sh = train_state.state_shardings(cfg, tx, mesh, rules)
    state = train_state.create_state(cfg, tx, sh, seed=0)
    before = jax.tree.map(np.asarray, state.params)
    fn = step_lib.make_train_step(cfg, step_lib.StepConfig(out_len=16), tx, sched, ocfg.trainable, mesh, rules, sh,
                                  {k: v.ndim for k, v in batch.items()})
    for _ in range(2):
        state, m = fn(state, batch)
    after = jax.tree.map(np.asarray, state.params)
    assert np.isfinite(float(m["loss"]))
    for name in ("vision_encoder", "mm_projector"):
        for a, b in zip(jax.tree.leaves(before[name]), jax.tree.leaves(after[name])):
            assert np.array_equal(a, b), name
    for name in ("llm", "lm_head"):
        assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[name]), jax.tree.leaves(after[name])))


def test_clip_is_torch_clip_grad_norm():
    """`optimizer.clip_by_global_norm` scales as PyTorch's `clip_grad_norm_` (the official HF
    Trainer's): below the max nothing changes (bit-identical), above it every gradient is times
    max / (norm + 1e-6); optax's state type, so the state tree is optax's."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    tx = optimizer.clip_by_global_norm(1.0)
    assert tx.init({}) == optax.clip_by_global_norm(1.0).init({})
    for scale in (0.01, 0.2, 0.3, 5.0, 400.0):
        grads = {"a": rng.normal(size=(7, 5)).astype(np.float32) * scale,
                 "b": rng.normal(size=(11,)).astype(np.float32) * scale}
        ours, _ = tx.update(jax.tree.map(jnp.asarray, grads), tx.init(grads))
        ts = [torch.nn.Parameter(torch.zeros(g.shape)) for g in grads.values()]
        for t, g in zip(ts, grads.values()):
            t.grad = torch.tensor(g)
        torch.nn.utils.clip_grad_norm_(ts, 1.0)
        for t, k in zip(ts, grads):
            np.testing.assert_allclose(np.asarray(ours[k]), t.grad.numpy(), rtol=2e-7, atol=0)
        if scale < 0.1:  # well under the max: untouched
            assert all(np.array_equal(np.asarray(ours[k]), grads[k]) for k in grads)


def test_clip_takes_the_callers_norm():
    """`grad_norm=` (the train step's, computed for its non-finite guard) replaces the clip's own
    norm, through the per-part and the legacy transforms alike."""
    params = {"llm": {"a": jnp.ones((4, 3))}, "mm_projector": {"k": jnp.ones((3, 2))}}
    grads = jax.tree.map(lambda x: 5.0 * x, params)
    norm = optax.global_norm(grads)
    for cfg in (OptimizerConfig(learning_rate=1e-2, trainable=("llm", "mm_projector")),
                OptimizerConfig(llm_lr=1e-2, mm_projector_lr=1e-3)):
        tx, _ = optimizer.make_optimizer(cfg, 10)
        state = tx.init(params)
        mu = lambda s: [np.asarray(x) for path, x in jax.tree_util.tree_flatten_with_path(s)[0]  # noqa: E731
                        if ".mu" in jax.tree_util.keystr(path) and getattr(x, "ndim", 0) == 2]
        own, given, tenfold = (mu(tx.update(grads, state, params, **kw)[1])
                               for kw in ({}, {"grad_norm": norm}, {"grad_norm": 10 * norm}))
        assert len(own) == 2
        for a, b, c in zip(own, given, tenfold):
            np.testing.assert_allclose(a, b, rtol=1e-6)
            np.testing.assert_allclose(a, 10 * c, rtol=1e-5)  # first moments scale with the clip factor
