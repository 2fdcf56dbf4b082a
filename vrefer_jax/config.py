"""Model configuration: plain frozen dataclasses, bound from gin files (``configs/models/*.gin``).

Field names follow the Hugging Face / official VideoRefer ``config.json`` where one exists, so
that the checkpoint importer can fill them from a ``config.json`` directly.
"""

from __future__ import annotations

import dataclasses

import gin
import jax.numpy as jnp

# Official placeholder ids (videorefer/constants.py).
IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
VIDEO_TOKEN_INDEX = -201
# `image_aspect_ratio` values the official code implements for SigLIP towers.
ASPECT_RATIOS = ("square", "pad")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """SigLIP vision transformer (``SiglipVisionConfig``)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    image_size: int = 384
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    # `mm_vision_select_layer`: index into HF's `hidden_states` tuple (0 = embeddings,
    # k = output of layer k-1); -2 = output of the second-to-last layer.
    select_layer: int = -2
    # Initial position table: "normal" (random, as HF initialises SigLIP) or "sincos2d" (smooth in
    # 2-D, as the table of a pretrained ViT ends up). Only matters without released weights: the
    # CPU demo's frozen stand-in tower uses "sincos2d" so that pooled features carry position.
    position_init: str = "normal"
    position_init_scale: float = 1.0  # x the normal init's per-entry RMS (hidden_size ** -0.5)
    position_init_freqs: int = 0  # sincos2d: frequencies per axis (0 = hidden_size // 4; rest zero)
    patch_init_scale: float = 1.0  # x the patch conv's init std (0.02): the demo tower's colour salience
    # sincos2d only: the patch conv starts at zero on the table's nonzero channels, so appearance and
    # position start in disjoint channels of the demo tower's features.
    patch_init_disjoint: bool = False

    def __post_init__(self):
        if self.position_init not in ("normal", "sincos2d"):
            raise ValueError(f"position_init must be 'normal' or 'sincos2d', got {self.position_init!r}")
        if self.patch_init_disjoint and (self.position_init != "sincos2d" or self.position_channels >= self.hidden_size):
            raise ValueError("patch_init_disjoint needs position_init='sincos2d' with position_init_freqs leaving "
                             "channels free (4 * freqs < hidden_size)")

    @property
    def position_channels(self) -> int:
        """Channels the sincos2d table fills (4 per frequency: sin/cos of x and y)."""
        return 4 * (self.position_init_freqs or self.hidden_size // 4)

    @property
    def grid(self) -> int:
        """Patches per side (27 for 384/14: the last 384 - 27*14 = 6 pixels are never seen)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_layers_run(self) -> int:
        """How many encoder layers must run to produce `hidden_states[select_layer]`."""
        n = self.num_hidden_layers
        k = self.select_layer + n + 1 if self.select_layer < 0 else self.select_layer
        if not 0 <= k <= n:
            raise ValueError(f"select_layer={self.select_layer} out of range for {n} layers")
        return k


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ConnectorConfig:
    """Vision-to-LLM projector (`mm_projector_type` and the STC builder's fixed arguments)."""

    projector_type: str = "stc_connector_v35"
    depth: int = 4  # RegStage depth
    mlp_depth: int = 2  # readout MLP depth
    downsample: tuple[int, int, int] = (2, 2, 2)  # (t, h, w) of the Conv3d sampler


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ObjectEncoderConfig:
    """Region encoder (`MaskExtractor`, `mm_region_encoder_type='pooling'`)."""

    region_token_num: int = 4  # at most this many tokens per object after the temporal merge


ATTENTION_IMPLS = ("dense", "xla_blockwise", "cudnn", "splash")

# The decoder's projections (the official checkpoint's module names) that LoRA can adapt.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_BASE_DTYPES = ("param", "bfloat16", "int8")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on the decoder's projections (PEFT's LoRA): for a targeted projection
    y = x W + b + (alpha / rank) * dropout(x) A B, A [in, rank] (init as PEFT: kaiming-uniform),
    B [rank, out] (zeros, so a fresh adapter changes nothing).

    rank:       0 = no adapters (the default: the model is the plain decoder)
    alpha:      PEFT's `lora_alpha`; the update is scaled by alpha / rank
    dropout:    PEFT's `lora_dropout` on the adapter's input; active only when the apply is given a
                "dropout" rng (the train step), never in evaluation or generation
    targets:    projection names (`LORA_TARGETS`, the official module names)
    base_dtype: how the frozen base kernels of the targeted projections are stored: "param" (the
                model's `param_dtype`), "bfloat16", or "int8" (symmetric, one fp32 scale per output
                channel: QLoRA-style; `models/lora.py`). Other parameters keep `param_dtype`.
    """

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS
    base_dtype: str = "param"

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"LoraConfig.rank must be >= 0, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout}")
        if unknown := sorted(set(self.targets) - set(LORA_TARGETS)):
            raise ValueError(f"LoraConfig.targets {unknown} are not decoder projections {LORA_TARGETS}")
        if self.base_dtype not in LORA_BASE_DTYPES:
            raise ValueError(f"LoraConfig.base_dtype must be one of {LORA_BASE_DTYPES}, got {self.base_dtype!r}")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def enabled(self) -> bool:
        return self.rank > 0 and bool(self.targets)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def applies_to(self, name: str | None) -> bool:
        """Whether the projection called `name` carries an adapter."""
        return self.enabled and name in self.targets


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Qwen2 decoder (``Qwen2Config``)."""

    vocab_size: int = 151647
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    # std of the normal init of every decoder weight, and of the object encoder's (HF's
    # `initializer_range`); only a model trained from scratch sees it.
    initializer_range: float = 0.02
    # Decoder attention without a KV cache (`vrefer_jax.models.attention`): 'dense' materialises the
    # [B, 1, T, T] mask; 'xla_blockwise' (pure JAX flash, any backend), 'cudnn' (GPU, bf16/fp16) and
    # 'splash' (TPU Pallas) take the segment ids instead. Generation with a cache is always dense.
    attention_impl: str = "dense"
    attention_block: int = 512  # query / key block of 'xla_blockwise' and 'splash'
    attention_max_segments: int = 16  # segments per row 'cudnn' can describe (its packed layout)

    # Adapters on the projections (`TextConfig.lora = @LoraConfig()` in gin); rank 0 = none.
    lora: LoraConfig = LoraConfig()

    def __post_init__(self):
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"TextConfig.attention_impl {self.attention_impl!r}: choose from "
                             f"{', '.join(ATTENTION_IMPLS)}")
        if self.attention_block < 1 or self.attention_max_segments < 1:
            raise ValueError("TextConfig.attention_block and attention_max_segments must be >= 1")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The whole VideoRefer model plus its numerics (dtypes, remat, attention kernel)."""

    vision: VisionConfig = VisionConfig()
    connector: ConnectorConfig = ConnectorConfig()
    object_encoder: ObjectEncoderConfig = ObjectEncoderConfig()
    text: TextConfig = TextConfig()
    num_frames: int = 16  # an image is repeated to this many frames (official `config.num_frames`)
    # Official `image_aspect_ratio`: "square" squashes frames to the tower's size (the release);
    # "pad" first centres them on a square canvas of SigLIP's mean colour and pads masks the same
    # way. The loader and the predictor take it from here unless told otherwise.
    image_aspect_ratio: str = "square"
    region_token_id: int = 151646
    pad_token_id: int = 151643
    # Numerics: parameters are stored in `param_dtype`, matmuls run in `dtype`.
    dtype: str = "float32"
    param_dtype: str = "float32"
    # Rematerialisation policy for the scanned decoder / vision layers (see layers.remat_policy).
    remat_policy: str = "none"
    # Layers per iteration of the scanned decoder / vision layers (`lax.scan`'s unroll; the
    # parameter tree is the same). 1 = a loop; >= the layer count = straight-line code, which spares
    # the loop's stacked per-layer buffers (zero-filled gradient and residual stacks) at the cost of
    # compile time: for small models on CPU.
    scan_unroll: int = 1
    # `jax.nn.dot_product_attention(implementation=...)` of the dense attentions (the vision tower,
    # and the decoder when `TextConfig.attention_impl` is 'dense'): None (XLA picks), "xla" or "cudnn".
    attention_impl: str | None = None
    # Ablation (evaluation only): object tokens replaced by zeros, same token counts and layout.
    zero_object_tokens: bool = False
    # The tower is frozen in every official stage (no gradient flows into it). True lets gradients
    # through, for training it (with "vision_tower" in `OptimizerConfig.trainable`): the
    # from-scratch synthetic demo, or a user's fine-tune.
    train_vision_tower: bool = False

    def __post_init__(self):
        if self.image_aspect_ratio not in ASPECT_RATIOS:
            raise ValueError(f"image_aspect_ratio must be one of {ASPECT_RATIOS}, got {self.image_aspect_ratio!r}")

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


def model_config_from_gin(files=(), bindings=()) -> ModelConfig:
    """Parse gin files/bindings (e.g. `configs/models/tiny.gin`) and build the `ModelConfig`."""
    gin.clear_config()
    gin.parse_config_files_and_bindings(list(files), list(bindings))
    try:
        return ModelConfig()
    finally:  # don't leave bindings behind: later bare `VisionConfig()` calls must get defaults
        gin.clear_config()
