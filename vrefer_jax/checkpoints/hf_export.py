"""Export Flax parameters as an official VideoRefer checkpoint folder.

Writes sharded safetensors (+ `model.safetensors.index.json`) under the official names, including
the vision tower under `model.vision_tower.vision_tower.vision_model.*` for the layers the model
has (the official loader ignores that copy and reads SigLIP from `mm_vision_tower`), `config.json`,
`generation_config.json` and the tokenizer files. Streaming: one tensor (one layer's slice of a
scanned stack) is fetched from the devices, converted and written at a time.

The complete SigLIP tower goes into the subfolder `siglip_vision_tower/` (a `SiglipVisionModel`
folder: config, preprocessor config, safetensors) and `config.json`'s `mm_vision_tower` names it
by absolute path, so the official loader reads the tower from the export itself. The layers the
model runs come from the parameters (a fine-tuned tower is exported as trained); the layers past
the selected one, `post_layernorm` and `head` (which the JAX model does not keep) are copied from
the SigLIP folder the model was imported from.

`generation_config.json` is the checkpoint's own (the one saved at import) when there is one;
Qwen2-Instruct's defaults are written, with a warning, only when there is none.

Tensor order in the shards: the decoder (embeddings, then layer by layer, then the final norm), the
vision tower, the projector, the region encoder, the lm_head (the `state_dict` order of
`VideoReferQwen2ForCausalLM`, modules grouped).
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import ml_dtypes
import numpy as np

from vrefer_jax.checkpoints import hf_config, key_map, st_io
from vrefer_jax.checkpoints.hf_import import BUFFER_PATTERNS, SIGLIP_UNUSED, VISION_DIR
from vrefer_jax.config import ModelConfig
from vrefer_jax.checkpoints import videorefer_keys as keys

log = logging.getLogger(__name__)

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")
GENERATION_CONFIG = "generation_config.json"
# File order by top-level sub-tree (both families' `state_dict` order: the decoder, then the vision
# tower / encoder, the projector, the region encoder, the lm_head).
_SECTION = {"llm": 0, "vision_tower": 1, "vision_encoder": 1, "mm_projector": 2, "region_encoder": 3, "lm_head": 4}


def _np_dtype(dtype: str) -> np.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {sorted(DTYPES)}")
    return np.dtype(DTYPES[dtype])


def rule_entries(tree: Mapping, rules: list, np_dtype) -> tuple[list, dict]:
    """[(hf name, hf shape, dtype)] in rule order (stacked rules layer by layer), and
    name -> (rule, layer index or None, rule position)."""
    entries, source = [], {}
    for k, r in enumerate(rules):
        shape = tuple(key_map.get_path(tree, r.flax).shape)
        hf_shape = key_map.hf_shape(r, shape)
        for i in (range(shape[0]) if r.stacked else [None]):
            name = r.hf.format(i=i) if r.stacked else r.hf
            entries.append((name, hf_shape, np.dtype(np_dtype)))
            source[name] = (r, i, k)
    return entries, source


def tensor_plan(params: Mapping, cfg, dtype: str = "float16"):
    """[(hf name, shape, dtype)] in file order, and name -> (rule, layer index or None), for the
    official checkpoint of `cfg`'s family (`families.for_config(cfg).key_rules`)."""
    from vrefer_jax import families

    rules = families.for_config(cfg).key_rules(cfg)
    key_map.check_rules_cover(rules, params)
    entries, source = rule_entries(params, rules, _np_dtype(dtype))

    def position(entry):
        r, i, k = source[entry[0]]
        # llm: embeddings first, then layer by layer, the final norm last
        pos = i if i is not None else (-1 if "embed_tokens" in entry[0] else 10 ** 9)
        return _SECTION[r.flax[0]], pos, k

    return sorted(entries, key=position), {n: (r, i) for n, (r, i, _) in source.items()}


def _fetch(x: Any, i: int | None) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        raise NotImplementedError("export from a multi-process array: gather it first "
                                  "(jax.experimental.multihost_utils.process_allgather)")
    return np.asarray(x if i is None else x[i])


def write_rules(tree: Mapping, folder: str, entries, source: Mapping, *, dtype: str,
                max_shard_size: int | str = "5GB") -> dict[str, str]:
    """Stream the tensors `entries` names (`source`: name -> (rule, layer, ...)) from `tree` into
    safetensors shards (+ index) in `folder`, one tensor (one layer's slice) at a time."""
    np_dtype = _np_dtype(dtype)

    def produce(name):
        rule, i = source[name][:2]
        x = key_map.to_hf_layout(rule, _fetch(key_map.get_path(tree, rule.flax), i))
        return np.ascontiguousarray(x.astype(np_dtype, copy=False))

    return st_io.write_checkpoint(folder, entries, produce, max_shard_size)


def export_tensors(params: Mapping, cfg, folder: str, *, dtype: str = "float16",
                   max_shard_size: int | str = "5GB") -> dict[str, str]:
    """Only the safetensors shards (+ index), any family. Returns the weight map."""
    entries, source = tensor_plan(params, cfg, dtype)
    return write_rules(params, folder, entries, source, dtype=dtype, max_shard_size=max_shard_size)


def clear_checkpoint(folder: str, overwrite: bool) -> None:
    """Make `folder`, refusing (unless `overwrite`) to replace the safetensors it already holds."""
    os.makedirs(folder, exist_ok=True)
    old = glob.glob(os.path.join(folder, "*.safetensors")) + glob.glob(os.path.join(folder, st_io.INDEX_NAME))
    if old and not overwrite:
        raise FileExistsError(f"{folder} already holds a checkpoint ({os.path.basename(old[0])}); pass overwrite=True")
    for f in old:
        os.remove(f)


def generation_config_source(generation_config, tokenizer_folder: str | None):
    """The generation config to keep: the argument (a path, a folder holding one, or a dict), else
    `tokenizer_folder`'s `generation_config.json`; None when there is none."""
    if generation_config is None and tokenizer_folder is not None:
        generation_config = tokenizer_folder
    if isinstance(generation_config, str) and os.path.isdir(generation_config):
        generation_config = os.path.join(generation_config, GENERATION_CONFIG)
        if not os.path.isfile(generation_config):
            generation_config = None
    return generation_config


def write_generation_config(folder: str, generation_config, ids: Mapping) -> None:
    """`folder/generation_config.json`: the checkpoint's own file byte for byte (a path), a dict, or,
    when there is none, Qwen2-Instruct's sampling defaults with the tokenizer's `ids` (a warning)."""
    gen_path = os.path.join(folder, GENERATION_CONFIG)
    if isinstance(generation_config, str):  # the checkpoint's own file, byte for byte
        if os.path.abspath(generation_config) != os.path.abspath(gen_path):
            shutil.copyfile(generation_config, gen_path)
    elif generation_config is not None:
        hf_config.write_json(gen_path, dict(generation_config))
    else:
        log.warning("no generation_config.json to keep: writing Qwen2-Instruct's sampling defaults (%s) to %s",
                    hf_config.QWEN2_SAMPLING, gen_path)
        hf_config.write_json(gen_path, hf_config.generation_config(**ids))


def copy_tokenizer(src: str, dst: str, region_token_id: int | None = None, vocab_size: int | None = None) -> Any:
    """Copy the tokenizer files; add `<region>` (special) when the source lacks it, as the official
    `initialize_MM_tokenizer` + `save_pretrained` would. Checks `<region>`'s id and that every id
    fits the embedding table. Returns our `Tokenizer` for the copied folder."""
    from vrefer_jax.text.tokenizer import REGION_TOKEN, HFTokenizer, load_tokenizer

    copied = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(src, f))]
    if not copied:
        raise FileNotFoundError(f"no tokenizer files in {src}")
    for f in copied:
        shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
    if "tokenizer.json" in copied or "vocab.json" in copied:
        tok = HFTokenizer.from_file(dst, extra_special_tokens=())
        if tok.token_to_id(REGION_TOKEN) is None:
            _add_region_token(dst, len(tok))
            tok = HFTokenizer.from_file(dst, extra_special_tokens=())
    else:  # sentencepiece: <region> is appended after the pieces when loaded
        tok = load_tokenizer(dst)
    rid = tok.token_to_id(REGION_TOKEN)
    if region_token_id is not None and rid != region_token_id:
        raise ValueError(f"the tokenizer's {REGION_TOKEN} id is {rid}, the model's region_token_id {region_token_id}")
    if vocab_size is not None and len(tok) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tok)} ids, the embedding table {vocab_size} rows")
    return tok


def _add_region_token(folder: str, new_id: int) -> None:
    from tokenizers import AddedToken, Tokenizer as RawTokenizer

    from vrefer_jax.text.tokenizer import REGION_TOKEN

    tj = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(tj):
        raw = RawTokenizer.from_file(tj)
        raw.add_special_tokens([AddedToken(REGION_TOKEN, special=True, normalized=False)])
        raw.save(tj)
    else:  # slow layout: added_tokens.json
        path = os.path.join(folder, "added_tokens.json")
        added = hf_config.read_json(path) if os.path.isfile(path) else {}
        added[REGION_TOKEN] = new_id
        hf_config.write_json(path, added)
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(cfg_path):
        tcfg = hf_config.read_json(cfg_path)
        if "added_tokens_decoder" in tcfg:
            tcfg["added_tokens_decoder"][str(new_id)] = {
                "content": REGION_TOKEN, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True}
            hf_config.write_json(cfg_path, tcfg)


def _siglip_size_fields(v) -> dict:
    return {k: getattr(v, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                       "num_attention_heads", "num_channels", "image_size", "patch_size")}


def export_vision_tower(params: Mapping, cfg: ModelConfig, folder: str, source: str | None, *,
                        dtype: str = "float16", max_shard_size: int | str = "5GB") -> str:
    """Write the complete SigLIP tower as a `SiglipVisionModel` folder (`vision_model.*` names,
    as transformers 4.40 saves it and the official `SiglipVisionTower` loads it).

    Tensors the JAX model holds come from `params["vision_tower"]`; the rest (layers past the
    selected one, `post_layernorm`, `head`) from `source`, the SigLIP folder the model was built
    from, whose sizes must match `cfg.vision`. Without `source` only the model's layers are written
    (a warning says so): transformers then initialises the rest at random, which leaves
    `hidden_states[mm_vision_select_layer]`, the only output the official model uses, unchanged.
    Returns `folder`.
    """
    os.makedirs(folder, exist_ok=True)
    np_dtype = _np_dtype(dtype)
    tower = params["vision_tower"]
    rules = keys.siglip_rules(cfg.vision)
    own = {}
    for r in rules:
        shape = tuple(key_map.get_path(tower, r.flax).shape)
        for i in (range(shape[0]) if r.stacked else [None]):
            own[r.hf.format(i=i) if r.stacked else r.hf] = (r, i, key_map.hf_shape(r, shape))
    hf_cfg = hf_config.vision_config_to_hf(cfg.vision)
    rest: dict[str, str] = {}  # canonical name -> stored name in `source`
    reader = None
    if source is not None:
        src_cfg = hf_config.find_config(source)
        src_vision = hf_config.vision_config_from_hf(src_cfg)
        if _siglip_size_fields(src_vision) != _siglip_size_fields(cfg.vision):
            raise ValueError(f"SigLIP folder {source}: sizes {_siglip_size_fields(src_vision)} do not match the "
                             f"model's vision tower {_siglip_size_fields(cfg.vision)}")
        hf_cfg = {**src_cfg.get("vision_config", src_cfg), **hf_cfg}
        reader = st_io.SafetensorsReader(source)
        unused = [re.compile(p) for p in (*SIGLIP_UNUSED, *BUFFER_PATTERNS)]
        for k in reader.keys():
            c = k if k.startswith("vision_model.") else "vision_model." + k
            if c not in own and not any(p.fullmatch(k) or p.fullmatch(c) for p in unused):
                rest[c] = k
    else:
        log.warning("no SigLIP source folder: %s holds only the %d tower layers the model runs (transformers "
                    "initialises the others at random; hidden_states[%d], what VideoRefer uses, is exact)",
                    folder, cfg.vision.num_layers_run, cfg.vision.select_layer)
    entries = [(n, own[n][2], np_dtype) for n in own]
    entries += [(c, reader.shape(k), np_dtype) for c, k in sorted(rest.items())]

    def produce(name):
        if name in own:
            r, i, _ = own[name]
            x = key_map.to_hf_layout(r, _fetch(key_map.get_path(tower, r.flax), i))
        else:
            x = reader.get(rest[name])
        return np.ascontiguousarray(np.asarray(x).astype(np_dtype, copy=False))

    for f in glob.glob(os.path.join(folder, "*.safetensors")) + glob.glob(os.path.join(folder, st_io.INDEX_NAME)):
        os.remove(f)
    st_io.write_checkpoint(folder, entries, produce, max_shard_size)
    hf_config.write_json(os.path.join(folder, "config.json"),
                         dict(sorted({**hf_cfg, "architectures": ["SiglipVisionModel"], "torch_dtype": dtype}.items())))
    pre = os.path.join(source, "preprocessor_config.json") if source else None
    if pre and os.path.isfile(pre):
        shutil.copyfile(pre, os.path.join(folder, "preprocessor_config.json"))
    else:  # the official tower also loads the image processor from this folder
        hf_config.write_json(os.path.join(folder, "preprocessor_config.json"),
                             hf_config.siglip_preprocessor_config(cfg.vision.image_size))
    return folder


def export_videorefer(
    params: Mapping,
    cfg: ModelConfig,
    folder: str,
    tokenizer_folder: str | None = None,
    dtype: str = "float16",
    max_shard_size: int | str = "5GB",
    *,
    mm_vision_tower: str | None = None,
    base_config: dict | None = None,
    overwrite: bool = False,
    generation_config: str | Mapping | None = None,
    vision_tower_source: str | None = None,
    write_vision_tower: bool = True,
) -> dict:
    """Write `folder` so that the official `load_pretrained_model` and `transformers` read it.

    Args:
      params: the Flax parameter tree (numpy or jax arrays, any sharding addressable here).
      cfg: its `ModelConfig`.
      tokenizer_folder: tokenizer files to copy (`<region>` is added if missing); the
        generation-config ids come from it. None: no tokenizer files; ids from `base_config`.
      dtype: "float16" (the released checkpoints), "bfloat16" or "float32".
      max_shard_size: bytes per shard ("5GB" as `transformers`).
      mm_vision_tower: the SigLIP name/path written for the official loader (default: the exported
        `siglip_vision_tower/` folder, by absolute path; without it the one in `base_config`, else
        google/siglip-so400m-patch14-384).
      base_config: a config.json dict whose other fields are kept (e.g. the imported one).
      overwrite: allow replacing safetensors already in `folder`.
      generation_config: the checkpoint's generation config: a `generation_config.json` path, a
        folder holding one, or a dict. Default: `tokenizer_folder`'s `generation_config.json`.
        Copied unchanged; Qwen2-Instruct's defaults (with the tokenizer's ids) are written, with a
        warning, only when there is none.
      vision_tower_source: the SigLIP folder the model's tower came from (for the layers the model
        does not keep). Default: `base_config`'s `mm_vision_tower` when it is a local folder.
      write_vision_tower: write the complete tower into `folder/siglip_vision_tower/`.

    Returns the `config.json` dict written.
    """
    clear_checkpoint(folder, overwrite)
    base = dict(base_config or {})
    ids: dict = {}
    if tokenizer_folder is not None:
        tok = copy_tokenizer(tokenizer_folder, folder, cfg.region_token_id, cfg.text.vocab_size)
        ids = hf_config.special_token_ids(tok)
    else:
        eos = base.get("eos_token_id")
        ids = dict(bos_token_id=base.get("bos_token_id"), pad_token_id=base.get("pad_token_id", cfg.pad_token_id),
                   eos_token_id=eos)
    eos_list = ids.get("eos_token_id")
    first_eos = eos_list[0] if isinstance(eos_list, list) else eos_list
    generation_config = generation_config_source(generation_config, tokenizer_folder)
    vision_dir = None
    if write_vision_tower:
        if vision_tower_source is None:
            name = base.get("mm_vision_tower")
            if isinstance(name, str) and os.path.isdir(name):
                vision_tower_source = name
        vision_dir = os.path.abspath(os.path.join(folder, VISION_DIR))
        if vision_tower_source is not None and os.path.abspath(vision_tower_source) == vision_dir:
            raise ValueError(f"vision_tower_source {vision_tower_source} is the folder being written")
        export_vision_tower(params, cfg, vision_dir, vision_tower_source, dtype=dtype, max_shard_size=max_shard_size)
    hf = hf_config.model_config_to_hf(
        cfg, mm_vision_tower=mm_vision_tower or vision_dir or base.get("mm_vision_tower") or hf_config.SO400M,
        torch_dtype=dtype, bos_token_id=ids.get("bos_token_id"), eos_token_id=first_eos, base=base)
    export_tensors(params, cfg, folder, dtype=dtype, max_shard_size=max_shard_size)
    hf_config.write_json(os.path.join(folder, "config.json"), hf)
    write_generation_config(folder, generation_config, ids)
    return hf


def export_from_store(src: str, out: str, *, dtype: str = "float16", max_shard_size: int | str = "5GB",
                      tokenizer: str | None = None, overwrite: bool = False,
                      mm_vision_tower: str | None = None, **options) -> dict:
    """`vrefer-convert export` for VideoRefer: an imported folder -> an official folder, keeping the
    imported config.json's other fields, its tokenizer and generation config, and writing the
    complete SigLIP tower (layers the model does not keep from the saved SigLIP folder). Other
    families' options are refused by name."""
    from vrefer_jax.checkpoints.store import HF, VISION_DIR as STORED_VISION, hf_sources, load_imported

    if given := sorted(k for k, v in options.items() if v not in (None, False)):
        raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in given)}: not for VideoRefer-7B checkpoints "
                         "(use --mm-vision-tower)")

    from vrefer_jax.checkpoints.peft_export import merged

    cfg, params = merged(*load_imported(src))  # a LoRA run's folder: adapters folded into the kernels
    base, tok, gen = hf_sources(src)
    vision = os.path.join(src, HF, STORED_VISION)
    return export_videorefer(params, cfg, out, tokenizer_folder=tokenizer or tok, dtype=dtype,
                             max_shard_size=max_shard_size, mm_vision_tower=mm_vision_tower, base_config=base,
                             overwrite=overwrite, generation_config=gen,
                             vision_tower_source=vision if os.path.isdir(vision) else None)

