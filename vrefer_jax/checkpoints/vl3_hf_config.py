"""VideoRefer-VideoLLaMA3 (VRVL3) `config.json` <-> `VL3Config` (reference §12, §2, §9.1, §11).

Reading (`vl3_config_from_hf`) requires the fields the official code reads and refuses what it
cannot run, naming the field (`ConfigFieldError`, a ValueError):

  model_type               "videollama3_qwen2"
  mm_hidden_size           the vision width; must equal the encoder's hidden_size
  spatial_merge_size       the video merge stride (2 in the releases)
  mm_projector_type        "mlp2x_gelu" (the only type the released models use)
  use_token_compression    must be true: the official non-compression path is commented out
  image_token_index / region_token_index
                           else the tokenizer's added tokens `<image>` / `<REGION>` (the official
                           loader recomputes both from the tokenizer; a disagreement is refused)
  Qwen2 fields             vocab_size, hidden_size, intermediate_size, num_hidden_layers,
                           num_attention_heads, num_key_value_heads, rms_norm_eps, rope_theta (or
                           `rope_parameters.rope_theta`), max_position_embeddings, tie_word_embeddings
  mm_max_length            optional (absent: the official default 9477 // merge**2, kept as None)

Vision sizes (the official code reads them from the folder `vision_encoder` / `mm_vision_encoder`
names, not from config.json): a nested dict `vision_encoder_config` (or `vision_config`) when the
config carries one (our exports do), else the `config.json` of that folder when it is local
(`vision_config_of`), else the VL3-SigLIP-NaViT sizes of §2, with a logged note (the importer's
shape checks still catch a different width, head count or layer count).

Writing (`vl3_config_to_hf`) gives the config.json the official `load_pretrained_model` reads: every
field of §12 (read and written-but-unused ones), `architectures: ["Videollama3Qwen2ForCausalLM"]`,
`vision_encoder` / `mm_vision_encoder` naming the vision sub-folder the exporter writes (relative by
default, `VISION_DIR`; the official loader resolves it against the working directory, our importer
against the checkpoint folder), `torch_dtype`, plus `vision_encoder_config` and `region_token_num`
so that any size round-trips. `mm_max_length` is written as the effective value
(`VL3Config.max_visual_tokens`): the official code cannot take a null.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from vrefer_jax.checkpoints import hf_config
from vrefer_jax.config import TextConfig
from vrefer_jax.vl3_config import DEFAULT_MAX_PATCHES, IMAGE_MEAN, IMAGE_STD, MIN_PIXELS, NaViTConfig, VL3Config

log = logging.getLogger(__name__)

MODEL_TYPE = "videollama3_qwen2"
ARCHITECTURE = "Videollama3Qwen2ForCausalLM"
VISION_DIR = "vision_encoder"  # the sub-folder the exporter writes; config.json names it
# `DAMOVLVisionConfig.model_type`: the official config class loads it without a warning.
VISION_MODEL_TYPE = "damovl"
PROJECTOR_TYPE = "mlp2x_gelu"
IMAGE_TOKEN, REGION_TOKEN = "<image>", "<REGION>"
NESTED_VISION_KEYS = ("vision_encoder_config", "vision_config")
# The Qwen2 fields a VRVL3 config.json must carry (no silent transformers defaults: those are 7B-ish).
REQUIRED_TEXT = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings")
REQUIRED_MM = ("mm_hidden_size", "spatial_merge_size", "mm_projector_type", "use_token_compression")
# VL3-SigLIP-NaViT (§2, §3): what `vision_config_from_hf` fills in for absent fields.
NAVIT_SIZES = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                   num_channels=3, patch_size=14, layer_norm_eps=1e-6)
# Written-but-unused fields (§12), with the values the official trainer would write for the
# released recipe where it is known; a base config's values are kept.
UNUSED_DEFAULTS = dict(mm_vision_select_layer=-1, mm_vision_select_feature="patch", image_aspect_ratio="square",
                       image_token_length=1,  # MlpGeluProjector.cal_proj_size(-1) = (-1) * (-1)
                       is_alignment=False, max_frames=768, llm_lr=None, mm_projector_lr=None,
                       vision_encoder_lr=None, region_encoder_lr=None, tokenizer_model_max_length=16384,
                       tokenizer_padding_side="right", mm_attn_implementation="flash_attention_2")


class ConfigFieldError(ValueError):
    """A VRVL3 config.json field that is missing or has a value the model cannot run; names it."""


def _field(d: dict, name: str, what: str = "config.json"):
    if name not in d or d[name] is None:
        raise ConfigFieldError(f"{what}: missing field {name!r} (a VRVL3 checkpoint's config.json carries it)")
    return d[name]


# ----------------------------------------------------------------------------- reading


def vision_config_from_hf(d: dict) -> NaViTConfig:
    """A `DAMOVLVisionConfig` / VL3-SigLIP-NaViT / transformers `Videollama3VisionConfig` dict ->
    `NaViTConfig`; absent size fields take the VL3-SigLIP-NaViT values."""
    g = {**NAVIT_SIZES, **{k: v for k, v in d.items() if v is not None}}
    if g.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ConfigFieldError(f"vision config: hidden_act {g['hidden_act']!r}: SigLIP-NaViT uses gelu_pytorch_tanh")
    return NaViTConfig(**{k: type(v)(g[k]) for k, v in NAVIT_SIZES.items()})


def vision_folder_of(d: dict, folder: str | None = None) -> str | None:
    """The local folder `mm_vision_encoder` (which the official builder prefers) or `vision_encoder`
    names: an absolute path, or a path relative to the checkpoint `folder` (our exports write a
    relative sub-folder). None when it is not a local folder with a config.json (a hub name, or the
    authors' own path)."""
    for key in ("mm_vision_encoder", "vision_encoder"):
        v = d.get(key)
        if not isinstance(v, str) or not v:
            continue
        cands = [v] if os.path.isabs(v) else ([os.path.join(folder, v)] if folder is not None else [])
        for c in cands:
            if os.path.isfile(os.path.join(c, "config.json")):
                return c
        return None  # the builder reads this key; a later one would not be used
    return None


def vision_config_of(d: dict, folder: str | None = None) -> NaViTConfig:
    """The encoder sizes of a VRVL3 config.json (see the module docstring for the order)."""
    for key in NESTED_VISION_KEYS:
        if isinstance(d.get(key), dict):
            return vision_config_from_hf(d[key])
    vdir = vision_folder_of(d, folder)
    if vdir is not None:
        return vision_config_from_hf(hf_config.find_config(vdir))
    log.warning("config.json names no local vision encoder folder and carries no %s (vision_encoder=%r): "
                "assuming the VL3-SigLIP-NaViT sizes %s", NESTED_VISION_KEYS[0],
                d.get("mm_vision_encoder", d.get("vision_encoder")), NAVIT_SIZES)
    return NaViTConfig(**NAVIT_SIZES)


def text_config_of(d: dict) -> TextConfig:
    """The Qwen2 decoder of a VRVL3 config.json; every size field is required."""
    for k in REQUIRED_TEXT:
        _field(d, k)
    if "rope_theta" not in d and "rope_theta" not in (d.get("rope_parameters") or {}):
        raise ConfigFieldError("config.json: missing field 'rope_theta' (nor rope_parameters.rope_theta)")
    try:
        return hf_config.text_config_from_hf(d)
    except ValueError as e:
        raise ConfigFieldError(f"config.json: {e}") from None


def tokenizer_ids(folder: str) -> dict:
    """`image_token_id` / `region_token_id` / `pad_token_id` from the tokenizer files in `folder`
    (the added tokens `<image>` / `<REGION>`; empty when there are no tokenizer files)."""
    if not any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "vocab.json")):
        return {}
    from vrefer_jax.text.tokenizer import HFTokenizer

    tok = HFTokenizer.from_file(folder, extra_special_tokens=())
    out = {"pad_token_id": tok.pad_id}
    for key, token in (("image_token_id", IMAGE_TOKEN), ("region_token_id", REGION_TOKEN)):
        if (i := tok.token_to_id(token)) is not None:
            out[key] = i
    return out


def _token_id(d: dict, field: str, token: str, from_tokenizer: int | None) -> int:
    stored = d.get(field)
    if stored is not None and from_tokenizer is not None and int(stored) != from_tokenizer:
        raise ConfigFieldError(f"config.json: {field} {stored} but the tokenizer's {token} is {from_tokenizer} "
                               "(the official loader uses the tokenizer's)")
    if stored is None and from_tokenizer is None:
        raise ConfigFieldError(f"config.json: missing field {field!r} and no tokenizer {token} token to take it from")
    return int(stored if stored is not None else from_tokenizer)


def vl3_config_from_hf(
    d: dict,
    *,
    vision: NaViTConfig | None = None,
    folder: str | None = None,
    image_token_id: int | None = None,
    region_token_id: int | None = None,
    pad_token_id: int | None = None,
    **overrides: Any,
) -> VL3Config:
    """An official VRVL3 `config.json` dict -> `VL3Config`.

    Args:
      d: the config.json dict.
      vision: the encoder sizes; default `vision_config_of(d, folder)`.
      folder: the checkpoint folder (a relative `vision_encoder` is looked up in it).
      image_token_id / region_token_id / pad_token_id: the tokenizer's ids (`tokenizer_ids`); the
        first two must agree with `image_token_index` / `region_token_index` when both exist.
      overrides: other `VL3Config` fields (numerics); the rest are the dataclass defaults,
        whatever gin bindings are in force.
    Raises `ConfigFieldError` naming a missing or unsupported field.
    """
    if d.get("model_type") != MODEL_TYPE:
        raise ConfigFieldError(f"config.json: model_type {d.get('model_type')!r} is not {MODEL_TYPE!r} (VRVL3)")
    for k in REQUIRED_MM:
        _field(d, k)
    if d["use_token_compression"] is not True:
        raise ConfigFieldError(f"config.json: use_token_compression is {d['use_token_compression']!r}; VRVL3 needs "
                               "true (the official path without compression is commented out and returns nothing)")
    if d["mm_projector_type"] != PROJECTOR_TYPE:
        raise ConfigFieldError(f"config.json: mm_projector_type {d['mm_projector_type']!r}: only {PROJECTOR_TYPE!r} "
                               "(the released models') is implemented")
    text = text_config_of(d)
    vision = vision if vision is not None else vision_config_of(d, folder)
    if int(d["mm_hidden_size"]) != vision.hidden_size:
        raise ConfigFieldError(f"config.json: mm_hidden_size {d['mm_hidden_size']} != the vision encoder's "
                               f"hidden_size {vision.hidden_size}")
    merge = int(d["spatial_merge_size"])
    if merge < 1:
        raise ConfigFieldError(f"config.json: spatial_merge_size {merge} must be >= 1")
    mm_max = d.get("mm_max_length")
    if pad_token_id is None:
        pad_token_id = d.get("pad_token_id", d.get("bos_token_id"))
    kw = hf_config.plain_defaults(VL3Config)
    kw.update(
        vision=vision, text=text, projector_type=PROJECTOR_TYPE, spatial_merge_size=merge,
        mm_max_length=None if mm_max is None else int(mm_max), use_token_compression=True,
        region_token_num=int(d.get("region_token_num", kw["region_token_num"])),
        image_token_id=_token_id(d, "image_token_index", IMAGE_TOKEN, image_token_id),
        region_token_id=_token_id(d, "region_token_index", REGION_TOKEN, region_token_id))
    if pad_token_id is not None:
        kw["pad_token_id"] = int(pad_token_id)
    kw.update(overrides)
    for k in ("image_token_id", "region_token_id", "pad_token_id"):
        if not 0 <= kw[k] < text.vocab_size:
            raise ConfigFieldError(f"config.json: {k} {kw[k]} is outside the vocabulary (vocab_size {text.vocab_size})")
    return VL3Config(**kw)


# ----------------------------------------------------------------------------- writing


def vision_config_to_hf(v: NaViTConfig, spatial_merge_size: int = 1) -> dict:
    """A `DAMOVLVisionConfig` dict (the vision sub-folder's config.json). `spatial_merge_size` is the
    encoder config's own (1: the encoder never merges; the wrapper passes the model's at load)."""
    return dict(model_type=VISION_MODEL_TYPE, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                num_channels=v.num_channels, patch_size=v.patch_size, layer_norm_eps=v.layer_norm_eps,
                hidden_act="gelu_pytorch_tanh", attention_dropout=0.0, spatial_merge_size=spatial_merge_size)


def preprocessor_config(v: NaViTConfig) -> dict:
    """VL3-SigLIP-NaViT's `preprocessor_config.json` (§4.1) at the encoder's patch size. The official
    wrapper overrides `merge_size` and `max_pixels` from the model config at load."""
    return dict(image_processor_type="DAMOVLImageProcessor", do_resize=True, do_rescale=True, do_normalize=True,
                do_convert_rgb=True, image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD), resample=3,
                rescale_factor=1 / 255, patch_size=v.patch_size, merge_size=1,
                min_pixels=MIN_PIXELS, max_pixels=v.patch_size * v.patch_size * DEFAULT_MAX_PATCHES)


def vl3_config_to_hf(
    cfg: VL3Config,
    *,
    vision_encoder: str = VISION_DIR,
    torch_dtype: str = "bfloat16",
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    base: dict | None = None,
) -> dict:
    """`VL3Config` -> the official VRVL3 `config.json` dict.

    `base` (e.g. the config.json imported from) keeps its other fields (and its values of the
    written-but-unused ones); the model's fields overwrite it. `vision_encoder` is written to both
    `vision_encoder` and `mm_vision_encoder` (the official builder prefers the latter).
    """
    out = dict(base or {})
    for k in ("rope_parameters", "rope_scaling", "dtype", *NESTED_VISION_KEYS):  # replaced below
        out.pop(k, None)
    text = hf_config.text_config_to_hf(cfg.text)
    text["max_window_layers"] = out.get("max_window_layers", text["max_window_layers"])  # inert without sliding window
    out.update(
        architectures=[ARCHITECTURE], model_type=MODEL_TYPE, **text, torch_dtype=torch_dtype,
        vision_encoder=vision_encoder, mm_vision_encoder=vision_encoder,
        vision_encoder_config=vision_config_to_hf(cfg.vision), mm_hidden_size=cfg.vision.hidden_size,
        mm_projector_type=cfg.projector_type, use_mm_proj=True, spatial_merge_size=cfg.spatial_merge_size,
        mm_max_length=cfg.max_visual_tokens, use_token_compression=cfg.use_token_compression,
        image_token_index=cfg.image_token_id, region_token_index=cfg.region_token_id,
        region_token_num=cfg.region_token_num, pad_token_id=cfg.pad_token_id,
        image_size=cfg.vision.patch_size * cfg.spatial_merge_size)
    for k, v in UNUSED_DEFAULTS.items():
        out.setdefault(k, v)
    out.setdefault("sliding_window", None)
    if bos_token_id is not None:
        out["bos_token_id"] = bos_token_id
    if eos_token_id is not None:
        out["eos_token_id"] = eos_token_id
    return dict(sorted(out.items()))


# Every field §12 says the official code reads or writes (what an exported config.json must hold).
SECTION_12_FIELDS = (
    "model_type", "vision_encoder", "mm_vision_encoder", "mm_projector_type", "mm_hidden_size", "spatial_merge_size",
    "mm_max_length", "use_token_compression", "image_token_index", "region_token_index", "torch_dtype",
    "mm_attn_implementation", "mm_vision_select_layer", "mm_vision_select_feature", "image_aspect_ratio",
    "image_size", "image_token_length", "is_alignment", "max_frames", "llm_lr", "mm_projector_lr",
    "vision_encoder_lr", "region_encoder_lr", "tokenizer_model_max_length", "tokenizer_padding_side",
    *REQUIRED_TEXT, "rope_theta")

__all__ = ["MODEL_TYPE", "ARCHITECTURE", "VISION_DIR", "ConfigFieldError", "vision_config_from_hf",
           "vision_folder_of", "vision_config_of", "text_config_of", "tokenizer_ids", "vl3_config_from_hf",
           "vision_config_to_hf", "preprocessor_config", "vl3_config_to_hf", "SECTION_12_FIELDS"]
