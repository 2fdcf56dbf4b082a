"""Export Flax parameters as an official VideoRefer checkpoint folder.

Writes sharded safetensors (+ `model.safetensors.index.json`) under the official names, including
the vision tower under `model.vision_tower.vision_tower.vision_model.*` for the layers the model
has (the official loader ignores that copy and reads SigLIP from `mm_vision_tower`), `config.json`,
`generation_config.json` and the tokenizer files. Streaming: one tensor (one layer's slice of a
scanned stack) is fetched from the devices, converted and written at a time.

Tensor order in the shards: the decoder (embeddings, then layer by layer, then the final norm), the
vision tower, the projector, the region encoder, the lm_head (the `state_dict` order of
`VideoReferQwen2ForCausalLM`, modules grouped).
"""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import ml_dtypes
import numpy as np

from vrefer_jax.checkpoints import hf_config, key_map, st_io
from vrefer_jax.config import ModelConfig
from vrefer_jax.models import videorefer

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")
_SECTION = {"llm": 0, "vision_tower": 1, "mm_projector": 2, "region_encoder": 3, "lm_head": 4}


def _np_dtype(dtype: str) -> np.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {sorted(DTYPES)}")
    return np.dtype(DTYPES[dtype])


def tensor_plan(params: Mapping, cfg: ModelConfig, dtype: str = "float16"):
    """[(hf name, shape, dtype)] in file order, and name -> (rule, layer index or None)."""
    rules = videorefer.hf_rules(cfg)
    key_map.check_rules_cover(rules, params)
    np_dtype = _np_dtype(dtype)
    order, source = [], {}
    for k, r in enumerate(rules):
        shape = tuple(key_map.get_path(params, r.flax).shape)
        hf_shape = key_map.hf_shape(r, shape)
        layers = range(shape[0]) if r.stacked else [None]
        for i in layers:
            name = r.hf.format(i=i) if r.stacked else r.hf
            # llm: embeddings first, then layer by layer, the final norm last
            pos = i if i is not None else (-1 if "embed_tokens" in name else 10 ** 9)
            order.append(((_SECTION[r.flax[0]], pos, k), (name, hf_shape, np_dtype)))
            source[name] = (r, i)
    return [e for _, e in sorted(order)], source


def _fetch(x: Any, i: int | None) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        raise NotImplementedError("export from a multi-process array: gather it first "
                                  "(jax.experimental.multihost_utils.process_allgather)")
    return np.asarray(x if i is None else x[i])


def export_tensors(params: Mapping, cfg: ModelConfig, folder: str, *, dtype: str = "float16",
                   max_shard_size: int | str = "5GB") -> dict[str, str]:
    """Only the safetensors shards (+ index). Returns the weight map."""
    entries, source = tensor_plan(params, cfg, dtype)
    np_dtype = _np_dtype(dtype)

    def produce(name):
        rule, i = source[name]
        x = key_map.to_hf_layout(rule, _fetch(key_map.get_path(params, rule.flax), i))
        return np.ascontiguousarray(x.astype(np_dtype, copy=False))

    return st_io.write_checkpoint(folder, entries, produce, max_shard_size)


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
) -> dict:
    """Write `folder` so that the official `load_pretrained_model` and `transformers` read it.

    Args:
      params: the Flax parameter tree (numpy or jax arrays, any sharding addressable here).
      cfg: its `ModelConfig`.
      tokenizer_folder: tokenizer files to copy (`<region>` is added if missing); the
        generation-config ids come from it. None: no tokenizer files; ids from `base_config`.
      dtype: "float16" (the released checkpoints), "bfloat16" or "float32".
      max_shard_size: bytes per shard ("5GB" as `transformers`).
      mm_vision_tower: the SigLIP name/path written for the official loader (default: the one in
        `base_config`, else google/siglip-so400m-patch14-384).
      base_config: a config.json dict whose other fields are kept (e.g. the imported one).
      overwrite: allow replacing safetensors already in `folder`.

    Returns the `config.json` dict written.
    """
    os.makedirs(folder, exist_ok=True)
    old = glob.glob(os.path.join(folder, "*.safetensors")) + glob.glob(os.path.join(folder, st_io.INDEX_NAME))
    if old and not overwrite:
        raise FileExistsError(f"{folder} already holds a checkpoint ({os.path.basename(old[0])}); pass overwrite=True")
    for f in old:
        os.remove(f)
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
    hf = hf_config.model_config_to_hf(
        cfg, mm_vision_tower=mm_vision_tower or base.get("mm_vision_tower") or hf_config.SO400M,
        torch_dtype=dtype, bos_token_id=ids.get("bos_token_id"), eos_token_id=first_eos, base=base)
    export_tensors(params, cfg, folder, dtype=dtype, max_shard_size=max_shard_size)
    hf_config.write_json(os.path.join(folder, "config.json"), hf)
    hf_config.write_json(os.path.join(folder, "generation_config.json"), hf_config.generation_config(**ids))
    return hf

