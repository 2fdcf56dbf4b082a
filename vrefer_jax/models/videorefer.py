"""VideoRefer: SigLIP tower + STC connector + object encoder + Qwen2 decoder.

Batch contract: `vrefer_jax.batch` (fields, padding, expanded length, host-side checks).

Parameter tree (mirrors the official checkpoint, see `checkpoints/videorefer_keys.py`):
  vision_tower/…  mm_projector/…  region_encoder/…  llm/{embed_tokens,layers,norm}  lm_head
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vrefer_jax import batch as batch_lib
from vrefer_jax.config import IGNORE_INDEX, VIDEO_TOKEN_INDEX, ModelConfig
from vrefer_jax.models import connector as connector_lib
from vrefer_jax.models import object_encoder as object_encoder_lib
from vrefer_jax.models import qwen2, siglip
from vrefer_jax.models.splice import splice
from vrefer_jax.sharding import constrain

class VideoRefer(nn.Module):
    cfg: ModelConfig

    def setup(self):
        c = self.cfg
        kw: dict[str, Any] = dict(dtype=c.compute_dtype, param_dtype=c.weight_dtype)
        self.vision_tower = siglip.SiglipVisionTower(
            c.vision, remat_policy=c.remat_policy, attention_impl=c.attention_impl, scan_unroll=c.scan_unroll, **kw)
        self.mm_projector = connector_lib.Connector(
            c.connector, in_features=c.vision.hidden_size, out_features=c.text.hidden_size, **kw)
        self.region_encoder = object_encoder_lib.ObjectEncoder(
            c.object_encoder, vis_dim=c.vision.hidden_size, out_dim=c.text.hidden_size,
            grid=c.vision.grid, init_std=c.text.initializer_range, **kw)
        self.llm = qwen2.Qwen2Model(
            c.text, remat_policy=c.remat_policy, attention_impl=c.attention_impl, scan_unroll=c.scan_unroll, **kw)
        self.lm_head = qwen2.LMHead(c.text, **kw)

    # ------------------------------------------------------------------ encoders

    def encode_visual(self, frames: jax.Array, region_frames: jax.Array):
        """One SigLIP pass over sampled and annotated frames.

        frames [B, T, S, S, 3], region_frames [B, F, S, S, 3] ->
        (features [B, T, P, C_vis], region features [B, F, P, C_vis]). Packed frames, per-row
        slots [B, Pv, T, S, S, 3] or pools [G, V, T, S, S, 3] (each serving B/G consecutive rows),
        give features [G, V, T, P, C_vis]: each pool runs with its rows' region frames, so the
        pass stays split along the batch axes like the rest.
        The tower is frozen in every official stage: no gradient flows into it (unless
        `cfg.train_vision_tower`).
        """
        B, F = region_frames.shape[:2]
        pooled = frames.ndim == 6
        if not pooled:
            frames = frames[:, None]
        G, V, T = frames.shape[:3]
        if B % G:
            raise ValueError(f"{B} rows cannot share {G} video pools evenly (frames {frames.shape})")
        x = jnp.concatenate([frames.reshape((G, V * T) + frames.shape[3:]),
                             region_frames.reshape((G, (B // G) * F) + region_frames.shape[2:])], axis=1)
        x = x.reshape((-1,) + x.shape[2:])
        x = constrain(x.astype(self.cfg.compute_dtype), ("activation_frames", None, None, None))
        feats = self.vision_tower(x)
        if not self.cfg.train_vision_tower:
            feats = jax.lax.stop_gradient(feats)
        feats = feats.reshape((G, V * T + (B // G) * F) + feats.shape[1:])
        video = feats[:, : V * T].reshape((G, V, T) + feats.shape[2:])
        region = feats[:, V * T:].reshape((B, F) + feats.shape[2:])
        return (video if pooled else video[:, 0]), region

    def encode_video(self, frame_feats: jax.Array) -> jax.Array:
        """[B, T, P, C_vis] -> video tokens [B, Nv, E]; pools [G, V, T, P, C_vis] -> [G, V, Nv, E]
        (the connector runs on each video's T frames on its own)."""
        if frame_feats.ndim == 4:
            return constrain(self.mm_projector(frame_feats), ("activation_batch", "activation_length", "activation_embed"))
        G, V = frame_feats.shape[:2]
        x = frame_feats.reshape((G * V,) + frame_feats.shape[2:])
        x = constrain(self.mm_projector(x), ("activation_batch", "activation_length", "activation_embed"))
        return x.reshape((G, V) + x.shape[1:])

    def encode_objects(self, region_feats, object_frames, object_masks, object_valid):
        """-> object tokens [B, K, R, E] and per-object token counts [B, K] (<= R, data-dependent)."""
        tokens, counts = self.region_encoder(region_feats, object_frames, object_masks, object_valid)
        if self.cfg.zero_object_tokens:  # ablation: the question still has its slots, with no content
            tokens = jnp.zeros_like(tokens)
        return tokens, counts

    # ------------------------------------------------------------------ LLM input

    def embed_inputs(self, batch: dict[str, jax.Array], out_len: int):
        """Run both encoders and splice. Returns a dict with inputs_embeds [B, out_len, E], labels,
        segment_ids, positions [B, out_len], lengths [B] and object_counts [B, K]."""
        feats, region_feats = self.encode_visual(batch["frames"], batch["region_frames"])
        video = self.encode_video(feats)
        obj_tokens, counts = self.encode_objects(
            region_feats, batch["object_frames"], batch["object_masks"], batch["object_valid"])
        ids = batch["input_ids"]
        labels = batch.get("labels")
        if labels is None:
            labels = jnp.full_like(ids, IGNORE_INDEX)
        text_emb = self.llm.embed(ids)
        emb, labels, segs, pos, lengths = splice(
            text_emb, ids, labels, batch["segment_ids"], video, obj_tokens, counts,
            region_token_id=self.cfg.region_token_id, out_len=out_len, video_index=batch.get(batch_lib.VIDEO_INDEX))
        emb = constrain(emb, ("activation_batch", "activation_length", "activation_embed"))
        return dict(inputs_embeds=emb, labels=labels, segment_ids=segs, positions=pos,
                    lengths=lengths, object_counts=counts)

    # ------------------------------------------------------------------ decoder

    def decode(self, inputs_embeds, positions, segment_ids, cache=None):
        """Decoder over embeddings -> (hidden [B, T, E] after the final norm, cache)."""
        return self.llm(inputs_embeds, positions, segment_ids, cache)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[B, T, E] -> fp32 logits [B, T, V]."""
        return self.lm_head(hidden)

    def embed_tokens(self, ids: jax.Array) -> jax.Array:
        return self.llm.embed(ids)

    def __call__(self, batch: dict[str, jax.Array], out_len: int, return_hidden: bool = False):
        """Teacher-forced forward. Returns (logits [B, out_len, V] fp32 — or the final hidden states
        when `return_hidden` — and the `embed_inputs` dict with the expanded labels/segments)."""
        inputs = self.embed_inputs(batch, out_len)
        hidden, _ = self.decode(inputs["inputs_embeds"], inputs["positions"], inputs["segment_ids"])
        return (hidden if return_hidden else self.logits(hidden)), inputs


# ----------------------------------------------------------------------------- helpers


def dummy_batch(cfg: ModelConfig, batch_size: int = 1, seq_len: int = 16, num_frames: int | None = None,
                num_region_frames: int = 1, max_objects: int = 1, max_object_frames: int = 1,
                mask_size: int | None = None, abstract: bool = False) -> dict[str, Any]:
    """An all-valid-shapes batch (one <video>, no objects) for init, eval_shape and benchmarks."""
    dims = dict(B=batch_size, L=seq_len, T=num_frames or cfg.num_frames, S=cfg.vision.image_size,
                F=num_region_frames, K=max_objects, M=max_object_frames, G=mask_size or cfg.vision.grid)
    if abstract:
        return {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in batch_lib.field_shapes(**dims).items()}
    batch = batch_lib.empty_batch(**dims, pad_token_id=0)
    batch["input_ids"][:, 0] = VIDEO_TOKEN_INDEX
    batch["segment_ids"][:] = 1
    return batch


def abstract_params(cfg: ModelConfig, boxed: bool = False):
    """Parameter shapes (no allocation) via `jax.eval_shape` of `init` on a small dummy batch."""
    model = VideoRefer(cfg)
    batch = dummy_batch(cfg, abstract=True)
    shapes = jax.eval_shape(lambda b: model.init(jax.random.key(0), b, out_len=16), batch)["params"]
    return shapes if boxed else nn.meta.unbox(shapes)


def init_params(cfg: ModelConfig, rng: jax.Array):
    """Random fp32 (param_dtype) parameters, unboxed."""
    model = VideoRefer(cfg)
    return nn.meta.unbox(model.init(rng, dummy_batch(cfg), out_len=16)["params"])


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
