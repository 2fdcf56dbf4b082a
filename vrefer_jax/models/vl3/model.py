"""VideoRefer-VideoLLaMA3: SigLIP-NaViT encoder + mlp2x_gelu projector + region encoder + Qwen2.5.

Batch contract: `vrefer_jax.vl3_batch`. Every length is known on the host, so the device runs the
encoder once over all patches of a row (frames, images and region crops, block-diagonal attention),
averages each visual token's patches (the 2x2 downsampling of video frames), projects them, pools
each region's cells (k-means above `region_token_num`), and overwrites the `<image>` / `<REGION>`
rows named by `visual_index` / `region_index`. No expansion: the LLM input length is the batch's L.

Parameter tree (mirrors the official checkpoint, see `checkpoints/vl3_keys.py`):
  vision_encoder/…  mm_projector/readout_{0,2}  region_encoder/feat_linear_{0,2}
  llm/{embed_tokens,layers,norm}  lm_head (untied models only; the 2B ties it to embed_tokens)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vrefer_jax.config import IGNORE_INDEX
from vrefer_jax.models import qwen2
from vrefer_jax.models.vl3 import projector as projector_lib
from vrefer_jax.models.vl3 import region as region_lib
from vrefer_jax.models.vl3 import vision as vision_lib
from vrefer_jax.sharding import constrain
from vrefer_jax.vl3_config import VL3Config

_ACT = ("activation_batch", "activation_length", "activation_embed")


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """[B, L] segment ids -> positions restarting at 0 at the start of each segment (0 on padding)."""
    L = segment_ids.shape[1]
    idx = jnp.arange(L, dtype=jnp.int32)
    new = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    start = jax.lax.cummax(jnp.where(new, idx[None], 0), axis=1)
    return jnp.where(segment_ids > 0, idx[None] - start, 0).astype(jnp.int32)


def _fill(emb: jax.Array, table: jax.Array, index: jax.Array) -> jax.Array:
    """Rows of emb [B, L, E] where index [B, L] >= 0 take table [B, S, E][index]; others are kept."""
    rows = jnp.take_along_axis(table, jnp.clip(index, 0, table.shape[1] - 1)[..., None], axis=1)
    return jnp.where((index >= 0)[..., None], rows.astype(emb.dtype), emb)


class VideoReferVL3(nn.Module):
    cfg: VL3Config

    def setup(self):
        c = self.cfg
        kw: dict[str, Any] = dict(dtype=c.compute_dtype, param_dtype=c.weight_dtype)
        self.vision_encoder = vision_lib.NaViTEncoder(
            c.vision, remat_policy=c.remat_policy, attention_impl=c.attention_impl, **kw)
        self.mm_projector = projector_lib.MlpGeluProjector(c.text.hidden_size, prefix="readout", **kw)
        self.region_encoder = region_lib.RegionEncoder(
            hidden_size=c.text.hidden_size, num_tokens=c.region_token_num, kmeans_iters=c.kmeans_iters, **kw)
        self.llm = qwen2.Qwen2Model(c.text, remat_policy=c.remat_policy, attention_impl=c.attention_impl, **kw)
        if not c.text.tie_word_embeddings:
            self.lm_head = qwen2.LMHead(c.text, **kw)

    # ------------------------------------------------------------------ encoders

    def encode_patches(self, batch: dict[str, jax.Array]) -> jax.Array:
        """patches [B, N, D] -> encoder features [B, N, E_vis] (post-LN, per-segment attention)."""
        x = batch["patches"].astype(self.cfg.compute_dtype)
        feats = self.vision_encoder(x, batch["patch_segments"], batch["patch_coords"])
        if not self.cfg.train_vision_tower:
            feats = jax.lax.stop_gradient(feats)
        return feats

    def encode_visual(self, feats: jax.Array, visual_patches: jax.Array) -> jax.Array:
        """-> projected visual tokens [B, V, E] (merge-group mean, then the projector)."""
        merged = projector_lib.merge_visual_tokens(feats, visual_patches)
        return constrain(self.mm_projector(merged), _ACT)

    def encode_regions(self, feats: jax.Array, batch: dict[str, jax.Array]):
        """-> region tokens [B, R, Q, E] and token counts [B, R] (min(Q, cells))."""
        tokens, counts = self.region_encoder(feats, batch["region_cells"], batch["region_weights"],
                                             batch["region_num_cells"], batch["region_init"])
        if self.cfg.zero_object_tokens:  # ablation: the rows stay, their content is gone
            tokens = jnp.zeros_like(tokens)
        return tokens, counts

    # ------------------------------------------------------------------ LLM input

    def embed_inputs(self, batch: dict[str, jax.Array], out_len: int | None = None):
        """Encode and fill rows. Returns a dict with inputs_embeds [B, L, E], labels, segment_ids,
        positions [B, L], lengths [B] and object_counts [B, R]. `out_len`, when given, must be L
        (the family has no device-side expansion; the argument keeps one generation interface)."""
        ids = batch["input_ids"]
        B, L = ids.shape
        if out_len is not None and out_len != L:
            raise ValueError(f"VRVL3 batches are already expanded: out_len {out_len} != input length {L}")
        feats = self.encode_patches(batch)
        visual = self.encode_visual(feats, batch["visual_patches"])
        regions, counts = self.encode_regions(feats, batch)
        emb = self.llm.embed(ids)
        emb = _fill(emb, visual, batch["visual_index"])
        emb = _fill(emb, regions.reshape(B, -1, regions.shape[-1]), batch["region_index"])
        emb = constrain(emb, _ACT)
        segs = batch["segment_ids"]
        labels = batch.get("labels")
        if labels is None:
            labels = jnp.full_like(ids, IGNORE_INDEX)
        return dict(inputs_embeds=emb, labels=jnp.where(segs > 0, labels, IGNORE_INDEX), segment_ids=segs,
                    positions=segment_positions(segs), lengths=(segs > 0).sum(-1).astype(jnp.int32),
                    object_counts=counts)

    # ------------------------------------------------------------------ decoder

    def decode(self, inputs_embeds, positions, segment_ids, cache=None):
        """Decoder over embeddings -> (hidden [B, T, E] after the final norm, cache)."""
        return self.llm(inputs_embeds, positions, segment_ids, cache)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[B, T, E] -> fp32 logits [B, T, V] (tied to embed_tokens for the 2B)."""
        if self.cfg.text.tie_word_embeddings:
            return self.llm.attend(hidden)
        return self.lm_head(hidden)

    def embed_tokens(self, ids: jax.Array) -> jax.Array:
        return self.llm.embed(ids)

    def __call__(self, batch: dict[str, jax.Array], out_len: int | None = None, return_hidden: bool = False):
        """Teacher-forced forward -> (logits [B, L, V] fp32, or hidden states; the embed_inputs dict)."""
        inputs = self.embed_inputs(batch, out_len)
        hidden, _ = self.decode(inputs["inputs_embeds"], inputs["positions"], inputs["segment_ids"])
        return (hidden if return_hidden else self.logits(hidden)), inputs
