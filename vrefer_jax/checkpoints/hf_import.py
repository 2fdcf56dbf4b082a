"""Import official VideoRefer checkpoints (and their SigLIP tower) into the Flax parameter tree, and the
generic import machinery every family's importer uses (`abstract_params` and `param_shardings` of any
family's config, `open_source` / `TensorSource`, `convert`, `place_leaf`; VRVL3: `vl3_hf`).

Streaming: tensors are read one at a time (`st_io.SafetensorsReader`), cast to the target dtype,
changed to the Flax layout by `key_map.hf_to_flax`, and each finished leaf is placed straight into
its target sharding (`jax.make_array_from_callback`; `jax.device_put` without shardings), waiting
for the copy before the next leaf. Scanned layer stacks are filled slice by slice into one
preallocated host buffer (by `key_map.hf_to_flax`), so besides the placed parameters the host holds at most one leaf plus the
tensor being read (and its layout-changed copy) at a time. Measured (benchmarks/import_checkpoint.py):
about 2 x the largest leaf above the parameters' own bytes at peak on a CPU backend.

Tolerated name variants: with or without the leading `model.` (VideoRefer / Qwen2 checkpoints) and
with or without `vision_model.` (SigLIP folders: Google's full `SiglipModel` files carry it,
transformers 5's `SiglipVisionModel.save_pretrained` does not). A tensor stored under both spellings
is an error, as are missing, unexpected and wrongly shaped tensors (`KeyMappingError`, naming it).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from vrefer_jax.checkpoints import hf_config, key_map
from vrefer_jax.checkpoints.key_map import KeyMappingError, KeyRule
from vrefer_jax.checkpoints.st_io import SafetensorsReader
from vrefer_jax.config import ModelConfig
from vrefer_jax.checkpoints import videorefer_keys as keys

VISION_DIR = "siglip_vision_tower"  # where `hf_export` writes the complete tower
# Buffers some exports persist; never parameters.
BUFFER_PATTERNS = (r".*rotary_emb\.inv_freq", r".*embeddings\.position_ids")
# A full SigLIP (image + text) checkpoint: everything but the vision model is unused.
SIGLIP_UNUSED = (r"text_model\..*", r"logit_scale", r"logit_bias")

Getter = Callable[[str], np.ndarray]


# ----------------------------------------------------------------------------- shapes, shardings


@functools.lru_cache(maxsize=16)
def abstract_params(cfg, boxed: bool = False):
    """The parameter shapes of any family's config (`families.for_config(cfg).abstract_params`),
    cached per config (tracing the model init takes a while). Callers must not mutate the tree."""
    from vrefer_jax import families

    return families.for_config(cfg).abstract_params(cfg, boxed=boxed)


def param_shardings(cfg, mesh: jax.sharding.Mesh, rules=None):
    """Per-leaf `NamedSharding`s from the parameters' logical axis names and the rules table; a
    mesh axis that does not divide a dimension (the 7B vocabulary over tensor=4) is dropped from
    it (`sharding.fit_sharding`)."""
    from vrefer_jax.sharding import fit_sharding, logical_axis_rules

    specs = nn.get_partition_spec(abstract_params(cfg, boxed=True))
    named = nn.logical_to_mesh_sharding(specs, mesh, rules if rules is not None else logical_axis_rules())
    return jax.tree.map(lambda s, a: fit_sharding(s, a.shape), named, abstract_params(cfg))


def sharding_at(shardings, path: Sequence[str]):
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return shardings
    return key_map.get_path(shardings, tuple(path))


def place_leaf(arr: np.ndarray, sharding=None) -> jax.Array:
    """Host array -> device array in `sharding`; each device shard is copied from `arr` directly.

    Blocks until the transfer is done: a pending asynchronous copy keeps `arr` alive, and letting
    several pile up would hold several leaves on the host at once."""
    if sharding is None:
        out = jax.device_put(arr)
    else:
        out = jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])
    return out.block_until_ready()


# ----------------------------------------------------------------------------- tensor sources


def expected_names(rules: Iterable[KeyRule], shapes: Mapping) -> list[str]:
    """Every HF tensor name the rules read (stacked rules expanded over the layer axis)."""
    out = []
    for r in rules:
        n = key_map.get_path(shapes, r.flax).shape[0] if r.stacked else None
        out += [r.hf.format(i=i) for i in range(n)] if r.stacked else [r.hf]
    return out


def canonical_names(stored: Iterable[str], expected: Iterable[str], ignore: Sequence[str],
                    prefix: str) -> dict[str, str]:
    """Map each stored name to the spelling the rules use (adding or dropping `prefix`).

    Returns canonical name -> stored name. Names that match nothing are kept as they are (and
    reported as unexpected later unless ignored).
    """
    expected = set(expected)
    pats = [re.compile(p) for p in ignore]
    out: dict[str, str] = {}
    for k in stored:
        cands = [k, prefix + k] + ([k[len(prefix):]] if k.startswith(prefix) else [])
        c = next((c for c in cands if c in expected), None)
        if c is None:
            c = next((c for c in cands if any(p.fullmatch(c) for p in pats)), k)
        if c in out:
            raise KeyMappingError(f"tensors {out[c]!r} and {k!r} are both stored for {c!r}")
        out[c] = k
    return out


@dataclasses.dataclass
class TensorSource:
    """A checkpoint's tensors under the rules' names. `get(name, rows=None)` reads one tensor."""

    reader: Any  # SafetensorsReader or a Mapping name -> array
    names: dict[str, str]  # canonical -> stored
    aliases: dict[str, str] = dataclasses.field(default_factory=dict)  # canonical -> canonical

    @property
    def available(self) -> list[str]:
        return list(self.names)

    def stored_name(self, name: str) -> str:
        return self.names[self.aliases.get(name, name)]  # KeyError -> "missing"

    def get(self, name: str, rows: int | None = None) -> np.ndarray:
        stored = self.stored_name(name)
        if isinstance(self.reader, SafetensorsReader):
            return self.reader.get(stored, rows)
        x = key_map.torch_state_to_numpy({stored: self.reader[stored]})[stored]
        return x if rows is None else x[:rows]

    def shape(self, name: str) -> tuple[int, ...]:
        stored = self.stored_name(name)
        if isinstance(self.reader, SafetensorsReader):
            return self.reader.shape(stored)
        return tuple(self.reader[stored].shape)


def open_source(path, rules, shapes, *, ignore=(), prefix="model.") -> TensorSource:
    """A `TensorSource` over a safetensors folder or file, names canonicalised for `rules`."""
    reader = SafetensorsReader(path)
    return TensorSource(reader, canonical_names(reader.keys(), expected_names(rules, shapes), ignore, prefix))


# ----------------------------------------------------------------------------- conversion


def convert(
    get: Getter,
    rules: list[KeyRule],
    shapes: Mapping,
    *,
    available: Iterable[str] | None = None,
    ignore: Sequence[str] = (),
    dtype: Any = np.float32,
    shardings=None,
) -> dict:
    """`key_map.hf_to_flax` with streaming placement: each finished leaf (a stacked leaf is filled
    in place by `hf_to_flax`, layer by layer) goes straight to its sharding. `shardings`: a tree like
    `shapes` of `jax.sharding.Sharding`, one sharding for everything, or None (default device).
    """
    def place(path, arr):
        return place_leaf(np.ascontiguousarray(arr), sharding_at(shardings, path))

    return key_map.hf_to_flax(get, rules, shapes, available=available, ignore=ignore,
                              dtype=np.dtype(dtype), place=place)


def split_rules(rules: list[KeyRule], shapes: Mapping, top: Sequence[str]):
    """The rules and shapes of the given top-level sub-trees."""
    return [r for r in rules if r.flax[0] in top], {k: v for k, v in shapes.items() if k in top}


def sub_shardings(shardings, keys: Sequence[str]):
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return shardings
    return {k: shardings[k] for k in keys}


# ----------------------------------------------------------------------------- SigLIP tower


def siglip_folder_of(hf_cfg: dict, vision_tower_folder: str | None, folder: str | None = None) -> str | None:
    """The SigLIP folder the official loader would use: the argument, else `mm_vision_tower`
    when it is a local folder, else (a moved export) the checkpoint's own `siglip_vision_tower/`."""
    if vision_tower_folder is not None:
        if not os.path.isdir(vision_tower_folder):
            raise FileNotFoundError(f"vision_tower_folder {vision_tower_folder!r} is not a folder")
        return vision_tower_folder
    name = hf_cfg.get("mm_vision_tower", hf_cfg.get("vision_tower"))
    if isinstance(name, str) and os.path.isdir(name):
        return name
    own = os.path.join(folder, VISION_DIR) if folder is not None else None
    return own if own is not None and os.path.isfile(os.path.join(own, "config.json")) else None


def load_siglip_tower(folder: str, cfg: ModelConfig, *, dtype=np.float32, shardings=None) -> dict:
    """The `vision_tower` sub-tree from a SigLIP folder (`SiglipModel` or `SiglipVisionModel`
    safetensors; text tower, `logit_scale`/`logit_bias`, layers past the selected one, post-LN
    and head ignored)."""
    shapes = abstract_params(cfg)["vision_tower"]
    rules = keys.siglip_rules(cfg.vision)
    ignore = [*keys.siglip_ignore_patterns(cfg.vision), *SIGLIP_UNUSED, *BUFFER_PATTERNS]
    src = open_source(folder, rules, shapes, ignore=ignore, prefix="vision_model.")
    return convert(src.get, rules, shapes, available=src.available, ignore=ignore, dtype=dtype,
                   shardings=shardings)


# ----------------------------------------------------------------------------- VideoRefer


def tokenizer_ids(folder: str) -> dict:
    """`region_token_id` / `pad_token_id` from the tokenizer files in `folder` (empty if none)."""
    if not any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "vocab.json")):
        return {}
    from vrefer_jax.text.tokenizer import HFTokenizer

    tok = HFTokenizer.from_file(folder, extra_special_tokens=())
    out = {"pad_token_id": tok.pad_id}
    if (rid := tok.token_to_id("<region>")) is not None:
        out["region_token_id"] = rid
    return out


def import_videorefer(
    folder: str,
    cfg: ModelConfig | None = None,
    *,
    vision_tower_folder: str | None = None,
    use_stored_vision_tower: bool = False,
    dtype: Any = None,
    shardings=None,
    mesh=None,
    rules=None,
) -> tuple[ModelConfig, dict]:
    """Load an official VideoRefer checkpoint folder.

    Args:
      folder: `config.json` (`model_type: videorefer_qwen2`) + `model.safetensors.index.json` and
        shards, or one `model.safetensors`.
      cfg: the model config; default: read from `config.json` (+ the SigLIP folder's config, the
        tokenizer files for the `<region>` / pad ids). A given `cfg` is used as is (a shape that
        does not fit the checkpoint raises).
      vision_tower_folder: the SigLIP folder. Default: `mm_vision_tower` if it is a local folder,
        else the folder's own `siglip_vision_tower/` (an export that was moved).
        As in the official loader, the tower comes from there and the stored copy
        (`model.vision_tower.vision_tower.*`) is ignored.
      use_stored_vision_tower: take the tower from the stored copy instead.
      dtype: parameter dtype on the devices (default `cfg.param_dtype`).
      shardings: a tree of `jax.sharding.Sharding` like the params (see `param_shardings`), one
        sharding for all leaves, or None (default device).
      mesh, rules: without `shardings`, place every leaf straight into its shards on `mesh` by the
        logical-axis `rules` (default: the table in force).

    Returns (cfg, params) with params an unboxed tree of `jax.Array`s.
    """
    hf = hf_config.find_config(folder)
    if hf.get("model_type") not in (hf_config.MODEL_TYPE, "videorefer"):
        raise ValueError(f"{folder}: model_type {hf.get('model_type')!r} is not a VideoRefer checkpoint")
    siglip_dir = siglip_folder_of(hf, vision_tower_folder, folder)  # also the tower's sizes when available
    if not use_stored_vision_tower:
        if siglip_dir is None:
            raise FileNotFoundError(
                f"the official loader reads the vision tower from mm_vision_tower="
                f"{hf.get('mm_vision_tower')!r}, which is not a local folder: pass vision_tower_folder= "
                "(a SigLIP checkpoint folder) or use_stored_vision_tower=True")
    if cfg is None:
        vision = None
        if siglip_dir is not None:
            vision = hf_config.vision_config_from_hf(hf_config.find_config(siglip_dir))
        cfg = hf_config.model_config_from_hf(hf, vision=vision, **tokenizer_ids(folder))
    if shardings is None and mesh is not None:  # each leaf straight into its shards on the mesh
        shardings = param_shardings(cfg, mesh, rules)
    dtype = np.dtype(dtype if dtype is not None else cfg.param_dtype)
    shapes = abstract_params(cfg)
    key_rules = keys.videorefer_rules(cfg)

    top = [k for k in shapes if use_stored_vision_tower or k != "vision_tower"]
    main_rules, main_shapes = split_rules(key_rules, shapes, top)
    ignore = list(BUFFER_PATTERNS) + (keys.videorefer_ignore_patterns(cfg) if use_stored_vision_tower
                                      else [r"model\.vision_tower\..*"])
    src = open_source(folder, main_rules, main_shapes, ignore=ignore, prefix="model.")
    if hf.get("tie_word_embeddings") and "lm_head.weight" not in src.names:
        src.aliases["lm_head.weight"] = "model.embed_tokens.weight"
    params = convert(src.get, main_rules, main_shapes, available=src.available, ignore=ignore,
                     dtype=dtype, shardings=sub_shardings(shardings, top))
    if not use_stored_vision_tower:
        params["vision_tower"] = load_siglip_tower(
            siglip_dir, cfg, dtype=dtype, shardings=sharding_at(shardings, ("vision_tower",)))
    return cfg, params


def import_to_store(src: str, out: str, *, param_dtype=None, vision_tower: str | None = None,
                    use_stored_vision_tower: bool = False) -> ModelConfig:
    """`vrefer-convert import` for VideoRefer: an official folder -> an imported folder (`store`
    layout, with a copy of the SigLIP folder read for the tower layers the model does not keep)."""
    from vrefer_jax.checkpoints.store import save_imported

    hf = hf_config.find_config(src)
    cfg, params = import_videorefer(src, vision_tower_folder=vision_tower,
                                    use_stored_vision_tower=use_stored_vision_tower, dtype=param_dtype)
    siglip = None if use_stored_vision_tower else siglip_folder_of(hf, vision_tower, src)
    save_imported(out, cfg, params, hf, src, siglip)
    return cfg
