"""Vision-to-LLM connectors (`mm_projector`), chosen by `ConnectorConfig.projector_type`.

STC family (`stc_connector_v35` is VideoRefer-7B's; `stc_connector`, `stp_connector`):
  x [B, T, P, C_vis] (P = g*g patches, row-major)
  -> s1 = RegStage(depth, C_vis -> C) on every frame          [B*T, g, g, C]
  -> sampler over (t, h, w) with kernel = stride = downsample  [B, T', h', w', C]
       stc_connector_v35: Conv3d, padding 0 (VALID), bias, then SiLU (odd trailing frame/row dropped)
       stc_connector:     Conv3d, padding 1 on every side, bias, then SiLU
       stp_connector:     AvgPool3d (no padding, no parameters), then SiLU
  -> s2 = RegStage(depth, C -> C) on every output frame
  -> tokens flattened in (t, h, w) order                      [B, T'*h'*w', C]
  -> readout MLP: Linear, then (exact GELU, Linear) x (mlp_depth - 1)
  C is the LLM hidden size (`out_features`), as in the official builder. T=16, g=27 gives 1352
  tokens for v35/stp and 9*14*14 = 1764 for stc_connector.

Token-wise projectors (`linear`, `mlp{N}x_gelu`): mean over the frames, then Linear / MLP on the
P tokens -> [B, P, C_out] (the official `temporal_aggregator`).

`spatial_conv` / `spatial_pool` are rejected: in the official code their depth-0 stages are
identities, so the sampler receives C_vis channels where it expects the LLM width and fails.

Parameter tree (HF names relative to `mm_projector.`):
  STC     s1/b1/conv1/conv/kernel  <- s1.b1.conv1.conv.weight   (see regstage.py)
          sampler_0/{kernel,bias}  <- sampler.0.{weight,bias}   (Conv3d kernel [kt, kh, kw, C, C])
          readout_0, readout_2, ... <- readout.0, readout.2, ...
  linear  kernel, bias             <- weight, bias              (a bare nn.Linear)
  mlpNx   layers_0, layers_2, ...  <- 0, 2, ...                 (a bare nn.Sequential)
Logical axes: conv kernels (conv_spatial, conv_spatial_1[, conv_spatial_2], conv_in, conv_out);
the MLPs alternate (conv_in, conv_out) / (conv_out, conv_in) so that the hidden activation is split
like `activation_mlp`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vrefer_jax.batch import projector_kind, sampled_shape, sampler_padding  # token arithmetic of the contract
from vrefer_jax.config import ConnectorConfig
from vrefer_jax.models import layers, precision, regstage
from vrefer_jax.sharding import constrain

Dtype = Any

OUT_AXES = ("activation_batch", "activation_length", "activation_embed")


def _mlp_axes(j: int) -> tuple[str, str]:
    """Kernel axes of the j-th Linear of an MLP: alternate so that hidden activations are split."""
    return ("conv_in", "conv_out") if j % 2 == 0 else ("conv_out", "conv_in")


def _gelu_erf(x: jax.Array) -> jax.Array:
    return nn.gelu(x, approximate=False)


def mlp(x: jax.Array, depth: int, features: int, prefix: str, dtype: Dtype, param_dtype: Dtype) -> jax.Array:
    """nn.Sequential(Linear, GELU, Linear, ...) with `depth` Linears named `{prefix}_{0,2,4,...}`.

    x [B, N, C_in] -> [B, N, features]; GELU is the exact (erf) one, as torch's nn.GELU(). Call it
    inside a module's compact `__call__`: the Linears are created in that module's scope. Shared
    by the VideoRefer readouts and the VRVL3 `mm_projector` / `region_encoder` MLPs.
    """
    for j in range(depth):
        if j:
            x = precision.f32_math(_gelu_erf, x)
        axes = _mlp_axes(j)
        x = layers.dense(features, axes, dtype=dtype, param_dtype=param_dtype,
                         kernel_init=regstage.torch_default_init, name=f"{prefix}_{2 * j}")(x)
        x = constrain(x, OUT_AXES[:2] + ("activation_mlp" if axes[1] == "conv_out" else "activation_embed",))
    return x


class Connector(nn.Module):
    """The `mm_projector`.

    Attributes:
      cfg: projector type, RegStage depth, readout depth, sampler downsample (t, h, w).
      in_features: vision width C_vis (1152). out_features: LLM width (3584), also the STC width.

    __call__(x): x [B, T, P, C_vis] (or [B, T, g, g, C_vis]) with logical axes (activation_batch,
    activation_frames, activation_patches, activation_vit_embed) -> [B, N, out_features]
    (activation_batch, activation_length, activation_embed), N = `num_video_tokens(cfg, T, g)`.
    """

    cfg: ConnectorConfig
    in_features: int
    out_features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kind, n_layers = projector_kind(self.cfg.projector_type)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected {self.in_features} input channels, got shape {x.shape}")
        if x.ndim == 5:
            x = x.reshape(x.shape[:2] + (-1, x.shape[-1]))
        if x.ndim != 4:
            raise ValueError(f"expected [B, T, P, C] or [B, T, g, g, C], got shape {x.shape}")
        x = constrain(x.astype(self.dtype),
                      ("activation_batch", "activation_frames", "activation_patches", "activation_vit_embed"))
        if kind == "stc":
            y = self._stc(x)
        else:
            # Official `temporal_aggregator`: average the frames first (fp32 accumulation).
            y = jnp.mean(x.astype(jnp.float32), axis=1).astype(self.dtype)
            y = self._linear(y) if kind == "linear" else mlp(
                y, n_layers, self.out_features, "layers", self.dtype, self.param_dtype)
        return constrain(y, OUT_AXES)

    def _linear(self, x: jax.Array) -> jax.Array:
        """A bare nn.Linear: its `weight`/`bias` sit at the root of the projector's tree."""
        kernel = self.param("kernel", nn.with_logical_partitioning(regstage.torch_default_init, _mlp_axes(0)),
                            (self.in_features, self.out_features), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
                          (self.out_features,), self.param_dtype)
        return jnp.einsum("bnc,cd->bnd", x, kernel.astype(self.dtype)) + bias.astype(self.dtype)

    def _stc(self, x: jax.Array) -> jax.Array:
        cfg, c = self.cfg, self.out_features
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, t, p, c_vis = x.shape
        g = math.isqrt(p)
        if g * g != p:
            raise ValueError(f"{p} patches per frame do not form a square grid")
        if cfg.depth == 0 and c_vis != c:
            raise ValueError(f"depth 0 (identity stages) cannot map {c_vis} channels to {c}")
        if cfg.mlp_depth < 1:
            raise ValueError(f"mlp_depth must be >= 1 (the readout always has a Linear), got {cfg.mlp_depth}")
        t2, h2, w2 = sampled_shape(cfg, t, g)
        ds = tuple(cfg.downsample)

        y = regstage.RegStage(cfg.depth, c, name="s1", **kw)(x.reshape(b * t, g, g, c_vis))
        y = constrain(y.reshape(b, t, g, g, c),
                      ("activation_batch", "activation_frames", None, None, "activation_embed"))
        pad = sampler_padding(cfg.projector_type)
        if cfg.projector_type == "stp_connector":
            y = nn.avg_pool(y, ds, strides=ds, padding="VALID")
        elif pad == 0:  # v35: kernel = stride, VALID: one GEMM over gathered patches
            y = regstage.PatchConv(c, ds, regstage.kernel_axes(3, "conv_in", "conv_out"), bias_axis="conv_out",
                                   name="sampler_0", **kw)(y)
        else:
            y = regstage.conv(c, ds, regstage.kernel_axes(3, "conv_in", "conv_out"),
                              bias_axis="conv_out", strides=ds, padding=((pad, pad),) * 3,
                              name="sampler_0", **kw)(y)
        y = precision.f32_math(nn.silu, y)
        assert y.shape[1:4] == (t2, h2, w2), (y.shape, (t2, h2, w2))
        y = regstage.RegStage(cfg.depth, c, name="s2", **kw)(y.reshape(b * t2, h2, w2, c))
        y = constrain(y.reshape(b, t2 * h2 * w2, c), OUT_AXES)  # (t, h, w) token order
        return mlp(y, cfg.mlp_depth, c, "readout", self.dtype, self.param_dtype)
