"""VideoRefer-VideoLLaMA3 (VRVL3) configuration: plain frozen dataclasses bound from gin
(``configs/models/vl3_*.gin``).

Field names follow the official ``config.json`` where one exists (``spatial_merge_size``,
``mm_max_length``, ``use_token_compression``, ``image_token_index``, ``region_token_index``), so the
checkpoint importer fills them directly. The decoder reuses `config.TextConfig` (Qwen2.5 is a Qwen2).
Reference: ``shared/reference/videorefer_vl3_reference.md`` (section numbers below point there).
"""

from __future__ import annotations

import dataclasses

import gin
import jax.numpy as jnp

from vrefer_jax.config import TextConfig

# VL3-SigLIP-NaViT preprocessing constants (§4.1): pixels map to [-1, 1].
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
MIN_PIXELS = 56 * 56  # the processor class default; the encoder wrapper never overrides it
DEFAULT_MAX_PATCHES = 9477  # `max_pixels = 14 * 14 * 9477` of the class; mm_max_length = 9477 // merge**2


@gin.configurable
@dataclasses.dataclass(frozen=True)
class NaViTConfig:
    """The SigLIP-NaViT vision encoder (`DAMOVLVisionConfig`, §3): no position table, 2D RoPE."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch, (C, py, px) order: 3 * 14 * 14 = 588."""
        return self.num_channels * self.patch_size * self.patch_size


@gin.configurable
@dataclasses.dataclass(frozen=True)
class VL3Config:
    """The whole VRVL3 model plus its numerics. Defaults: VideoRefer-VideoLLaMA3-7B."""

    vision: NaViTConfig = NaViTConfig()
    text: TextConfig = TextConfig(vocab_size=152064, tie_word_embeddings=False)
    projector_type: str = "mlp2x_gelu"  # video/image projector (`mm_projector_type`)
    spatial_merge_size: int = 2  # video frames: 2x2 patches -> one token
    # Visual tokens per sample after merging (§4.1); None = 9477 // merge**2 as the official wrapper.
    mm_max_length: int | None = None
    use_token_compression: bool = True  # frame-difference pruning (§7); the official requires True
    region_token_num: int = 10  # at most this many tokens per region (k-means above it)
    kmeans_iters: int = 20
    image_token_id: int = 151665  # `<image>`
    region_token_id: int = 151668  # `<REGION>`
    pad_token_id: int = 151643
    # Numerics: parameters are stored in `param_dtype`, matmuls run in `dtype`.
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    attention_impl: str | None = None  # `jax.nn.dot_product_attention(implementation=...)`
    # Vision attention within aligned blocks of this many patches (0 = one segment-masked attention
    # over all N patches of a row, whose [B, H, N, N] scores dominate memory at hundreds of frames).
    # Exact when no image / frame / crop crosses a block boundary (`vl3_batch.chunk_example` lays a
    # sample out so; `validate` checks it); N must be a multiple of it.
    vision_attention_chunk: int = 0
    zero_object_tokens: bool = False  # ablation: region rows get zeros (same counts and layout)
    train_vision_tower: bool = True  # VRVL3 recipes may tune the encoder (a vision LR); False stops gradients

    family = "videorefer_videollama3"

    def __post_init__(self):
        if self.projector_type != "mlp2x_gelu":
            raise ValueError(f"VRVL3 projector_type {self.projector_type!r}: only 'mlp2x_gelu' (the released "
                             "models') is implemented")
        if self.spatial_merge_size < 1 or self.region_token_num < 1:
            raise ValueError("spatial_merge_size and region_token_num must be >= 1")
        if self.vision_attention_chunk < 0:
            raise ValueError(f"vision_attention_chunk must be >= 0, got {self.vision_attention_chunk}")
        if self.vision.head_dim % 4:
            raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {self.vision.head_dim}")

    @property
    def max_visual_tokens(self) -> int:
        """`mm_max_length`: merged visual tokens per sample."""
        return self.mm_max_length or DEFAULT_MAX_PATCHES // self.spatial_merge_size**2

    @property
    def merge_group(self) -> int:
        """Patches averaged into one video token (merge**2)."""
        return self.spatial_merge_size**2

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **kw) -> "VL3Config":
        return dataclasses.replace(self, **kw)
