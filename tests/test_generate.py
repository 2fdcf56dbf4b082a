"""Generation engine against `transformers` (tiny random Qwen2, fp32): greedy tokens, repetition
penalty, EOS handling, scores, batching, sampling and the HF logits warpers."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vrefer_jax.checkpoints import key_map
from vrefer_jax.checkpoints import videorefer_keys as keys
from vrefer_jax.config import TextConfig
from vrefer_jax.inference import generate as gen_lib
from vrefer_jax.inference import sampling
from vrefer_jax.inference.sampling import GenerationConfig
from vrefer_jax.models import qwen2

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, N = 128, 24
CFG = TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
                 max_position_embeddings=256)
NO_EOS = GenerationConfig(max_new_tokens=N, eos_token_ids=(), pad_token_id=0)


@functools.lru_cache(maxsize=None)
def reference():
    """(torch model, flax params): every weight random, moved with the checkpoint key map."""
    hf_cfg = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
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
                p.copy_(0.15 * torch.randn_like(p))
    sd = key_map.torch_state_to_numpy(hf.state_dict())
    model = qwen2.Qwen2ForCausalLM(CFG)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    rules = keys.causal_lm_rules(CFG)
    params = key_map.hf_to_flax(sd, rules, shapes, available=list(sd))
    back = key_map.flax_to_hf(params, rules)
    assert set(back) == set(sd) and all(np.array_equal(np.asarray(back[k]), sd[k]) for k in sd)
    return hf, jax.tree.map(jnp.asarray, params)


def prompts(seed=0, lengths=(11, 5, 8)):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCAB, n).tolist() for n in lengths]


def hf_generate(ids, gen: GenerationConfig, scores=False):
    """HF greedy generation from the prompt's embeddings (as official `mm_infer`): new tokens only."""
    hf, _ = reference()
    with torch.no_grad():
        emb = hf.model.embed_tokens(torch.tensor([ids]))
        out = hf.generate(inputs_embeds=emb, attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=gen.max_new_tokens, min_new_tokens=0, do_sample=False,
                          repetition_penalty=gen.repetition_penalty,
                          eos_token_id=list(gen.eos_token_ids) or None, pad_token_id=gen.pad_token_id,
                          output_scores=scores, return_dict_in_generate=True)
    toks = out.sequences[0].numpy().tolist()
    return toks, (np.stack([s[0].numpy() for s in out.scores]) if scores else None)


def ours(ids_list, gen: GenerationConfig, rng=None):
    _, params = reference()
    ids = np.zeros((len(ids_list), 16), np.int32)  # one static prompt length: right padding
    for b, x in enumerate(ids_list):
        ids[b, : len(x)] = x
    return gen_lib.generate_text(CFG, params, ids, [len(x) for x in ids_list], gen, rng=rng)


def row(out, b):
    n = int(out.lengths[b])
    return np.asarray(out.tokens[b, :n]).tolist()


@pytest.mark.parametrize("penalty", [1.0, 1.05, 1.5])
def test_greedy_matches_hf(penalty):
    gen = NO_EOS.replace(repetition_penalty=penalty, return_scores=True)
    for ids in prompts():
        ref, ref_scores = hf_generate(ids, gen, scores=True)
        out = ours([ids], gen)
        got = row(out, 0)
        e = float(np.max(np.abs(np.asarray(out.scores[0, : len(ref)]) - ref_scores)))
        print(f"\n[penalty {penalty}] prompt {len(ids)}: {len(ref)} tokens, identical={got == ref}, "
              f"scores max abs err {e:.2e}")
        assert got == ref
        assert e <= 1e-4
    if penalty == 1.5:  # the penalty must matter on this model, or the test proves nothing
        assert row(ours([prompts()[0]], NO_EOS), 0) != row(ours([prompts()[0]], gen), 0)


def test_eos_stops_and_pads():
    ids = prompts()[0]
    free = row(ours([ids], NO_EOS), 0)
    k = next(i for i in range(3, N) if free[i] not in free[:i])  # first occurrence at step k
    gen = NO_EOS.replace(eos_token_ids=(free[k], VOCAB - 1), pad_token_id=0)
    ref, _ = hf_generate(ids, gen)
    out = ours([ids, prompts()[1]], gen)
    assert int(out.lengths[0]) == k + 1 and row(out, 0) == free[: k + 1] == ref
    assert (np.asarray(out.tokens[0, k + 1:]) == 0).all() and (np.asarray(out.logprobs[0, k + 1:]) == 0).all()
    print(f"\nEOS {free[k]} at step {k}: stopped with {k + 1} tokens (HF: {len(ref)})")


def test_batched_mixed_lengths_equal_one_by_one():
    gen = NO_EOS.replace(repetition_penalty=1.05)
    batch = prompts(1, (13, 3, 9, 1))
    out = ours(batch, gen)
    for b, ids in enumerate(batch):
        single = ours([ids], gen)
        assert row(out, b) == row(single, 0)
        np.testing.assert_allclose(np.asarray(out.logprobs[b]), np.asarray(single.logprobs[0]), atol=1e-5)


def test_sampling_seeded():
    gen = NO_EOS.replace(do_sample=True, temperature=1.3, top_k=40, top_p=0.95, seed=1)
    ids = prompts()[:2]
    a, b = ours(ids, gen), ours(ids, gen)
    c = ours(ids, gen.replace(seed=2))
    assert np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(ours(ids, NO_EOS).tokens))
    assert gen_lib._generate_text._cache_size() >= 1
    # the seed is not part of the compiled program
    n = gen_lib._generate_text._cache_size()
    ours(ids, gen.replace(seed=3))
    assert gen_lib._generate_text._cache_size() == n


@pytest.mark.parametrize("top_k,top_p,temp", [(5, 1.0, 1.0), (0, 0.7, 1.0), (10, 0.5, 0.6), (1, 0.9, 2.0)])
def test_warpers_match_hf(top_k, top_p, temp):
    from transformers.generation import logits_process as lp

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 64)).astype(np.float32) * 3
    logits[0, :10] = logits[0, 0]  # ties at the top-k threshold
    seen = rng.random((4, 64)) < 0.2
    ids = torch.tensor([np.flatnonzero(s)[:5].tolist() for s in seen])
    seen = np.zeros_like(seen)
    for b in range(4):
        seen[b, ids[b].numpy()] = True
    x = torch.tensor(logits)
    x = lp.RepetitionPenaltyLogitsProcessor(1.2)(ids, x)
    x = lp.TemperatureLogitsWarper(temp)(ids, x)
    if top_k:
        x = lp.TopKLogitsWarper(top_k)(ids, x)
    if top_p < 1:
        x = lp.TopPLogitsWarper(top_p)(ids, x)
    gen = GenerationConfig(do_sample=True, temperature=temp, top_k=top_k, top_p=top_p, repetition_penalty=1.2)
    got = np.asarray(sampling.process_logits(jnp.asarray(logits), jnp.asarray(seen), gen))
    ref = x.numpy()
    assert np.array_equal(np.isinf(got), np.isinf(ref))
    np.testing.assert_allclose(got[~np.isinf(got)], ref[~np.isinf(ref)], rtol=1e-6)


def test_generation_config_from_hf_file(tmp_path):
    from vrefer_jax.checkpoints import hf_config

    d = hf_config.generation_config(bos_token_id=151643, eos_token_id=[151645, 151643], pad_token_id=151643)
    p = tmp_path / "generation_config.json"
    hf_config.write_json(str(p), d)
    g = GenerationConfig.from_hf_file(str(tmp_path), do_sample=False, max_new_tokens=2048)
    assert g.eos_token_ids == (151645, 151643) and g.pad_token_id == 151643
    assert g.repetition_penalty == 1.05 and not g.do_sample and g.top_k == 20 and g.top_p == 0.8
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)


def test_sharded_generation_matches():
    """Under a (data, fsdp, tensor) mesh with the logical rules: same tokens as on one device."""
    from jax.sharding import Mesh

    from vrefer_jax.sharding import logical_axis_rules

    if jax.device_count() < 8:
        pytest.skip("needs the 8 fake CPU devices of conftest")
    _, params = reference()
    batch = prompts(2, (16, 5, 9, 3))
    ref = ours(batch, NO_EOS)
    model = qwen2.Qwen2ForCausalLM(CFG)
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    rules = logical_axis_rules()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        sharded = jax.device_put(params, nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules))
        ids = np.zeros((4, 16), np.int32)
        for b, x in enumerate(batch):
            ids[b, : len(x)] = x
        out = gen_lib.generate_text(CFG, sharded, ids, [len(x) for x in batch], NO_EOS)
    assert np.array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-5)
