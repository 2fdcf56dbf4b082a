"""Hugging Face key rules of VideoRefer-VideoLLaMA3 (VRVL3), as data (`key_map.KeyRule` lists).

The official `Videollama3Qwen2ForCausalLM` state dict (reference §12) -> the Flax tree of the VRVL3
model, whose top level is:

  vision_encoder   SigLIP-NaViT (`models/vl3/vision.py`)  <- model.vision_encoder.vision_encoder.vision_model.*
  mm_projector     readout_0, readout_2                   <- model.mm_projector.readout.{0,2}.*
  region_encoder   feat_linear_0, feat_linear_2           <- model.region_encoder.feat_linear.{0,2}.*
  llm              Qwen2Model                             <- model.* (embed_tokens, layers, norm)
  lm_head          kernel [E, V]                          <- lm_head.weight (untied models only)

The parts come from `videorefer_keys` (SigLIP patch conv and layers, the nn.Sequential MLP, Qwen2):
the NaViT encoder is SigLIP without the position table and with `post_layernorm` kept. Note the
in-library `transformers.models.video_llama_3` uses other names (no `vision_model.` prefix inside
its vision model, `projector.readout`); it is not the checkpoint format read here.

  navit_rules   relative to `vision_model.` of the encoder checkpoint (`vision_model.*`)
  mlp_rules     (re-exported) `readout.{0,2}` / `feat_linear.{0,2}`
  vl3_rules     the whole official checkpoint
"""

from __future__ import annotations

from vrefer_jax.checkpoints.key_map import KeyRule, prefixed
from vrefer_jax.checkpoints.videorefer_keys import (
    lm_head_rules, mlp_rules, qwen2_rules, siglip_layer_rules, siglip_patch_embedding_rules)
from vrefer_jax.vl3_config import NaViTConfig, VL3Config

__all__ = ["VISION_PREFIX", "PROJECTOR_DEPTH", "navit_rules", "mlp_rules", "vl3_rules"]

# The training code's double wrapper (`vision_encoder.vision_encoder`) before `vision_model.`.
VISION_PREFIX = "model.vision_encoder.vision_encoder."
PROJECTOR_DEPTH = 2  # mlp2x_gelu and the region encoder's feat_linear: Linear, GELU, Linear


def navit_rules(cfg: NaViTConfig) -> list[KeyRule]:
    """SigLIP-NaViT, relative to the encoder checkpoint (`vision_model.*`): the patch conv, the
    scanned layers and `post_layernorm`; no position table."""
    del cfg  # the names do not depend on the sizes (the layer count is the stacked leaf's length)
    rules = [*siglip_patch_embedding_rules(), *siglip_layer_rules(),
             KeyRule("post_layernorm.weight", ("post_layernorm", "scale"), "vector"),
             KeyRule("post_layernorm.bias", ("post_layernorm", "bias"), "vector")]
    return prefixed(rules, "vision_model.", ())


def vl3_rules(cfg: VL3Config) -> list[KeyRule]:
    """Flax VRVL3 tree <-> official checkpoint names. `lm_head.weight` only when the text model is
    untied (the tied 2B ships no lm_head tensor; its logits use `llm/embed_tokens`)."""
    return [
        *prefixed(navit_rules(cfg.vision), VISION_PREFIX, ("vision_encoder",)),
        *prefixed(mlp_rules(PROJECTOR_DEPTH, "readout.", "readout"), "model.mm_projector.", ("mm_projector",)),
        *prefixed(mlp_rules(PROJECTOR_DEPTH, "feat_linear.", "feat_linear"), "model.region_encoder.",
                  ("region_encoder",)),
        *prefixed(qwen2_rules(cfg.text), "model.", ("llm",)),
        *([] if cfg.text.tie_word_embeddings else lm_head_rules()),
    ]
