"""VideoRefer-VideoLLaMA3 (2B / 7B): SigLIP-NaViT + mlp2x_gelu projector + region encoder + Qwen2.5."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from vrefer_jax import vl3_batch
from vrefer_jax.families.base import Family, lazy
from vrefer_jax.models.vl3.model import VideoReferVL3
from vrefer_jax.vl3_config import VL3Config


def dummy_batch(cfg: VL3Config, batch_size: int = 1, seq_len: int = 16, num_patches: int = 16,
                visual_tokens: int = 4, regions: int = 1, cells: int = 4, abstract: bool = False) -> dict[str, Any]:
    """A valid batch for init / eval_shape / benchmarks: one 4x4-patch frame merged into 4 tokens on
    the first rows, no region (an empty region slot keeps the shapes). With block attention
    (`vision_attention_chunk`) N is rounded up to a whole block."""
    chunk = cfg.vision_attention_chunk
    n_padded = -(-num_patches // chunk) * chunk if chunk else num_patches
    dims = dict(B=batch_size, L=seq_len, N=n_padded, V=visual_tokens, R=regions, C=cells,
                D=cfg.vision.patch_dim, W=cfg.merge_group, Q=cfg.region_token_num)
    if abstract:
        return {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in vl3_batch.field_shapes(**dims).items()}
    b = vl3_batch.empty_batch(pad_token_id=0, **dims)
    b["segment_ids"][:] = 1
    side = int(np.sqrt(min(num_patches, chunk or num_patches)))
    n = side * side
    b["patch_segments"][:, :n] = 1
    b["patch_coords"][:, :n] = np.stack(np.divmod(np.arange(n), side), -1)
    v = min(visual_tokens, n // cfg.merge_group, seq_len)
    for t in range(v):
        b["visual_patches"][:, t] = np.arange(t * cfg.merge_group, (t + 1) * cfg.merge_group)
    b["input_ids"][:, :v] = cfg.image_token_id
    b["visual_index"][:, :v] = np.arange(v)
    return b


def validate(cfg: VL3Config, batch, out_len: int | None = None, sample_ids=None) -> None:
    if out_len is not None and out_len != batch["input_ids"].shape[1]:
        raise vl3_batch.BatchError(f"VRVL3 batches are expanded on the host: out_len {out_len} != "
                                   f"{batch['input_ids'].shape[1]}")
    vl3_batch.check_batch(batch, image_token_id=cfg.image_token_id, region_token_id=cfg.region_token_id,
                          region_token_num=cfg.region_token_num, sample_ids=sample_ids)
    if cfg.vision_attention_chunk:
        vl3_batch.check_chunks(batch["patch_segments"], cfg.vision_attention_chunk, sample_ids)


def _train_loader(cfg, sources, tokenizer, weights=None, **fields):
    from data_pipeline.vl3 import loader

    return loader.make_loader(list(sources), loader.loader_config(cfg, **fields), tokenizer, cfg, weights)


def check_tokenizer(cfg: VL3Config, tok) -> None:
    """The model's `<image>` / `<REGION>` / pad ids are the tokenizer's, and every id fits the
    embedding table (the data is encoded with this tokenizer)."""
    problems = []
    for name, want in (("<image>", cfg.image_token_id), ("<REGION>", cfg.region_token_id)):
        got = tok.token_to_id(name)
        if got != want:
            problems.append(f"the tokenizer's {name} is {got}, VL3Config's id {want}")
    if tok.pad_id != cfg.pad_token_id:
        problems.append(f"VL3Config.pad_token_id is {cfg.pad_token_id}, the tokenizer's pad is {tok.pad_id}")
    if tok.vocab_size > cfg.text.vocab_size:
        problems.append(f"the tokenizer has {tok.vocab_size} ids, TextConfig.vocab_size is {cfg.text.vocab_size}")
    if problems:
        raise ValueError("special ids of the model and the tokenizer disagree: " + "; ".join(problems))


def _hf_config(cfg):
    from vrefer_jax.checkpoints import vl3_hf_config

    return vl3_hf_config.vl3_config_to_hf(cfg, torch_dtype=cfg.param_dtype)


def _ignore_patterns(cfg):
    from vrefer_jax.checkpoints import videorefer_keys

    return videorefer_keys.causal_lm_ignore_patterns(cfg.text)  # a tied head's duplicate `lm_head.weight`


FAMILY = Family(
    name="videorefer_videollama3",
    model_types=("videollama3_qwen2",),
    config_class=VL3Config,
    module=VideoReferVL3,
    batch_keys=vl3_batch.BATCH_KEYS,
    dummy_batch=dummy_batch,
    validate=validate,
    output_embedding=lambda params: (params["lm_head"]["kernel"] if "lm_head" in params
                                     else params["llm"]["embed_tokens"]["embedding"].T),
    param_groups={"vision_encoder": ("vision_encoder",), "mm_projector": ("mm_projector",),
                  "region_encoder": ("region_encoder",), "llm": ("llm", "lm_head")},
    key_rules=lazy("vrefer_jax.checkpoints.vl3_keys:vl3_rules"),
    ignore_patterns=_ignore_patterns,
    host=lazy("vrefer_jax.inference.vl3_host:VL3Host"),
    import_checkpoint=lazy("vrefer_jax.checkpoints.vl3_hf:import_to_store"),
    export_checkpoint=lazy("vrefer_jax.checkpoints.vl3_hf:export_from_store"),
    load_hf=lazy("vrefer_jax.checkpoints.vl3_hf:import_vl3"),
    tokenizer_loader=lazy("vrefer_jax.text.vl3_prompt:load_vl3_tokenizer"),
    train_loader=_train_loader,
    check_tokenizer=check_tokenizer,
    hf_config=_hf_config,
    host_option_names=("fps", "max_frames"),
    bench_protocol="vl3",
    # reference_vl3 §5, §13: `infer.py` and Bench-Q at fps 1, Bench-D and HC-STVG at 4 (HC-STVG's
    # script also caps at 768 frames, the default); the image benchmarks (lvis, paco, vg, dlc,
    # refl4) take no frame option
    benchmark_options={"infer": {"fps": 1}, "bench-q": {"fps": 1}, "bench-d": {"fps": 4}, "hcstvg": {"fps": 4},
                       **{b: {} for b in ("lvis", "paco", "vg", "dlc", "refl4")}},
)
