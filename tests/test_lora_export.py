"""LoRA exports: the PEFT adapter loaded by `peft` onto `transformers`' Qwen2 gives our logits, and
`vrefer-convert export` of a LoRA folder (merged) reads back as the adapted model."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from test_lora import base_cfg, batch_of, logits, random_b, with_lora
from vrefer_jax import families
from vrefer_jax.checkpoints import key_map, peft_export, store, videorefer_keys
from vrefer_jax.config import LoraConfig
from vrefer_jax.models import lora as lora_lib, qwen2

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.torch


def _plain(tree):
    """The base weights of a LoRA tree (adapters dropped; the tests keep the base in fp32)."""
    flat = traverse_util.flatten_dict(tree)
    return traverse_util.unflatten_dict({p: v for p, v in flat.items() if p[-1] not in lora_lib.ADAPTER_LEAVES})


def _hf_qwen2(text, lm_params):
    t = text
    hf_cfg = transformers.Qwen2Config(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, rms_norm_eps=t.rms_norm_eps,
        max_position_embeddings=t.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta},
        tie_word_embeddings=t.tie_word_embeddings, attn_implementation="eager")
    hf = transformers.Qwen2ForCausalLM(hf_cfg).eval()
    sd = key_map.flax_to_hf(jax.tree.map(np.asarray, lm_params), videorefer_keys.causal_lm_rules(t))
    missing, unexpected = hf.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return hf


FAMILIES = ["videorefer", pytest.param("videorefer_videollama3", marks=pytest.mark.slow)]


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_loads_the_adapter_with_our_logits(family, tmp_path, monkeypatch):
    """Decoder of the family's tiny model (text only, fp32): ours with adapters == peft's
    `PeftModel` over `transformers.Qwen2ForCausalLM` holding the same base weights; also the merge
    (`merge_and_unload`) equals `merge_params`."""
    cfg = with_lora(base_cfg(family), rank=3, alpha=7.0, targets=("q_proj", "k_proj", "v_proj", "o_proj",
                                                                   "gate_proj", "up_proj", "down_proj"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network: the base is given as a model, not a name
    params = random_b(families.for_config(cfg).init_params(cfg, jax.random.PRNGKey(2)), scale=0.1)
    out = str(tmp_path / "adapter")
    names = peft_export.save_adapter(cfg, params, out)
    conf = json.load(open(os.path.join(out, peft_export.CONFIG_NAME)))
    assert conf["r"] == 3 and conf["lora_alpha"] == 7.0 and conf["peft_type"] == "LORA"
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in names
    assert len(names) == 2 * 7 * cfg.text.num_hidden_layers

    lm = {"model": params["llm"], **({"lm_head": params["lm_head"]} if "lm_head" in params else {})}
    hf = _hf_qwen2(cfg.text, _plain(lm))
    pm = peft.PeftModel.from_pretrained(hf, out).eval()
    # every tensor of the file landed on a module (PEFT's own view of the adapter state)
    loaded = peft.utils.get_peft_model_state_dict(pm)
    assert sorted(loaded) == names
    for k in names[:4]:
        np.testing.assert_array_equal(loaded[k].numpy(), np.asarray(peft_export.adapter_tensors(cfg, params)[k]))
    # PEFT matched only the decoder's projections (the regex), all of them
    lora_modules = [n for n, m in pm.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert len(lora_modules) == 7 * cfg.text.num_hidden_layers

    ids = np.random.default_rng(0).integers(0, cfg.text.vocab_size, (2, 11)).astype(np.int32)
    ours = np.asarray(qwen2.Qwen2ForCausalLM(cfg.text).apply({"params": lm}, input_ids=jnp.asarray(ids))[0])
    with torch.no_grad():
        theirs = pm(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    err = np.abs(ours - theirs).max()
    print(f"{family}: max |logit diff| ours vs peft {err:.2e} (logits up to {np.abs(ours).max():.1f})")
    assert err < 2e-5 * max(1.0, np.abs(ours).max())
    # the adapters matter at this scale (the comparison is not of two base models)
    base_logits = np.asarray(qwen2.Qwen2ForCausalLM(dataclasses.replace(cfg.text, lora=LoraConfig(rank=0))).apply(
        {"params": _plain(lm)}, input_ids=jnp.asarray(ids))[0])
    assert np.abs(ours - base_logits).max() > 100 * err

    merged_hf = pm.merge_and_unload()
    ours_merged = key_map.flax_to_hf(jax.tree.map(np.asarray, lora_lib.merge_params(lm, cfg.text.lora.scaling)),
                                     videorefer_keys.causal_lm_rules(cfg.text))
    theirs_merged = {k: v.numpy() for k, v in merged_hf.state_dict().items()}
    for k, v in ours_merged.items():
        np.testing.assert_allclose(v, theirs_merged[k], atol=1e-6, err_msg=k)


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_export_reads_back_as_the_adapted_model(family, tmp_path):
    """`vrefer-convert export` of a LoRA folder writes the merged official layout; importing it back
    gives the adapted model's logits on a multimodal batch. `export-adapter` writes the PEFT pair."""
    from vrefer_jax.checkpoints import cli

    cfg = with_lora(base_cfg(family), base_dtype="int8")
    fam = families.for_config(cfg)
    params = random_b(fam.init_params(cfg, jax.random.PRNGKey(4)))
    src = str(tmp_path / "lora_final")
    store.save_imported(src, cfg, params, fam.hf_config(cfg) if fam.hf_config else None, None)
    assert cli.main(["export", src, str(tmp_path / "hf"), "--dtype", "float32"]) == 0
    assert cli.main(["export-adapter", src, str(tmp_path / "peft")]) == 0
    assert sorted(os.listdir(tmp_path / "peft")) == [peft_export.CONFIG_NAME, peft_export.WEIGHTS_NAME]
    back_cfg, back = fam.load_hf(str(tmp_path / "hf"))
    assert not back_cfg.text.lora.enabled and not lora_lib.has_adapters(back)
    batch = batch_of(cfg)
    ref = logits(cfg, params, batch)
    got = logits(back_cfg.replace(**{k: getattr(cfg, k) for k in ("dtype", "param_dtype")}), back, batch)
    assert np.abs(ref - got).max() < 1e-4 * max(1.0, np.abs(ref).max())


def test_adapter_export_refuses_a_plain_tree():
    cfg = base_cfg("videorefer")
    with pytest.raises(ValueError, match="no LoRA adapters"):
        peft_export.adapter_tensors(cfg, families.for_config(cfg).abstract_params(cfg))
