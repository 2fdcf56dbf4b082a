"""LoRA adapters out: the adapter alone in PEFT's format, and LoRA folders merged for the full export.

PEFT folder (`peft.PeftModel.from_pretrained(base, folder)` loads it onto the `transformers` model
of the same base):

  adapter_config.json          peft_type LORA, r, lora_alpha, lora_dropout, target_modules
  adapter_model.safetensors    base_model.model.<module>.lora_A.weight [r, in]
                               base_model.model.<module>.lora_B.weight [out, r]

`<module>` is the official checkpoint's name of each adapted projection, read from the family's
key rules (`model.layers.{i}.self_attn.q_proj` for both families), so the names are those of the
official checkpoint and of `transformers`' Qwen2. `target_modules` is a regular expression over
exactly those modules (PEFT full-matches a string): a plain list such as ["q_proj"] would also
match the vision towers' `q_proj` layers of the multimodal model.

Only the LoRA leaves go into the adapter. Parts trained in full beside it (the projector or region
encoder, when the run trained them) are not: the merged export (`merged`) carries everything.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import numpy as np

from vrefer_jax import families
from vrefer_jax.checkpoints import key_map
from vrefer_jax.models import lora as lora_lib

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def _module_rules(cfg) -> dict[tuple[str, ...], key_map.KeyRule]:
    """Flax path of each projection (without `kernel`) -> the key rule of its base kernel."""
    rules = families.for_config(cfg).key_rules(cfg)
    return {r.flax[:-1]: r for r in rules if r.flax[-1] == "kernel" and r.hf.endswith(".weight")}


def adapter_tensors(cfg, params: Mapping) -> dict[str, np.ndarray]:
    """The PEFT state dict of `params`' adapters: {name: fp32 array in PyTorch's layout}.

    Raises ValueError when the tree holds no adapters or one sits on a module without a key rule."""
    rules = _module_rules(cfg)
    out: dict[str, np.ndarray] = {}
    for path, node in lora_lib.projections(params):
        rule = rules.get(path)
        if rule is None:
            raise ValueError(f"adapter on {'/'.join(path)}: no official module name for it")
        lead, n_in, _ = lora_lib.layout(node)
        a_rule = key_map.KeyRule(rule.hf, rule.flax, "linear", in_ndim=n_in)  # A: a linear in -> r
        b_rule = key_map.KeyRule(rule.hf, rule.flax, "linear", in_ndim=1)  # B: a linear r -> out
        a, b = np.asarray(node["lora_a"], np.float32), np.asarray(node["lora_b"], np.float32)
        module = rule.hf[: -len(".weight")]
        for i in range(a.shape[0]) if lead else [None]:
            name = PEFT_PREFIX + (module.format(i=i) if i is not None else module)
            out[name + ".lora_A.weight"] = key_map.to_hf_layout(a_rule, a[i] if lead else a)
            out[name + ".lora_B.weight"] = key_map.to_hf_layout(b_rule, b[i] if lead else b)
    if not out:
        raise ValueError("the parameters hold no LoRA adapters (TextConfig.lora.rank is 0)")
    return out


def target_regex(cfg, params: Mapping) -> str:
    """A regular expression (PEFT full match) naming exactly the adapted modules."""
    rules = _module_rules(cfg)
    pats = sorted({re.escape(rules[p].hf[: -len(".weight")]).replace(re.escape("{i}"), r"\d+")
                   for p, _ in lora_lib.projections(params)})
    return "|".join(f"({p})" for p in pats) if len(pats) > 1 else pats[0]


def adapter_config(cfg, params: Mapping, base_model: str | None = None) -> dict:
    """PEFT's `LoraConfig` fields for the adapter of `params`."""
    c = cfg.text.lora
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": c.rank, "lora_alpha": c.alpha, "lora_dropout": c.dropout,
        "target_modules": target_regex(cfg, params), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }


def save_adapter(cfg, params: Mapping, out: str, base_model: str | None = None) -> list[str]:
    """Write `adapter_config.json` + `adapter_model.safetensors` into `out`; returns the tensor names."""
    from safetensors.numpy import save_file

    tensors = adapter_tensors(cfg, params)
    os.makedirs(out, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(out, WEIGHTS_NAME),
              metadata={"format": "pt"})
    with open(os.path.join(out, CONFIG_NAME), "w") as f:
        json.dump(adapter_config(cfg, params, base_model), f, indent=2)
    return sorted(tensors)


def merged(cfg, params: Mapping):
    """(cfg without adapters, params with every adapter folded into its kernel in the model's
    `param_dtype`): what the official-layout exporters write. Plain trees are returned as they are."""
    import dataclasses

    from vrefer_jax.checkpoints.hf_config import plain_defaults
    from vrefer_jax.config import LoraConfig

    if not lora_lib.has_adapters(params):
        return cfg, params
    lora = cfg.text.lora
    plain = cfg.replace(text=dataclasses.replace(cfg.text, lora=LoraConfig(**plain_defaults(LoraConfig))))
    return plain, lora_lib.merge_params(params, lora.scaling, dtype=np.dtype(cfg.param_dtype))
