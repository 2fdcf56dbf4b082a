"""Approximate model FLOPs of one train step, for MFU (remat recomputation not counted, as usual).

  decoder   forward 2 N_dec + 4 n_layers E ctx per token (ctx: mean causal context, tokens / 2 per
            row); backward: activation gradients always (x1 forward: gradients reach the object
            encoder through the frozen LLM in stage 2), weight gradients only when trainable (x1;
            not with LoRA, whose base is frozen: the adapters' own FLOPs are left out, ~r / E of a layer's)
  vision    forward only (frozen): 2 N_vit per patch over T + F frames
  connector 2 N_conn per frame-patch forward, x3 when trainable
"""

from __future__ import annotations

import numpy as np

from vrefer_jax.config import ModelConfig
from vrefer_jax.models import videorefer


class FlopModel:
    def __init__(self, cfg: ModelConfig, trainable: tuple[str, ...]):
        shapes = videorefer.abstract_params(cfg)
        n = {k: videorefer.count_params(v) for k, v in shapes.items()}
        self.cfg, self.trainable = cfg, trainable
        emb = int(np.prod(shapes["llm"]["embed_tokens"]["embedding"].shape))
        self.n_dec = n["llm"] - emb + n["lm_head"]  # the embedding is a gather, not a matmul
        self.n_vit = n["vision_tower"]
        self.n_conn = n["mm_projector"]

    def step_flops(self, batch_size: int, tokens: int, region_frames: int) -> float:
        c = self.cfg
        llm_train = ("llm" in self.trainable or "lm_head" in self.trainable) and not c.text.lora.enabled
        ctx = tokens / max(batch_size, 1) / 2
        fwd_tok = 2 * self.n_dec + 4 * c.text.num_hidden_layers * c.text.hidden_size * ctx
        dec = tokens * fwd_tok * (3 if llm_train else 2)
        patches = c.vision.num_patches
        frames = batch_size * (c.num_frames + region_frames)
        vit = 2 * self.n_vit * patches * frames
        conn = 2 * self.n_conn * patches * batch_size * c.num_frames * (3 if "mm_projector" in self.trainable else 2)
        return float(dec + vit + conn)

