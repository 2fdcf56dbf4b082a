"""Qwen2 decoder parity against `transformers.Qwen2ForCausalLM` (tiny random config, fp32)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vrefer_jax.checkpoints import key_map
from vrefer_jax.checkpoints import videorefer_keys as keys
from vrefer_jax.config import TextConfig
from vrefer_jax.models import qwen2

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.torch

TOL = 1e-4
VOCAB = 128


def make_cfg(theta: float) -> TextConfig:
    return TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                      rope_theta=theta, max_position_embeddings=64)


@functools.lru_cache(maxsize=None)
def reference(theta: float):
    """(cfg, torch model, flax params) with every weight random (norm scales and biases included)."""
    cfg = make_cfg(theta)
    hf_cfg = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": theta}, tie_word_embeddings=False,
        attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    sd = key_map.torch_state_to_numpy(hf.state_dict())
    model = qwen2.Qwen2ForCausalLM(cfg)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    params = key_map.hf_to_flax(sd, keys.causal_lm_rules(cfg), shapes, available=list(sd))
    params = jax.tree.map(jnp.asarray, params)
    return cfg, hf, params, sd


@functools.lru_cache(maxsize=None)
def jitted(theta: float, dtype=jnp.float32):
    model = qwen2.Qwen2ForCausalLM(make_cfg(theta), dtype=dtype)

    @jax.jit
    def fwd(params, ids, positions, segment_ids, cache=None):
        return model.apply({"params": params}, ids, positions=positions, segment_ids=segment_ids, cache=cache)

    return model, fwd


def hf_logits(hf, ids, attention_mask=None, position_ids=None) -> np.ndarray:
    kw = {}
    if attention_mask is not None:
        kw["attention_mask"] = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
    if position_ids is not None:
        kw["position_ids"] = torch.as_tensor(np.asarray(position_ids), dtype=torch.long)
    with torch.no_grad():
        return hf(torch.as_tensor(np.asarray(ids), dtype=torch.long), **kw).logits.float().numpy()


def err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ----------------------------------------------------------------------------- 1. plain forward


@pytest.mark.parametrize("theta", [1e6, 1e4])
def test_logits_parity_with_padding(theta):
    cfg, hf, params, _ = reference(theta)
    _, fwd = jitted(theta)
    rng = np.random.default_rng(1)
    B, T = 3, 12
    ids = rng.integers(0, VOCAB, (B, T))
    lengths = np.array([12, 9, 5])
    pos = np.broadcast_to(np.arange(T), (B, T))

    # no padding
    got, _ = fwd(params, ids, pos, np.ones((B, T), np.int32))
    e = err(got, hf_logits(hf, ids))
    print(f"\n[theta={theta:g}] no padding: max abs err {e:.2e}")
    assert got.dtype == jnp.float32 and got.shape == (B, T, VOCAB)
    assert e <= TOL

    # right padding: compare real tokens; padding rows must stay finite
    real = np.arange(T)[None, :] < lengths[:, None]
    got, _ = fwd(params, ids, pos, real.astype(np.int32))
    ref = hf_logits(hf, ids, attention_mask=real)
    assert np.isfinite(np.asarray(got)).all()
    e = max(err(np.asarray(got)[b, :n], ref[b, :n]) for b, n in enumerate(lengths))
    print(f"[theta={theta:g}] right padding: max abs err {e:.2e}")
    assert e <= TOL

    # left padding, the same explicit positions on both sides (HF generate's convention)
    real = np.arange(T)[None, :] >= (T - lengths)[:, None]
    lpos = np.where(real, np.cumsum(real, axis=1) - 1, 1)
    got, _ = fwd(params, ids, lpos, real.astype(np.int32))
    ref = hf_logits(hf, ids, attention_mask=real, position_ids=lpos)
    assert np.isfinite(np.asarray(got)).all()
    e = max(err(np.asarray(got)[b, T - n:], ref[b, T - n:]) for b, n in enumerate(lengths))
    print(f"[theta={theta:g}] left padding: max abs err {e:.2e}")
    assert e <= TOL


# ----------------------------------------------------------------------------- 2. KV cache


@pytest.mark.parametrize("left_pad", [False, True])
def test_kv_cache_prefill_then_decode(left_pad):
    cfg, hf, params, _ = reference(1e6)
    _, fwd = jitted(1e6)
    rng = np.random.default_rng(2)
    B, P, steps = 3, 8, 4
    lengths = np.array([8, 5, 3])
    full = rng.integers(0, VOCAB, (B, P + steps))  # row b uses full[b, :lengths[b] + steps]

    prompt = np.zeros((B, P), np.int64)
    real = np.zeros((B, P), bool)
    pos = np.zeros((B, P), np.int64)
    for b, n in enumerate(lengths):
        sl = slice(P - n, P) if left_pad else slice(0, n)
        prompt[b, sl], real[b, sl], pos[b, sl] = full[b, :n], True, np.arange(n)
    if not left_pad:
        pos = np.broadcast_to(np.arange(P), (B, P))  # pads keep their index; they are not written

    cache = qwen2.init_cache(cfg, B, P + steps, jnp.float32)
    logits, cache = fwd(params, prompt, pos, real.astype(np.int32), cache)
    assert cache.k.shape == (3, B, P + steps, 2, 16)
    got = [[np.asarray(logits)[b, (P - n if left_pad else 0) + i] for i in range(n)] for b, n in enumerate(lengths)]
    for s in range(steps):
        tok = full[np.arange(B), lengths + s][:, None]
        step_pos = (lengths + s)[:, None]
        logits, cache = fwd(params, tok, step_pos, np.ones((B, 1), np.int32), cache)
        for b in range(B):
            got[b].append(np.asarray(logits)[b, 0])

    e = 0.0
    for b, n in enumerate(lengths):
        ref = hf_logits(hf, full[b:b + 1, :n + steps])[0]
        e = max(e, err(np.stack(got[b]), ref))
    print(f"\n[cache, {'left' if left_pad else 'right'} padded prompts] max abs err {e:.2e}")
    assert e <= TOL
    assert np.asarray(cache.valid).sum(axis=1).tolist() == (lengths + steps).tolist()


# ----------------------------------------------------------------------------- 3. packing


def test_packed_sequences_match_separate_runs():
    cfg, hf, params, _ = reference(1e6)
    _, fwd = jitted(1e6)
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, VOCAB, 5), rng.integers(0, VOCAB, 6)
    T = 13
    ids = np.zeros((1, T), np.int64)
    ids[0, :11] = np.concatenate([a, b])
    seg = np.array([[1] * 5 + [2] * 6 + [0] * 2])
    pos = np.array([list(range(5)) + list(range(6)) + [0, 0]])
    got, _ = fwd(params, ids, pos, seg)
    got = np.asarray(got)[0]
    assert np.isfinite(got).all()
    e = max(err(got[:5], hf_logits(hf, a[None])[0]), err(got[5:11], hf_logits(hf, b[None])[0]))
    print(f"\n[packed] max abs err vs separate runs {e:.2e}")
    assert e <= TOL


# ----------------------------------------------------------------------------- 4. numerics, keys


def test_remat_bf16_and_round_trip():
    cfg, hf, params, sd = reference(1e6)
    _, fwd = jitted(1e6)
    rng = np.random.default_rng(4)
    B, T = 3, 12  # the shapes of test 1: the fp32 forward is already compiled
    ids = rng.integers(0, VOCAB, (B, T))
    pos = np.broadcast_to(np.arange(T), (B, T))
    seg = np.ones((B, T), np.int32)
    ref, _ = fwd(params, ids, pos, seg)

    # remat "full": same loss, same (finite) gradients as without remat
    def loss_and_grad(remat):
        model = qwen2.Qwen2ForCausalLM(cfg, remat_policy=remat)

        def f(p):
            logits, _ = model.apply({"params": p}, ids, positions=pos, segment_ids=seg)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0])
        return jax.jit(jax.value_and_grad(f))(params)

    (l1, g1), (l2, g2) = loss_and_grad("full"), loss_and_grad("none")
    ge = max(err(x, y) for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)))
    print(f"\n[remat full] loss err {err(l1, l2):.2e}, grad err {ge:.2e}")
    assert err(l1, l2) <= 1e-6 and ge <= 1e-6
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(g1))

    # bf16 compute from fp32 master weights: runs, fp32 logits, loosely close
    _, bf16_fwd = jitted(1e6, dtype=jnp.bfloat16)
    got, _ = bf16_fwd(params, ids, pos, seg)
    assert got.dtype == jnp.float32
    rel = err(got, ref) / float(jnp.max(jnp.abs(ref)))
    print(f"[bf16] max abs err {err(got, ref):.3f} (relative to max |logit|: {rel:.3f})")
    assert np.isfinite(np.asarray(got)).all() and rel < 0.05

    # bf16 cache path (prefill of the same tokens) runs and agrees loosely
    cache = qwen2.init_cache(cfg, B, T, jnp.bfloat16)
    got_c, cache = bf16_fwd(params, ids, pos, seg, cache)
    assert cache.k.dtype == jnp.bfloat16 and np.isfinite(np.asarray(got_c)).all()
    assert err(got_c, ref) / float(jnp.max(jnp.abs(ref))) < 0.05

    # round trip Flax -> HF gives back the very same tensors
    back = key_map.flax_to_hf(params, keys.causal_lm_rules(cfg))
    assert set(back) == set(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_embed_clips_placeholder_ids_and_rules():
    cfg, _, params, sd = reference(1e6)
    model = qwen2.Qwen2Model(cfg)
    emb = model.apply({"params": params["model"]}, jnp.array([[-200, 0, VOCAB - 1]]), method="embed")
    assert emb.shape == (1, 3, 64) and np.isfinite(np.asarray(emb)).all()
    np.testing.assert_array_equal(np.asarray(emb[0, 2]), sd["model.embed_tokens.weight"][VOCAB - 1])

    # the model rules are relative to Qwen2Model (no prefix); a missing tensor is named
    rel = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params["model"])
    del rel["layers.1.self_attn.k_proj.bias"]
    with pytest.raises(key_map.KeyMappingError, match="layers.1.self_attn.k_proj.bias"):
        key_map.hf_to_flax(rel, keys.qwen2_rules(cfg), shapes)

    with pytest.raises(ValueError, match="exactly one"):
        qwen2.Qwen2ForCausalLM(cfg).apply({"params": params}, None)


# ----------------------------------------------------------------------------- 5. tied embeddings (Qwen2.5)


@functools.lru_cache(maxsize=None)
def tied_reference():
    """A tiny Qwen2.5-style config with tied embeddings (the VRVL3-2B decoder): HF model + flax params."""
    cfg = TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                     max_position_embeddings=32, tie_word_embeddings=True)
    hf_cfg = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=32,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=True,
        attn_implementation="eager")
    torch.manual_seed(1)
    hf = transformers.Qwen2ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    # The reference really is tied: one tensor under both names.
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    sd = key_map.torch_state_to_numpy(hf.state_dict())
    model = qwen2.Qwen2ForCausalLM(cfg)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    params = key_map.hf_to_flax(sd, keys.causal_lm_rules(cfg), shapes, available=list(sd),
                                ignore=keys.causal_lm_ignore_patterns(cfg))
    return cfg, hf, jax.tree.map(jnp.asarray, params), sd


def test_tied_embeddings_parity():
    cfg, hf, params, sd = tied_reference()
    assert set(params) == {"model"}  # no lm_head parameter at all
    model = qwen2.Qwen2ForCausalLM(cfg)
    fwd = jax.jit(lambda p, ids, pos, seg, cache=None: model.apply(
        {"params": p}, ids, positions=pos, segment_ids=seg, cache=cache))
    rng = np.random.default_rng(5)
    B, T = 2, 12
    ids = rng.integers(0, VOCAB, (B, T))
    pos = np.broadcast_to(np.arange(T), (B, T))

    got, _ = fwd(params, ids, pos, np.ones((B, T), np.int32))
    ref = hf_logits(hf, ids)
    e = err(got, ref)
    print(f"\n[tied] no padding: max abs err {e:.2e} (max |logit| {np.abs(ref).max():.1f})")
    assert got.dtype == jnp.float32 and got.shape == (B, T, VOCAB) and e <= TOL

    lengths = np.array([12, 7])
    real = np.arange(T)[None, :] < lengths[:, None]
    got, _ = fwd(params, ids, pos, real.astype(np.int32))
    ref = hf_logits(hf, ids, attention_mask=real)
    e = max(err(np.asarray(got)[b, :n], ref[b, :n]) for b, n in enumerate(lengths))
    print(f"[tied] right padding: max abs err {e:.2e}")
    assert e <= TOL

    # rope theta comes from the config (1e6 here, tests above use 1e4 too); max_position_embeddings (32)
    # bounds nothing in either implementation: 40 positions agree as well
    long_ids = rng.integers(0, VOCAB, (1, 40))
    got, _ = model.apply({"params": params}, long_ids)
    e = err(got, hf_logits(hf, long_ids))
    print(f"[tied] 40 positions > max_position_embeddings=32: max abs err {e:.2e}")
    assert e <= TOL

    # prefill 8 tokens, then decode 4 one at a time, against the full HF forward
    cache = qwen2.init_cache(cfg, 1, T, jnp.float32)
    pre, cache = fwd(params, ids[:1, :8], pos[:1, :8], np.ones((1, 8), np.int32), cache)
    steps = [np.asarray(pre)[0]]
    for t in range(8, T):
        lg, cache = fwd(params, ids[:1, t:t + 1], np.array([[t]]), np.ones((1, 1), np.int32), cache)
        steps.append(np.asarray(lg)[0])
    e = err(np.concatenate(steps), hf_logits(hf, ids[:1])[0])
    print(f"[tied] cache prefill + decode: max abs err {e:.2e}")
    assert e <= TOL

    # the free function and the module agree; the table is the HF embedding
    seg = np.ones((B, T), np.int32)
    hidden, _ = model.apply({"params": params}, jnp.asarray(ids), pos, seg,
                            method=lambda m, i, p, s: m.model(m.model.embed(i), p, s))
    direct = qwen2.tied_logits(jnp.asarray(sd["model.embed_tokens.weight"]), hidden, jnp.float32)
    np.testing.assert_allclose(np.asarray(direct), np.asarray(fwd(params, ids, pos, seg)[0]), rtol=0, atol=1e-5)

    # bf16 compute: the tied matmul runs in bf16, the logits come back fp32 and loosely close
    ref = np.asarray(fwd(params, ids, pos, seg)[0])
    got, _ = qwen2.Qwen2ForCausalLM(cfg, dtype=jnp.bfloat16).apply({"params": params}, ids)
    assert got.dtype == jnp.float32 and err(got, ref) / np.abs(ref).max() < 0.05

    # Flax -> HF gives back every tensor but the tied alias
    back = key_map.flax_to_hf(params, keys.causal_lm_rules(cfg))
    assert set(back) == set(sd) - {"lm_head.weight"}
    for k, v in back.items():
        np.testing.assert_array_equal(v, sd[k], err_msg=k)


def test_tied_generate_and_untied_rules():
    """Greedy generation runs through the tied head (the engine calls `lm_head`) and matches HF's argmax
    chain; untied configs keep their lm_head rule and ignore nothing."""
    from vrefer_jax.inference import generate as gen_lib
    from vrefer_jax.inference.sampling import GenerationConfig

    cfg, hf, params, _ = tied_reference()
    prompt = np.random.default_rng(6).integers(1, VOCAB, 7).tolist()
    out = gen_lib.generate_text(cfg, params, np.array([prompt]), np.array([7]),
                                GenerationConfig(max_new_tokens=5, eos_token_ids=(), pad_token_id=0))
    seq = list(prompt)
    for _ in range(5):
        seq.append(int(hf_logits(hf, np.array([seq]))[0, -1].argmax()))
    assert np.asarray(out.tokens)[0].tolist() == seq[7:]

    untied = make_cfg(1e6)
    assert [r.hf for r in keys.causal_lm_rules(untied)][-1] == "lm_head.weight"
    assert keys.causal_lm_ignore_patterns(untied) == []
    assert "lm_head.weight" not in [r.hf for r in keys.causal_lm_rules(tied_reference()[0])]
