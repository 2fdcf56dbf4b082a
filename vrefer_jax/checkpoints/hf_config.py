"""`ModelConfig` <-> Hugging Face `config.json` / `generation_config.json`.

Reads the official VideoRefer `config.json` (`model_type: videorefer_qwen2`, a Qwen2 config plus the
`mm_*` fields), plain Qwen2 / Qwen2.5 and SigLIP configs (both the transformers-4 `rope_theta` and the
transformers-5 `rope_parameters` spellings), and writes configs the official code and `transformers`
load. Fields the official model reads: `mm_vision_tower`, `mm_vision_select_layer`,
`mm_vision_select_feature`, `mm_projector_type`, `mm_hidden_size`, `mm_region_encoder_type`,
`image_aspect_ratio`, `num_frames`, `tune_mm_mlp_adapter` (loader path), plus the Qwen2 fields.

Extra fields we write (ignored by the official code, which always builds the 7B layout) so that any
size round-trips: `mm_vision_config` (the SigLIP vision config, so the tower's shape is known without
the SigLIP folder), `mm_projector_depth`, `mm_projector_mlp_depth`, `mm_projector_downsample`,
`region_token_num`, `region_token_id`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from vrefer_jax import json_files
from vrefer_jax.config import ASPECT_RATIOS, ConnectorConfig, ModelConfig, ObjectEncoderConfig, TextConfig, VisionConfig

SO400M = "google/siglip-so400m-patch14-384"
MODEL_TYPE = "videorefer_qwen2"
ARCHITECTURE = "VideoReferQwen2ForCausalLM"
# Qwen2-Instruct's sampling defaults (its generation_config.json); the ids come from the tokenizer.
QWEN2_SAMPLING = dict(do_sample=True, repetition_penalty=1.05, temperature=0.7, top_k=20, top_p=0.8)
ENDOFTEXT = "<|endoftext|>"

# transformers' Qwen2Config / SiglipVisionConfig defaults, for fields a config.json leaves out.
_QWEN2_DEFAULTS = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                       num_attention_heads=32, rms_norm_eps=1e-6, max_position_embeddings=32768,
                       tie_word_embeddings=False, initializer_range=0.02)
_SIGLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        num_channels=3, image_size=224, patch_size=16, layer_norm_eps=1e-6)


def plain_defaults(cls) -> dict:
    """A config dataclass's own field defaults. Calling `VisionConfig()` etc. would pick up whatever
    gin bindings are in force; passing every field explicitly does not."""
    return {f.name: f.default for f in dataclasses.fields(cls)}


# siglip-so400m-patch14-384's vision config (what `mm_vision_tower` names in the release).
SO400M_VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                     num_channels=3, image_size=384, patch_size=14, layer_norm_eps=1e-6)
# The official builders' fixed STC arguments (`STCConnector(config, downsample=(2, 2, 2), depth=4,
# mlp_depth=2)`) and `MaskExtractor(region_token_num=4)`.
OFFICIAL_STC = dict(depth=4, mlp_depth=2, downsample=(2, 2, 2))
OFFICIAL_REGION_TOKEN_NUM = 4


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path: str, obj: Any) -> None:
    """Hugging Face style JSON (indent 2), through the project's one atomic writer."""
    json_files.write_json(path, obj, indent=2)


# ----------------------------------------------------------------------------- reading


def _rope_theta(d: dict) -> float:
    rp = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    rope_type = rp.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ValueError(f"rope type {rope_type!r} is not supported (only the default RoPE of Qwen2)")
    return float(d.get("rope_theta", rp.get("rope_theta", 10000.0)))


def text_config_from_hf(d: dict) -> TextConfig:
    """A Qwen2 (or VideoRefer) `config.json` dict -> `TextConfig`."""
    g = {**_QWEN2_DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
    if g.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {g['hidden_act']!r}: the Qwen2 decoder uses silu")
    if g.get("use_sliding_window", False):
        raise ValueError("use_sliding_window=true is not supported (Qwen2-Instruct leaves it off)")
    heads = int(g["num_attention_heads"])
    if g.get("head_dim") not in (None, g["hidden_size"] // heads):
        raise ValueError(f"head_dim {g['head_dim']} != hidden_size / num_attention_heads")
    return TextConfig(
        vocab_size=int(g["vocab_size"]), hidden_size=int(g["hidden_size"]),
        intermediate_size=int(g["intermediate_size"]), num_hidden_layers=int(g["num_hidden_layers"]),
        num_attention_heads=heads, num_key_value_heads=int(g.get("num_key_value_heads", heads)),
        rms_norm_eps=float(g["rms_norm_eps"]), rope_theta=_rope_theta(d),
        max_position_embeddings=int(g["max_position_embeddings"]),
        tie_word_embeddings=bool(g["tie_word_embeddings"]), initializer_range=float(g["initializer_range"]))


def vision_config_from_hf(d: dict, select_layer: int = -2) -> VisionConfig:
    """A SigLIP `config.json` dict (`SiglipConfig` with `vision_config`, or a vision-model config)."""
    d = d.get("vision_config", d)
    g = {**_SIGLIP_DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
    if g.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ValueError(f"hidden_act {g['hidden_act']!r}: the SigLIP tower uses gelu_pytorch_tanh")
    return VisionConfig(**{k: type(v)(g[k]) for k, v in _SIGLIP_DEFAULTS.items()}, select_layer=select_layer)


def image_aspect_ratio_from_hf(d: dict) -> str:
    """`image_aspect_ratio` of a config.json: "square" (also when absent or null: the official
    `process_images` squashes then) or "pad"; anything else (e.g. LLaVA's "anyres") is refused."""
    v = d.get("image_aspect_ratio") or "square"
    if v not in ASPECT_RATIOS:
        raise ValueError(f"config.json: image_aspect_ratio {v!r} is not supported (use one of {ASPECT_RATIOS})")
    return v


def model_config_from_hf(
    d: dict,
    *,
    vision: VisionConfig | None = None,
    region_token_id: int | None = None,
    pad_token_id: int | None = None,
    **overrides: Any,
) -> ModelConfig:
    """The official VideoRefer `config.json` dict -> `ModelConfig`.

    `vision`: the SigLIP sizes (from the SigLIP folder); else `mm_vision_config`; else the
    so400m-patch14-384 sizes when `mm_vision_tower` names it. `select_layer` always comes from
    `mm_vision_select_layer`. The `<region>` id: argument, `region_token_id`, else
    `vocab_size - 1` (the official code appends `<region>` last and resizes the vocabulary to
    `len(tokenizer)`). `overrides` replace `ModelConfig` fields (e.g. dtypes); the others are the
    dataclass defaults, whatever gin bindings are in force.
    """
    text = text_config_from_hf(d)
    select = int(d.get("mm_vision_select_layer", -2))
    if vision is None:
        if "mm_vision_config" in d:
            vision = vision_config_from_hf(d["mm_vision_config"])
        elif "so400m-patch14-384" in str(d.get("mm_vision_tower", d.get("vision_tower", ""))):
            vision = VisionConfig(**SO400M_VISION, select_layer=select)
        else:
            raise ValueError(f"cannot tell the vision tower's sizes from mm_vision_tower="
                             f"{d.get('mm_vision_tower')!r}; pass the SigLIP folder")
    vision = dataclasses.replace(vision, select_layer=select)
    if d.get("mm_vision_select_feature", "patch") != "patch":
        raise ValueError(f"mm_vision_select_feature {d['mm_vision_select_feature']!r}: SigLIP has no CLS token")
    if d.get("mm_region_encoder_type", "pooling") != "pooling":
        raise ValueError(f"mm_region_encoder_type {d['mm_region_encoder_type']!r}: only 'pooling' exists")
    if d.get("mm_hidden_size", vision.hidden_size) != vision.hidden_size:
        raise ValueError(f"mm_hidden_size {d['mm_hidden_size']} != the vision tower's {vision.hidden_size}")
    connector = ConnectorConfig(
        projector_type=d.get("mm_projector_type", "linear"),  # the official builder's default
        depth=int(d.get("mm_projector_depth", OFFICIAL_STC["depth"])),
        mlp_depth=int(d.get("mm_projector_mlp_depth", OFFICIAL_STC["mlp_depth"])),
        downsample=tuple(int(x) for x in d.get("mm_projector_downsample", OFFICIAL_STC["downsample"])))
    if region_token_id is None:
        region_token_id = int(d.get("region_token_id", text.vocab_size - 1))
    if pad_token_id is None:
        pad_token_id = d.get("pad_token_id", d.get("bos_token_id"))
    kw = plain_defaults(ModelConfig)  # numerics (dtypes, remat, attention) at their defaults
    kw.update(
        vision=vision, connector=connector, text=text,
        object_encoder=ObjectEncoderConfig(region_token_num=int(d.get("region_token_num",
                                                                      OFFICIAL_REGION_TOKEN_NUM))),
        num_frames=int(d.get("num_frames", 8)),  # videorefer/constants.py NUM_FRAMES when absent
        image_aspect_ratio=image_aspect_ratio_from_hf(d),
        region_token_id=int(region_token_id), pad_token_id=int(pad_token_id or 0))
    kw.update(overrides)
    return ModelConfig(**kw)


# ----------------------------------------------------------------------------- writing


def text_config_to_hf(t: TextConfig) -> dict:
    """Qwen2 fields (the spelling transformers 4.40 wrote; transformers 5 reads it too)."""
    return dict(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, hidden_act="silu", rms_norm_eps=t.rms_norm_eps,
        rope_theta=t.rope_theta, max_position_embeddings=t.max_position_embeddings,
        max_window_layers=t.num_hidden_layers, use_sliding_window=False,
        attention_dropout=0.0, initializer_range=t.initializer_range, tie_word_embeddings=t.tie_word_embeddings,
        use_cache=True)


def vision_config_to_hf(v: VisionConfig) -> dict:
    """A `SiglipVisionConfig` dict."""
    return dict(model_type="siglip_vision_model", hidden_size=v.hidden_size,
                intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
                num_attention_heads=v.num_attention_heads, num_channels=v.num_channels,
                image_size=v.image_size, patch_size=v.patch_size, layer_norm_eps=v.layer_norm_eps,
                hidden_act="gelu_pytorch_tanh", attention_dropout=0.0)


def model_config_to_hf(
    cfg: ModelConfig,
    *,
    mm_vision_tower: str = SO400M,
    torch_dtype: str = "float16",
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    base: dict | None = None,
) -> dict:
    """`ModelConfig` -> an official VideoRefer `config.json` dict.

    `base` (e.g. the config.json we imported from) keeps its other fields; ours overwrite it.
    `mm_vision_tower` must contain "siglip" for the official `build_vision_tower` to accept it.
    The decoder is written untied (`tie_word_embeddings: false`): our model has its own lm_head.
    """
    if "siglip" not in mm_vision_tower:
        raise ValueError(f"mm_vision_tower {mm_vision_tower!r}: the official code only builds a tower whose "
                         "name contains 'siglip' (or 'clip')")
    out = dict(base or {})
    for k in ("rope_parameters", "rope_scaling"):  # replaced by rope_theta below (default RoPE only)
        out.pop(k, None)
    out.pop("dtype", None)
    c = cfg.connector
    out.update(
        architectures=[ARCHITECTURE], model_type=MODEL_TYPE,
        **text_config_to_hf(dataclasses.replace(cfg.text, tie_word_embeddings=False)),
        torch_dtype=torch_dtype,
        mm_vision_tower=mm_vision_tower, mm_vision_select_layer=cfg.vision.select_layer,
        mm_vision_select_feature="patch", mm_hidden_size=cfg.vision.hidden_size,
        mm_projector_type=c.projector_type, mm_region_encoder_type="pooling",
        image_aspect_ratio=cfg.image_aspect_ratio, num_frames=cfg.num_frames, use_mm_proj=True,
        tune_mm_mlp_adapter=False, tune_region_encoder=False, freeze_mm_mlp_adapter=False,
        mm_projector_lr=None,
        mm_vision_config=vision_config_to_hf(cfg.vision), mm_projector_depth=c.depth,
        mm_projector_mlp_depth=c.mlp_depth, mm_projector_downsample=list(c.downsample),
        region_token_num=cfg.object_encoder.region_token_num, region_token_id=cfg.region_token_id,
        pad_token_id=cfg.pad_token_id)
    out.setdefault("sliding_window", None)  # inert with use_sliding_window false; a base's value is kept
    out.setdefault("tokenizer_model_max_length", 2048)
    out.setdefault("tokenizer_padding_side", "right")
    if bos_token_id is not None:
        out["bos_token_id"] = bos_token_id
    if eos_token_id is not None:
        out["eos_token_id"] = eos_token_id
    return dict(sorted(out.items()))


def special_token_ids(tokenizer) -> dict:
    """bos / eos list / pad as Qwen2-Instruct's generation config uses them: bos = the
    tokenizer's bos, else `<|endoftext|>`; eos = [the tokenizer's eos (`<|im_end|>`), `<|endoftext|>`];
    pad = the tokenizer's pad."""
    eot = tokenizer.token_to_id(ENDOFTEXT)
    bos = tokenizer.bos_id if tokenizer.bos_id is not None else eot
    eos = [tokenizer.eos_id] + ([eot] if eot is not None and eot != tokenizer.eos_id else [])
    return dict(bos_token_id=bos, eos_token_id=eos, pad_token_id=tokenizer.pad_id)


def generation_config(bos_token_id=None, eos_token_id=None, pad_token_id=None, **sampling) -> dict:
    """`generation_config.json`: Qwen2-Instruct's sampling defaults with the given ids
    (None ids are left out). For Qwen2 ids: bos 151643, eos [151645, 151643], pad 151643."""
    out = {k: v for k, v in dict(bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                                 pad_token_id=pad_token_id).items() if v is not None}
    out.update(QWEN2_SAMPLING)
    out.update(sampling)
    return dict(sorted(out.items()))


def siglip_preprocessor_config(image_size: int) -> dict:
    """siglip-so400m-patch14-384's `preprocessor_config.json` at `image_size` (what the official
    `SiglipVisionTower` loads its image processor from)."""
    return dict(do_normalize=True, do_rescale=True, do_resize=True, image_mean=[0.5, 0.5, 0.5],
                image_processor_type="SiglipImageProcessor", image_std=[0.5, 0.5, 0.5],
                processor_class="SiglipProcessor", resample=3, rescale_factor=1 / 255,
                size={"height": image_size, "width": image_size})


# ----------------------------------------------------------------------------- files


def find_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {folder}")
    return read_json(path)
