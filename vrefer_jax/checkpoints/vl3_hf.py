"""VideoRefer-VideoLLaMA3 (VRVL3) Hugging Face folders: import into the Flax tree, export back.

An official VRVL3 folder (reference §12) is one `Videollama3Qwen2ForCausalLM` checkpoint:
`config.json` (`model_type: videollama3_qwen2`, read by `vl3_hf_config`), safetensors shards + index
holding the decoder (`model.embed_tokens`, `model.layers.*`, `model.norm`), the vision encoder
(`model.vision_encoder.vision_encoder.vision_model.*`), the projector (`model.mm_projector.readout.*`),
the region encoder (`model.region_encoder.feat_linear.*`) and, untied models only, `lm_head.weight`;
tokenizer files with `<image>` / `<REGION>` added; `generation_config.json`. Names:
`vl3_keys.vl3_rules` through the family registry.

Import (`import_vl3`) reuses the generic streaming machinery of `hf_import` (`open_source`,
`convert`): one tensor at a time, each finished leaf placed straight into its target sharding.
Every tensor comes from the main checkpoint (the official loader also overwrites the encoder it
builds from the `vision_encoder` folder with these). Tied checkpoints (the 2B) import without
`lm_head.weight`; one that is present anyway must equal `model.embed_tokens.weight` (compared in row
blocks, never whole) and is then ignored; a different one is refused (`TiedHeadMismatch`), since the
tied model would silently drop it.

Export (`export_vl3`) writes the same layout under the official names, plus `vision_encoder/`, a
`DAMOVLVisionModel` folder (config, preprocessor config, the encoder's weights under `vision_model.*`)
that config.json's `vision_encoder` / `mm_vision_encoder` name by relative path, as the official
builder instantiates the encoder and its image processor from that folder before the main
checkpoint's weights overwrite it. `generation_config.json` is the source's, kept byte for byte.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from vrefer_jax.checkpoints import hf_config, hf_export, hf_import, key_map, st_io
from vrefer_jax.checkpoints import vl3_hf_config as vcfg
from vrefer_jax.checkpoints.key_map import KeyMappingError
from vrefer_jax.vl3_config import VL3Config

EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
COMPARE_ROWS = 8192  # rows per block when checking a tied checkpoint's lm_head against the embedding


class TiedHeadMismatch(KeyMappingError):
    """A tied checkpoint (`tie_word_embeddings: true`) whose `lm_head.weight` is not its embedding."""


def _family():
    from vrefer_jax import families

    return families.get(VL3Config.family)


def _same_rows(reader: st_io.SafetensorsReader, a: str, b: str, block: int = COMPARE_ROWS) -> bool:
    """Whether two stored tensors are bit-identical, read `block` rows at a time."""
    from safetensors import safe_open

    if reader.shape(a) != reader.shape(b):
        return False
    n = reader.shape(a)[0]
    with safe_open(reader.file_of(a), framework="numpy") as fa, safe_open(reader.file_of(b), framework="numpy") as fb:
        sa, sb = fa.get_slice(a), fb.get_slice(b)
        if sa.get_dtype() != sb.get_dtype():
            return False
        for r in range(0, n, block):
            end = min(r + block, n)
            x, y = sa[r:end], sb[r:end]
            if not np.array_equal(x.view(np.uint8), y.view(np.uint8)):
                return False
    return True


def import_vl3(folder: str, cfg: VL3Config | None = None, *, dtype: Any = None,
               shardings=None, mesh=None, rules=None) -> tuple[VL3Config, dict]:
    """Load an official VRVL3 checkpoint folder.

    Args:
      folder: `config.json` (`model_type: videollama3_qwen2`) + `model.safetensors.index.json` and
        shards, or one `model.safetensors`; tokenizer files (for the `<image>` / `<REGION>` / pad
        ids when config.json lacks them).
      cfg: the model config; default: read from `config.json` (`vl3_hf_config.vl3_config_from_hf`).
        A given `cfg` is used as is (a shape that does not fit the checkpoint raises).
      dtype: parameter dtype on the devices (default `cfg.param_dtype`).
      shardings: a tree of `jax.sharding.Sharding` like the params (`hf_import.param_shardings`), one
        sharding for all leaves, or None (default device). Each leaf is placed as soon as it is read.
      mesh, rules: without `shardings`, the parameter shardings on `mesh` by the logical-axis `rules`.

    Returns (cfg, params), params an unboxed tree of `jax.Array`s. Raises `ConfigFieldError` (a
    ValueError) for config fields, `KeyMappingError` naming a missing / unexpected / misshapen tensor,
    `TiedHeadMismatch` for a tied checkpoint whose lm_head is not its embedding.
    """
    hf = hf_config.find_config(folder)
    if hf.get("model_type") != vcfg.MODEL_TYPE:
        raise vcfg.ConfigFieldError(f"{folder}: config.json model_type {hf.get('model_type')!r} is not "
                                    f"{vcfg.MODEL_TYPE!r} (a VRVL3 checkpoint)")
    if cfg is None:
        cfg = vcfg.vl3_config_from_hf(hf, folder=folder, **vcfg.tokenizer_ids(folder))
    fam = _family()
    if shardings is None and mesh is not None:  # each leaf straight into its shards on the mesh
        shardings = hf_import.param_shardings(cfg, mesh, rules)
    dtype = np.dtype(dtype if dtype is not None else cfg.param_dtype)
    shapes = hf_import.abstract_params(cfg)
    key_rules = fam.key_rules(cfg)
    ignore = [*hf_import.BUFFER_PATTERNS, *fam.ignore_patterns(cfg)]
    src = hf_import.open_source(folder, key_rules, shapes, ignore=ignore, prefix="model.")
    if cfg.text.tie_word_embeddings and LM_HEAD in src.names:
        if EMBED in src.names and not _same_rows(src.reader, src.stored_name(LM_HEAD), src.stored_name(EMBED)):
            raise TiedHeadMismatch(f"{folder}: tie_word_embeddings is true but {LM_HEAD!r} differs from {EMBED!r} "
                                   "(the tied model would ignore it)")
    params = hf_import.convert(src.get, key_rules, shapes, available=src.available, ignore=ignore, dtype=dtype,
                               shardings=shardings)
    return cfg, params


# ----------------------------------------------------------------------------- export


def copy_tokenizer(src: str, dst: str, cfg: VL3Config):
    """Copy the tokenizer files; `<image>` / `<REGION>` must be there with the model's ids and every
    id must fit the embedding table. Returns our `HFTokenizer` of the copy."""
    import shutil

    from vrefer_jax.text.tokenizer import HFTokenizer

    copied = [f for f in hf_export.TOKENIZER_FILES if os.path.isfile(os.path.join(src, f))]
    if not any(f in copied for f in ("tokenizer.json", "vocab.json")):
        raise FileNotFoundError(f"no tokenizer.json / vocab.json in {src}")
    for f in copied:
        shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
    tok = HFTokenizer.from_file(dst, extra_special_tokens=())
    for token, want in ((vcfg.IMAGE_TOKEN, cfg.image_token_id), (vcfg.REGION_TOKEN, cfg.region_token_id)):
        got = tok.token_to_id(token)
        if got != want:
            raise ValueError(f"tokenizer {src}: {token} has id {got}, the model's is {want}")
    if len(tok) > cfg.text.vocab_size:
        raise ValueError(f"tokenizer {src} has {len(tok)} ids, the embedding table {cfg.text.vocab_size} rows")
    return tok


def export_vision_encoder(params: Mapping, cfg: VL3Config, folder: str, *, dtype: str = "bfloat16",
                          max_shard_size: int | str = "5GB") -> str:
    """Write `folder` as a `DAMOVLVisionModel` folder: config.json, preprocessor_config.json and the
    encoder's weights under `vision_model.*` (`vl3_keys.navit_rules`). Returns `folder`."""
    from vrefer_jax.checkpoints import vl3_keys

    os.makedirs(folder, exist_ok=True)
    for f in os.listdir(folder):
        if f.endswith(".safetensors") or f == st_io.INDEX_NAME:
            os.remove(os.path.join(folder, f))
    tree = params["vision_encoder"]
    entries, source = hf_export.rule_entries(tree, vl3_keys.navit_rules(cfg.vision), hf_export._np_dtype(dtype))
    hf_export.write_rules(tree, folder, entries, source, dtype=dtype, max_shard_size=max_shard_size)
    hf_config.write_json(os.path.join(folder, "config.json"), dict(sorted({
        **vcfg.vision_config_to_hf(cfg.vision), "architectures": ["DAMOVLVisionModel"], "torch_dtype": dtype}.items())))
    hf_config.write_json(os.path.join(folder, "preprocessor_config.json"), vcfg.preprocessor_config(cfg.vision))
    return folder


def export_vl3(
    params: Mapping,
    cfg: VL3Config,
    out: str,
    tokenizer_folder: str | None = None,
    dtype: str = "bfloat16",
    max_shard_size: int | str = "5GB",
    *,
    base_config: dict | None = None,
    overwrite: bool = False,
    generation_config: str | Mapping | None = None,
    vision_encoder: str = vcfg.VISION_DIR,
    write_vision_encoder: bool = True,
) -> dict:
    """Write `out` in the official VRVL3 layout (see the module docstring).

    Args:
      params: the Flax tree (numpy or jax arrays addressable here); streamed one tensor at a time.
      cfg: its `VL3Config`.
      tokenizer_folder: tokenizer files to copy (`<image>` / `<REGION>` checked against the model's
        ids); the generation-config ids come from it. None: no tokenizer files.
      dtype: "bfloat16" (the releases' `torch_dtype` [§11]), "float16" or "float32".
      max_shard_size: bytes per shard ("5GB" as `transformers`).
      base_config: a config.json dict whose other fields are kept (e.g. the imported one).
      overwrite: allow replacing safetensors already in `out`.
      generation_config: a `generation_config.json` path, a folder holding one, or a dict; default
        `tokenizer_folder`'s. Kept unchanged; Qwen2-Instruct's defaults only when there is none.
      vision_encoder: the value written to config.json's `vision_encoder` / `mm_vision_encoder`
        (default: the sub-folder `vision_encoder`, relative; pass an absolute path or a hub name
        for an official loader run from another directory).
      write_vision_encoder: write `out/vision_encoder/` (config, preprocessor config, weights).

    Returns the `config.json` dict written.
    """
    key_map.check_rules_cover(_family().key_rules(cfg), params)
    hf_export.clear_checkpoint(out, overwrite)
    base = dict(base_config or {})
    if tokenizer_folder is not None:
        ids = hf_config.special_token_ids(copy_tokenizer(tokenizer_folder, out, cfg))
    else:
        ids = dict(bos_token_id=base.get("bos_token_id"), pad_token_id=base.get("pad_token_id", cfg.pad_token_id),
                   eos_token_id=base.get("eos_token_id"))
    eos = ids.get("eos_token_id")
    generation_config = hf_export.generation_config_source(generation_config, tokenizer_folder)
    if write_vision_encoder:
        export_vision_encoder(params, cfg, os.path.join(out, vcfg.VISION_DIR), dtype=dtype,
                              max_shard_size=max_shard_size)
    hf = vcfg.vl3_config_to_hf(cfg, vision_encoder=vision_encoder, torch_dtype=dtype,
                               bos_token_id=ids.get("bos_token_id"),
                               eos_token_id=eos[0] if isinstance(eos, list) else eos, base=base)
    hf_export.export_tensors(params, cfg, out, dtype=dtype, max_shard_size=max_shard_size)
    hf_config.write_json(os.path.join(out, "config.json"), hf)
    hf_export.write_generation_config(out, generation_config, ids)
    return hf


# ----------------------------------------------------------------------------- imported folders (CLI)


def _no_options(options: Mapping, what: str) -> None:
    if set_ := sorted(k for k, v in options.items() if v not in (None, False)):
        flags = ", ".join("--" + k.replace("_", "-") for k in set_)
        raise ValueError(f"{flags}: not for VRVL3 checkpoints ({what})")


def import_to_store(src: str, out: str, *, param_dtype=None, **options) -> VL3Config:
    """`vrefer-convert import` for VRVL3: an official folder -> an imported folder (`store` layout;
    `hf/` keeps config.json, the tokenizer and generation_config.json). VideoRefer-7B options
    (vision tower folders) are refused."""
    from vrefer_jax.checkpoints.store import save_imported

    _no_options(options, "the encoder's weights are in the checkpoint itself")
    cfg, params = import_vl3(src, dtype=param_dtype)
    save_imported(out, cfg, params, hf_config.find_config(src), src)
    return cfg


def export_from_store(src: str, out: str, *, dtype: str = "bfloat16", max_shard_size: int | str = "5GB",
                      tokenizer: str | None = None, overwrite: bool = False, vision_encoder: str | None = None,
                      **options) -> dict:
    """`vrefer-convert export` for VRVL3: an imported folder -> an official folder, keeping the
    imported config.json's other fields, its tokenizer and generation config."""
    from vrefer_jax.checkpoints.store import hf_sources, load_imported

    _no_options(options, "use --vision-encoder")
    from vrefer_jax.checkpoints.peft_export import merged

    cfg, params = merged(*load_imported(src))  # a LoRA run's folder: adapters folded into the kernels
    base, tok, gen = hf_sources(src)
    return export_vl3(params, cfg, out, tokenizer_folder=tokenizer or tok, dtype=dtype,
                      max_shard_size=max_shard_size, base_config=base, overwrite=overwrite, generation_config=gen,
                      vision_encoder=vision_encoder or vcfg.VISION_DIR)


__all__ = ["TiedHeadMismatch", "import_vl3", "copy_tokenizer", "export_vision_encoder", "export_vl3",
           "import_to_store", "export_from_store"]
