"""The official training recipe's starting point, assembled from its parts.

`init_from_parts` = `VideoReferQwen2ForCausalLM.from_pretrained(<Qwen2 folder>)` +
`initialize_vision_modules` (SigLIP from its folder, the STC projector from a VideoLLaMA2
`mm_projector.bin`, the region encoder from `--pretrain_region_encoder` or freshly built) +
`initialize_MM_tokenizer` (`<region>` added, `resize_token_embeddings(len(tokenizer))`).

Fresh modules get PyTorch's default initialisation, as the official code builds them after
`from_pretrained` and never re-initialises: `nn.Linear` / `nn.Conv{2,3}d` weights and biases
U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform with a=sqrt(5)), LayerNorm weight 1 and bias 0.
The distribution matches; the values cannot (different random generator).

Resizing the vocabulary (embedding rows and lm_head rows) to `len(tokenizer)`: the first N rows are
kept (Qwen2-7B: 152064 -> 151647, read lazily, the padding rows are never loaded). When the tokenizer
is longer than the stored table, new rows are, by default, the mean of the old rows ("mean"): that is
the mean of the distribution transformers >= 4.46 samples from (`mean_resizing=True`, covariance
scaled by 1e-9, i.e. noise of about 3e-5 standard deviations, left out here so the result is
deterministic). "normal" gives N(0, initializer_range), the transformers 4.40 behaviour.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from vrefer_jax.checkpoints import hf_config, key_map
from vrefer_jax.checkpoints.hf_import import (BUFFER_PATTERNS, TensorSource, abstract_params, canonical_names,
                                              convert, expected_names, load_siglip_tower, open_source,
                                              sharding_at, split_rules, sub_shardings)
from vrefer_jax.checkpoints.key_map import KeyMappingError, KeyRule
from vrefer_jax.config import ModelConfig
from vrefer_jax.checkpoints import videorefer_keys as keys

EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


# ----------------------------------------------------------------------------- PyTorch default init


class TorchDefaultInit(Mapping):
    """HF-layout fp32 tensors initialised like freshly built PyTorch modules (see module doc),
    generated lazily on access. Each tensor draws from its own generator seeded by
    (seed, crc32(name)), so values do not depend on the order of access."""

    def __init__(self, rules: list[KeyRule], shapes, seed: list[int]):
        self._seed = list(seed)
        self._spec: dict[str, tuple[KeyRule, tuple]] = {}
        for r in rules:
            shape = tuple(key_map.get_path(shapes, r.flax).shape)
            hf_shape = key_map.hf_shape(r, shape)
            for n in ([r.hf.format(i=i) for i in range(shape[0])] if r.stacked else [r.hf]):
                self._spec[n] = (r, hf_shape)

    def __len__(self) -> int:
        return len(self._spec)

    def __iter__(self):
        return iter(self._spec)

    def _fan_in(self, name: str) -> int | None:
        """fan_in of the Linear / Conv that owns `name` (its weight), None for norms."""
        stem = name[: -len("weight")] if name.endswith("weight") else name[: -len("bias")]
        owner = self._spec.get(stem + "weight")
        if owner is None or owner[0].kind not in ("linear", "conv"):
            return None
        return int(np.prod(owner[1][1:]))

    def __getitem__(self, name: str) -> np.ndarray:
        r, shape = self._spec[name]
        rng = np.random.default_rng(self._seed + [zlib.crc32(name.encode())])
        fan_in = self._fan_in(name)
        if fan_in is not None:  # kaiming_uniform(a=sqrt(5)) weight, and the matching bias
            bound = 1.0 / np.sqrt(fan_in)
            x = rng.uniform(-bound, bound, shape)
        elif r.kind == "identity":
            x = rng.standard_normal(shape)  # nn.Embedding
        else:
            x = np.zeros(shape) if name.endswith("bias") else np.ones(shape)  # LayerNorm
        return x.astype(np.float32)


def _seed_of(rng) -> list[int]:
    """An int seed or a jax PRNG key (typed or raw uint32) -> seed words for numpy."""
    if isinstance(rng, (int, np.integer)):
        return [int(rng)]
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    return [int(x) for x in np.asarray(rng).ravel()]


# ----------------------------------------------------------------------------- module files


def load_module_file(path: str):
    """A `mm_projector.bin` / `region_encoder.bin` (torch pickle; needs torch) -> name -> tensor
    (memory-mapped, read when converted); a `.safetensors` file -> a lazy `SafetensorsReader`."""
    if path.endswith(".safetensors"):
        from vrefer_jax.checkpoints.st_io import SafetensorsReader

        return SafetensorsReader(path)
    try:
        import torch
    except ImportError:
        raise ImportError(f"{path}: reading a torch pickle needs torch; convert it to .safetensors") from None
    try:  # memory-mapped: tensors are only read when converted
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) pickles cannot be mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def _module_source(tensors, module: str, rules, shapes) -> TensorSource:
    """Official `get_w`: keep names containing `<module>.` and take what follows it; we then put
    them under `model.<module>.` (the rules' spelling). Other names are not looked at."""
    key = module + "."
    renamed = {f"model.{key}{k.split(key, 1)[1]}": k for k in tensors.keys() if key in k}
    names = canonical_names(renamed, expected_names(rules, shapes), (), "model.")
    return TensorSource(tensors, {c: renamed[s] for c, s in names.items()})


# ----------------------------------------------------------------------------- vocabulary resize


def _resizing_getter(src: TensorSource, n_rows: int, grow_init: str, init_range: float, seed) -> Any:
    """A getter for the Qwen2 source that resizes the embedding / lm_head rows to `n_rows`."""

    def get(name: str) -> np.ndarray:
        if name not in (EMBED, LM_HEAD):
            return src.get(name)
        stored = src.shape(name)[0]
        if n_rows <= stored:
            return src.get(name, rows=n_rows)
        old = src.get(name).astype(np.float32)
        k = n_rows - stored
        if grow_init == "mean":
            new = np.broadcast_to(old.mean(axis=0), (k, old.shape[1]))
        elif grow_init == "normal":
            rng = np.random.default_rng(seed + [zlib.crc32(name.encode())])
            new = rng.normal(0.0, init_range, (k, old.shape[1]))
        else:
            raise ValueError(f"grow_init {grow_init!r}: use 'mean' or 'normal'")
        return np.concatenate([old, new.astype(np.float32)])

    return get


# ----------------------------------------------------------------------------- entry point


def init_from_parts(
    qwen2_folder: str,
    siglip_folder: str,
    projector_file: str | None = None,
    region_encoder_file: str | None = None,
    *,
    tokenizer: Any = None,
    rng: Any = 0,
    base_cfg: ModelConfig | None = None,
    grow_init: str = "mean",
    dtype: Any = None,
    shardings=None,
) -> tuple[ModelConfig, dict]:
    """Assemble the stage-2 starting point (see module docstring).

    Args:
      qwen2_folder: a Qwen2 / Qwen2.5 causal-LM folder (config.json + safetensors). A tied model
        (`tie_word_embeddings`, small Qwen2.5) gets an untied lm_head copied from the embeddings.
      siglip_folder: a SigLIP folder (`SiglipModel` or `SiglipVisionModel`).
      projector_file: VideoLLaMA2-style `mm_projector.bin` or `.safetensors` (names containing
        `mm_projector.`); None: PyTorch default init.
      region_encoder_file: names containing `region_encoder.`; None: PyTorch default init.
      tokenizer: a `vrefer_jax.text.Tokenizer`, a path for `load_tokenizer`, or None (the Qwen2
        folder). `<region>` is added when missing; the vocabulary becomes `len(tokenizer)`.
      rng: int seed or jax PRNG key for the fresh modules (and `grow_init="normal"`).
      base_cfg: the rest of the config (connector type/depth, region tokens, frames, select layer,
        numerics); default: the `ModelConfig` dataclass defaults (VideoRefer-7B's settings; gin
        bindings are not consulted). Its vision / text sizes are replaced by the folders'.
      dtype / shardings: as in `import_videorefer`.
    """
    from vrefer_jax.text.tokenizer import Tokenizer, load_tokenizer

    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(str(tokenizer or qwen2_folder))
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError("tokenizer must be a vrefer_jax.text.Tokenizer or a path")
    base = base_cfg or ModelConfig(**hf_config.plain_defaults(ModelConfig))
    qcfg = hf_config.find_config(qwen2_folder)
    text = hf_config.text_config_from_hf(qcfg)
    tied = text.tie_word_embeddings
    text = dataclasses.replace(text, vocab_size=len(tokenizer), tie_word_embeddings=False)
    vision = hf_config.vision_config_from_hf(hf_config.find_config(siglip_folder), base.vision.select_layer)
    cfg = base.replace(text=text, vision=vision, region_token_id=tokenizer.region_id,
                       pad_token_id=tokenizer.pad_id)
    dtype = np.dtype(dtype if dtype is not None else cfg.param_dtype)
    seed = _seed_of(rng)
    shapes = abstract_params(cfg)
    rules = keys.videorefer_rules(cfg)
    params: dict = {}

    # decoder: the Qwen2 folder, vocabulary resized
    llm_rules, llm_shapes = split_rules(rules, shapes, ["llm", "lm_head"])
    src = open_source(qwen2_folder, llm_rules, llm_shapes, ignore=BUFFER_PATTERNS, prefix="model.")
    if tied and LM_HEAD not in src.names:
        src.aliases[LM_HEAD] = EMBED
    get = _resizing_getter(src, len(tokenizer), grow_init, float(qcfg.get("initializer_range", 0.02)), seed)
    params.update(convert(get, llm_rules, llm_shapes, available=src.available, ignore=BUFFER_PATTERNS,
                          dtype=dtype, shardings=sub_shardings(shardings, ["llm", "lm_head"])))

    params["vision_tower"] = load_siglip_tower(siglip_folder, cfg, dtype=dtype,
                                               shardings=sharding_at(shardings, ("vision_tower",)))

    for module, path in (("mm_projector", projector_file), ("region_encoder", region_encoder_file)):
        m_rules, m_shapes = split_rules(rules, shapes, [module])
        if path is None:
            init = TorchDefaultInit(m_rules, m_shapes, seed + [zlib.crc32(module.encode())])
            part = convert(init.__getitem__, m_rules, m_shapes, available=list(init), dtype=dtype,
                           shardings=sub_shardings(shardings, [module]))
        else:
            msrc = _module_source(load_module_file(path), module, m_rules, m_shapes)
            try:
                part = convert(msrc.get, m_rules, m_shapes, available=msrc.available, dtype=dtype,
                               shardings=sub_shardings(shardings, [module]))
            except KeyMappingError as e:
                raise KeyMappingError(f"{path}: {e}") from None
        params.update(part)
    return cfg, params

