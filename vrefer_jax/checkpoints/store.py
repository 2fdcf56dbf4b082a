"""Checkpoint I/O as a library: the imported-folder layout that the trainer, the predictor, the main
job and `vrefer-convert` all read and write.

An imported folder holds

  params/             the parameter tree (Orbax `StandardCheckpointer`)
  model_config.json   the model config (`ModelConfig`, `VL3Config`, ...) as a dict, with a "family"
                      field naming its model family (`vrefer_jax.families`); folders written before
                      the field existed have none and are VideoRefer's
  hf/                 the source `config.json`, tokenizer and `generation_config.json` files, and
                      `hf/siglip_vision_tower/`, the SigLIP folder read (for the tower layers the
                      model does not keep; `vrefer-convert export` writes the complete tower)

Written by `vrefer-convert import` / `from-parts` and by training (`final/`).

Restores always go into a target: abstract arrays (`jax.ShapeDtypeStruct`) whose shapes and dtypes
are the saved ones and whose shardings come from the parameters' logical axis names and the rules
table (`vrefer_jax.sharding`) on the caller's mesh, so each host reads only the shards its devices
hold; nothing is read whole and resharded after. Without a mesh the target is one device.
"""

from __future__ import annotations

import os
import shutil

PARAMS, MODEL_CONFIG, HF = "params", "model_config.json", "hf"
VISION_DIR = "siglip_vision_tower"  # = hf_import.VISION_DIR (not imported: keeps the CLI's --help light)


def is_imported(folder: str) -> bool:
    """Whether `folder` is in the imported layout (has `model_config.json`)."""
    return os.path.isfile(os.path.join(folder, MODEL_CONFIG))


def save_imported(out: str, cfg, params, hf_cfg: dict | None, tokenizer_src: str | None,
                  siglip_src: str | None = None, generation_src: str | None = None) -> None:
    """Write `out` in the imported-folder layout (params/, model_config.json, hf/ with config and
    tokenizer/generation files, and a copy of the SigLIP folder `siglip_src` for the tower layers
    the model does not keep); `load_imported` reads it. `generation_config.json` comes from
    `generation_src` when it holds one, else from `tokenizer_src`. Called on every process: Orbax
    writes each process's shards; the small files come from process 0."""
    import jax
    import orbax.checkpoint as ocp

    from vrefer_jax.checkpoints import hf_config
    from vrefer_jax.checkpoints.hf_export import TOKENIZER_FILES

    os.makedirs(out, exist_ok=True)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.abspath(os.path.join(out, PARAMS)), params)
    ckpt.wait_until_finished()
    if jax.process_index() != 0:
        return
    hf_config.write_json(os.path.join(out, MODEL_CONFIG), config_to_dict(cfg))
    os.makedirs(os.path.join(out, HF), exist_ok=True)
    if hf_cfg is not None:
        hf_config.write_json(os.path.join(out, HF, "config.json"), hf_cfg)
    if tokenizer_src is not None:
        for f in (*TOKENIZER_FILES, "generation_config.json"):
            if os.path.isfile(os.path.join(tokenizer_src, f)):
                shutil.copyfile(os.path.join(tokenizer_src, f), os.path.join(out, HF, f))
    gen = os.path.join(generation_src or "", "generation_config.json")
    if generation_src is not None and os.path.isfile(gen):
        shutil.copyfile(gen, os.path.join(out, HF, "generation_config.json"))
    if siglip_src is not None:
        copy_siglip_folder(siglip_src, os.path.join(out, HF, VISION_DIR))


def copy_siglip_folder(src: str, dst: str) -> None:
    """The files of a SigLIP folder the export needs: configs and safetensors (+ index)."""
    from vrefer_jax.checkpoints import st_io

    os.makedirs(dst, exist_ok=True)
    names = {"config.json", "preprocessor_config.json", st_io.INDEX_NAME}
    for f in sorted(os.listdir(src)):
        if f in names or f.endswith(".safetensors"):
            shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))


FAMILY_KEY = "family"
LEGACY_FAMILY = "videorefer"  # model_config.json files without FAMILY_KEY


def config_to_dict(cfg) -> dict:
    """A model config -> the `model_config.json` dict: its fields plus the family's name."""
    import dataclasses

    from vrefer_jax import families

    return {FAMILY_KEY: families.for_config(cfg).name, **dataclasses.asdict(cfg)}


def config_from_dict(cls, d: dict, where: str = MODEL_CONFIG):
    """Rebuild a (nested, frozen) config dataclass from its `asdict` form: a field whose default is a
    dataclass is rebuilt as that class, a field whose default is a tuple gets a tuple (JSON has
    lists). Unknown or missing fields raise ValueError naming them and `where`."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(cls)}
    if unknown := sorted(set(d) - set(fields)):
        raise ValueError(f"{where}: unknown {cls.__name__} fields {unknown}")
    kw = {}
    for name, value in d.items():
        default = fields[name].default
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = config_from_dict(type(default), value, f"{where}: {name}")
        elif isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        kw[name] = value
    try:
        return cls(**kw)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from None


def read_model_config(folder: str):
    """The model config of an imported folder, of the class of the family `model_config.json` names
    (VideoRefer's `ModelConfig` when it names none)."""
    from vrefer_jax import families
    from vrefer_jax.checkpoints import hf_config

    path = os.path.join(folder, MODEL_CONFIG)
    d = dict(hf_config.read_json(path))
    family = families.get(d.pop(FAMILY_KEY, LEGACY_FAMILY))
    return config_from_dict(family.config_class, d, path)


def hf_sources(folder: str) -> tuple[dict | None, str | None, str | None]:
    """What an imported folder's `hf/` keeps for an export: (the source config.json dict or None, the
    folder holding tokenizer files or None, the generation_config.json path or None)."""
    from vrefer_jax.checkpoints import hf_config

    hf_dir = os.path.join(folder, HF)
    base_path = os.path.join(hf_dir, "config.json")
    base = hf_config.read_json(base_path) if os.path.isfile(base_path) else None
    tok = hf_dir if any(os.path.isfile(os.path.join(hf_dir, f)) for f in ("tokenizer.json", "vocab.json",
                                                                           "tokenizer.model")) else None
    gen = os.path.join(hf_dir, "generation_config.json")
    return base, tok, gen if os.path.isfile(gen) else None


def param_shardings(cfg, mesh=None, rules=None):
    """A tree like the parameters of `cfg` holding each leaf's sharding: from the logical axis
    names and `rules` (default: `sharding.logical_axis_rules()`, the table in force) on `mesh`;
    the first local device for every leaf without a mesh."""
    import jax

    from vrefer_jax.checkpoints import hf_import

    if mesh is None:
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(lambda _: one, hf_import.abstract_params(cfg))
    return hf_import.param_shardings(cfg, mesh, rules)


def restore_target(folder: str, cfg, mesh=None, rules=None):
    """The restore target of `folder`'s parameters: `jax.ShapeDtypeStruct`s with the saved shapes
    and dtypes and the shardings of `param_shardings(cfg, mesh, rules)`.

    Raises ValueError naming the folder and the parameters when the saved tree is not the tree
    of `cfg` (a `model_config.json` that does not describe `params/`)."""
    import jax
    import orbax.checkpoint as ocp

    from vrefer_jax.checkpoints import hf_import
    from vrefer_jax.checkpoints.key_map import flatten_paths, set_path

    path = os.path.abspath(os.path.join(folder, PARAMS))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{folder}: no {PARAMS}/ folder (an imported folder holds {PARAMS}/ and "
                                f"{MODEL_CONFIG})")
    meta = ocp.StandardCheckpointer().metadata(path).item_metadata
    saved = flatten_paths(getattr(meta, "tree", meta))
    want = flatten_paths(hf_import.abstract_params(cfg))
    shardings = flatten_paths(param_shardings(cfg, mesh, rules))
    problems = [f"{'/'.join(p)} missing" for p in sorted(want.keys() - saved.keys())]
    problems += [f"{'/'.join(p)} not in the model" for p in sorted(saved.keys() - want.keys())]
    problems += [f"{'/'.join(p)} has shape {tuple(saved[p].shape)}, the model {tuple(want[p].shape)}"
                 for p in sorted(want.keys() & saved.keys()) if tuple(saved[p].shape) != tuple(want[p].shape)]
    if problems:
        raise ValueError(f"{folder}: {PARAMS}/ does not match its {MODEL_CONFIG}: " + "; ".join(problems[:5])
                         + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""))
    target: dict = {}
    for p, m in saved.items():
        set_path(target, p, jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=shardings[p]))
    return target


def load_imported(folder: str, mesh=None, rules=None):
    """(cfg, params) of a folder written by `save_imported` (cfg of the folder's family).

    The parameters are restored straight into their shardings on `mesh` (`restore_target`): every
    host reads only its own shards. Without a mesh they land on one device."""
    import orbax.checkpoint as ocp

    cfg = read_model_config(folder)
    target = restore_target(folder, cfg, mesh, rules)
    params = ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(folder, PARAMS)), target)
    return cfg, params
