"""timm 1.0.3 `RegStage` (RegNet-Y bottleneck blocks) in NHWC, as the STC connector builds it.

`RegStage(depth, in_chs, out_chs, stride=1, dilation=1, act_layer=nn.SiLU, norm_layer=LayerNorm2d)`
with the `Bottleneck` defaults: bottle_ratio 1, group_size 1 (so the 3x3 conv is depthwise),
se_ratio 0.25, a conv1x1 shortcut only where the channel count changes. timm turns `LayerNorm2d`
into `LayerNormAct2d`, whose eps is 1e-5 (not LayerNorm2d's 1e-6).

One block, x [N, H, W, C_in] -> [N, H, W, C]:
  y = silu(LN(conv1x1(x)))                     conv1
  y = silu(LN(depthwise3x3(y)))                conv2, padding 1
  y = y * sigmoid(fc2(silu(fc1(mean_hw(y)))))  se, rd = round(C_in * 0.25) (block INPUT channels)
  y = LN(conv1x1(y))                           conv3, no activation
  out = silu(y + (LN(conv1x1(x)) if C_in != C else x))   downsample shortcut

Parameter tree mirrors the timm names: `b1/conv1/conv/kernel` (HF `b1.conv1.conv.weight`),
`b1/conv1/bn/{scale,bias}`, `b1/se/fc1/{kernel,bias}`, `b1/downsample/...`. Every conv kernel keeps
`nn.Conv`'s layout ([1, 1, I, O] for the 1x1 convs, [3, 3, 1, C] for the depthwise one) so that the
key map converts all of them with the `conv` layout; the computation is not `nn.Conv`'s: 1x1 convs
are one GEMM each and the depthwise conv is nine taps, both with hand-written backward passes
(`fast_ops`: measured 1.4x faster connector forward+backward on CPU than `nn.Conv` + autodiff).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vrefer_jax.models import fast_ops, layers, precision
from vrefer_jax.sharding import constrain

Dtype = Any

LN_EPS = 1e-5  # LayerNormAct2d's default; timm never forwards LayerNorm2d's 1e-6
SE_RATIO = 0.25

# PyTorch's default Conv/Linear weight init (kaiming_uniform, a=sqrt(5)) is U(+-1/sqrt(fan_in)),
# i.e. variance scaling 1/3 on fan_in; the official connector is trained from that init.
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# Activation names of a [N, H, W, C] feature map; the spatial dims stay replicated.
MAP_AXES = ("activation_batch", None, None, "activation_embed")

# Logical names of a conv kernel's spatial dims. Flax refuses a name repeated within one array,
# so the 2nd/3rd dims get their own names (not in DEFAULT_RULES yet: unnamed rules replicate).
SPATIAL_AXES = ("conv_spatial", "conv_spatial_1", "conv_spatial_2")


def kernel_axes(ndim: int, in_axis: str | None, out_axis: str) -> tuple[str | None, ...]:
    """Logical names of an `ndim`-D conv kernel [*k, I, O]."""
    return SPATIAL_AXES[:ndim] + (in_axis, out_axis)


def conv(
    features: int, kernel: tuple[int, ...], axes: tuple[str | None, ...], *, bias_axis: str | None = None,
    groups: int = 1, padding: Any = "VALID", strides: tuple[int, ...] | None = None,
    dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, name: str | None = None,
) -> nn.Conv:
    """An `nn.Conv` whose kernel [*kernel, I/groups, O] carries logical `axes`; a bias (named
    `bias_axis`) only when `bias_axis` is given."""
    return nn.Conv(
        features, kernel, strides=strides, padding=padding, feature_group_count=groups,
        use_bias=bias_axis is not None, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(torch_default_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (bias_axis,)),
        name=name,
    )


class DepthwiseConv(nn.Module):
    """Per-channel k x k conv, stride 1, 'same' zero padding, no bias; kernel [k, k, 1, C] as
    `nn.Conv(feature_group_count=C)` stores it. x [N, H, W, C] -> same shape.

    Not a grouped `lax.conv`: XLA's SPMD partitioner gives a wrong kernel gradient for a grouped
    conv whose batch is split over two mesh axes and channels over a third (measured on a (2, 2, 2)
    CPU mesh), and XLA:CPU runs it ~10x slower than taps. `fast_ops.depthwise_conv` is k^2
    shifted multiply-adds with a closed-form backward.
    """

    features: int
    kernel_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, c = self.kernel_size, self.features
        # The per-group input dim has size 1, hence no logical name.
        kernel = self.param("kernel", nn.with_logical_partitioning(torch_default_init, kernel_axes(2, None, "conv_out")),
                            (k, k, 1, c), self.param_dtype)
        return fast_ops.depthwise_conv(x.astype(self.dtype), kernel.astype(self.dtype)[:, :, 0, :])


def _add_bias(mod: nn.Module, y: jax.Array) -> jax.Array:
    """y + the module's bias [features] named `mod.bias_axis` (zeros init), or y when it has none."""
    if mod.bias_axis is None:
        return y
    bias = mod.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (mod.bias_axis,)),
                     (mod.features,), mod.param_dtype)
    return y + bias.astype(mod.dtype)


class Conv1x1(nn.Module):
    """1x1 conv as one GEMM (`fast_ops.matmul_last`): x [..., I] -> [..., features]. Parameters as
    `nn.Conv(features, (1, 1))` stores them: kernel [1, 1, I, O] with logical `axes` (4 names),
    bias [O] named `bias_axis` when given (else no bias)."""

    features: int
    axes: tuple[str | None, ...]
    bias_axis: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.with_logical_partitioning(torch_default_init, self.axes),
                            (1, 1, x.shape[-1], self.features), self.param_dtype)
        y = fast_ops.matmul_last(x.astype(self.dtype), kernel[0, 0].astype(self.dtype))
        return _add_bias(self, y)


class PatchConv(nn.Module):
    """A conv whose kernel equals its stride, no padding (the v35 sampler's Conv3d), as one GEMM:
    x [N, *S, I] -> [N, *(S // k), features], trailing S % k dropped (VALID). Non-overlapping
    patches are gathered into the channel dim (a cheap copy of the activation) and hit the kernel
    reshaped to [prod(k) * I, O], so forward and backward are plain GEMMs (`fast_ops.matmul_last`)
    instead of XLA:CPU's strided / dilated convolutions and a per-step kernel transpose.
    Parameters as `nn.Conv(features, k, strides=k)` stores them: kernel [*k, I, O] named `axes`,
    bias [O] named `bias_axis` when given."""

    features: int
    kernel_size: tuple[int, ...]
    axes: tuple[str | None, ...]
    bias_axis: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, d = tuple(self.kernel_size), len(self.kernel_size)
        n, sizes, c_in = x.shape[0], x.shape[1:1 + d], x.shape[-1]
        if x.ndim != d + 2:
            raise ValueError(f"expected [N, {d} spatial dims, C], got {x.shape}")
        kernel = self.param("kernel", nn.with_logical_partitioning(torch_default_init, self.axes),
                            k + (c_in, self.features), self.param_dtype)
        out = tuple(s // kk for s, kk in zip(sizes, k))
        x = x[(slice(None),) + tuple(slice(0, o * kk) for o, kk in zip(out, k))]
        # [N, o1, k1, o2, k2, ..., I] -> [N, o1, o2, ..., k1, k2, ..., I]: patch entries in kernel order
        x = x.reshape((n,) + tuple(v for o, kk in zip(out, k) for v in (o, kk)) + (c_in,))
        x = jnp.transpose(x, (0,) + tuple(range(1, 2 * d, 2)) + tuple(range(2, 2 * d + 1, 2)) + (2 * d + 1,))
        x = x.reshape((n,) + out + (-1,))
        y = fast_ops.matmul_last(x.astype(self.dtype), kernel.reshape(-1, self.features).astype(self.dtype))
        return _add_bias(self, y)


class ConvNormAct(nn.Module):
    """timm `ConvNormAct`: conv (no bias) -> LayerNorm over channels (fp32 stats) -> optional SiLU.

    x [N, H, W, C_in] -> [N, H, W, features]. `depthwise` makes the conv a per-channel 3x3-style
    filter (feature_group_count = features, kernel [k, k, 1, features]).
    """

    features: int
    kernel_size: int = 1
    depthwise: bool = False
    apply_act: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        if self.depthwise and x.shape[-1] != self.features:
            raise ValueError(f"depthwise conv needs in == out channels, got {x.shape[-1]} -> {self.features}")
        if not self.depthwise and k != 1:
            raise ValueError(f"RegStage has only depthwise k x k and dense 1x1 convs, got a dense {k}x{k}")
        if self.depthwise:
            x = DepthwiseConv(self.features, k, dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)
        else:
            x = Conv1x1(self.features, kernel_axes(2, "conv_in", "conv_out"),
                        dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)
        x = layers.layer_norm(LN_EPS, dtype=self.dtype, param_dtype=self.param_dtype, name="bn")(x)
        return precision.f32_math(nn.silu, x) if self.apply_act else x


class SqueezeExcite(nn.Module):
    """timm `SEModule` (bias, SiLU, sigmoid gate, no norm). x [N, H, W, C] -> same shape."""

    rd_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(self.dtype)
        s = Conv1x1(self.rd_channels, kernel_axes(2, "conv_in", "se_reduce"),
                 bias_axis="se_reduce", name="fc1", **kw)(s)
        s = precision.f32_math(nn.silu, s)
        s = Conv1x1(x.shape[-1], kernel_axes(2, "se_reduce", "conv_out"),
                 bias_axis="conv_out", name="fc2", **kw)(s)
        return precision.f32_math(lambda a, b: a * jax.nn.sigmoid(b), x, s)


class Bottleneck(nn.Module):
    """timm RegNet `Bottleneck` (stride 1, dilation 1). x [N, H, W, C_in] -> [N, H, W, features]."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c, c_in = self.features, x.shape[-1]
        y = ConvNormAct(c, 1, name="conv1", **kw)(x)
        y = ConvNormAct(c, 3, depthwise=True, name="conv2", **kw)(y)
        y = SqueezeExcite(se_channels(c_in), name="se", **kw)(y)
        y = ConvNormAct(c, 1, apply_act=False, name="conv3", **kw)(y)
        shortcut = ConvNormAct(c, 1, apply_act=False, name="downsample", **kw)(x) if c_in != c else x
        return precision.f32_math(lambda a, b: nn.silu(a + b), y, shortcut)


class RegStage(nn.Module):
    """`depth` bottleneck blocks `b1..b{depth}`; x [N, H, W, C_in] -> [N, H, W, features].

    Activations are constrained to `MAP_AXES` (activation_batch, -, -, activation_embed) after
    every block. depth 0 is the identity (the official `nn.Identity()` stage).
    """

    depth: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.depth):  # 4 distinct blocks (b1 differs in shape): no scan
            x = Bottleneck(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name=f"b{i + 1}")(x)
            x = constrain(x, MAP_AXES)
        return x


def se_channels(block_in_chs: int) -> int:
    """SE reduction width: timm's `int(round(in_chs * se_ratio))` (Python rounding, half to even)."""
    return int(round(block_in_chs * SE_RATIO))
