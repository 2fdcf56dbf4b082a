"""VideoRefer-7B (the paper's model): SigLIP + STC connector + object encoder + Qwen2."""

from __future__ import annotations

from vrefer_jax import batch as batch_lib
from vrefer_jax.config import ModelConfig
from vrefer_jax.families.base import Family, lazy
from vrefer_jax.models import videorefer


def _train_loader(cfg, sources, tokenizer, weights=None, **fields):
    from data_pipeline.loader import LoaderConfig, make_loader

    return make_loader(list(sources), LoaderConfig.for_model(cfg, **fields), tokenizer, weights)


FAMILY = Family(
    name="videorefer",
    model_types=("videorefer_qwen2",),
    config_class=ModelConfig,
    module=videorefer.VideoRefer,
    batch_keys=batch_lib.BATCH_KEYS,
    optional_batch_keys=batch_lib.OPTIONAL_KEYS,
    dummy_batch=videorefer.dummy_batch,
    validate=batch_lib.validate,
    output_embedding=lambda params: params["lm_head"]["kernel"],
    param_groups={"vision_tower": ("vision_tower",), "mm_projector": ("mm_projector",),
                  "region_encoder": ("region_encoder",), "llm": ("llm",), "lm_head": ("lm_head",)},
    key_rules=lazy("vrefer_jax.checkpoints.videorefer_keys:videorefer_rules"),
    ignore_patterns=lazy("vrefer_jax.checkpoints.videorefer_keys:videorefer_ignore_patterns"),
    host=lazy("vrefer_jax.inference.videorefer_host:VideoReferHost"),
    import_checkpoint=lazy("vrefer_jax.checkpoints.hf_import:import_to_store"),
    export_checkpoint=lazy("vrefer_jax.checkpoints.hf_export:export_from_store"),
    load_hf=lazy("vrefer_jax.checkpoints.hf_import:import_videorefer"),
    train_loader=_train_loader,
    hf_config=lazy("vrefer_jax.checkpoints.hf_config:model_config_to_hf"),
    host_option_names=("num_frames", "aspect"),
    bench_protocol="videorefer",
    # the released Bench scripts sample 8 frames; MCQA uses the model's 16
    # (`vrefer-infer`: 8, NUM_FRAMES of the official mm_infer path)
    benchmark_options={"infer": {"num_frames": 8}, "bench-q": {"num_frames": 8}, "bench-d": {"num_frames": 8},
                       **{b: {"num_frames": 16} for b in ("mvbench", "videomme", "perception_test")}},
)
