"""Shared building blocks: dense layers and norms with logical axis names, remat policies.

Parameters are created in `param_dtype` (fp32 master weights) and cast to `dtype` for compute.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vrefer_jax.models import fast_ops

Dtype = Any

# PyTorch's nn.Linear default init is kaiming-uniform; for fresh (non-imported) weights we use a
# truncated normal, as the official code's `initializer_range` does for the LLM.
INIT_STD = 0.02  # HF initializer_range
default_kernel_init = nn.initializers.normal(stddev=INIT_STD)


class DenseGeneral(nn.Module):
    """x @ kernel over the `axis` dims of x, with a kernel created at its full shape
    (`in dims + features`) so that its logical names fit it even under a mesh (Flax's DenseGeneral
    creates a flat 2-D kernel and reshapes it, which breaks multi-dim logical constraints).

    x [..., *in] -> [..., *features]; kernel names `axes` = in names + feature names; the bias
    carries the feature names.

    `lora` (a `config.LoraConfig`): when it targets this module's name, the module also holds a
    low-rank adapter, `lora_a [*in, r]` (in names + "lora_rank") and `lora_b [r, *features]`
    ("lora_rank" + feature names), and adds (alpha / r) * dropout(x) A B; the base kernel is then
    stored in `lora.base_dtype` ("int8": int8 `kernel` + fp32 `kernel_scale [*features]`, see
    `models/lora.py`). Adapter dropout runs only when the apply is given a "dropout" rng.
    """

    features: int | Sequence[int]
    axes: tuple[str, ...]
    axis: int | Sequence[int] = -1
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = default_kernel_init
    lora: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
        axis = tuple(a % x.ndim for a in axis)
        if len(self.axes) != len(axis) + len(features):
            raise ValueError(f"{self.name}: {len(self.axes)} logical names for a "
                             f"{len(axis) + len(features)}-D kernel")
        in_shape = tuple(x.shape[a] for a in axis)
        adapted = self.lora is not None and self.lora.applies_to(self.name)
        dims = ((axis, tuple(range(len(axis)))), ((), ()))
        if adapted and self.lora.base_dtype == "int8":
            y = self._int8_base(x, in_shape, features, dims)
        else:
            store = jnp.bfloat16 if adapted and self.lora.base_dtype == "bfloat16" else self.param_dtype
            kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                                in_shape + features, store)
            n_in = len(axis)
            if axis == tuple(range(x.ndim - n_in, x.ndim)):
                # Trailing contraction (every use here): one 2-D GEMM with a hand-written backward,
                # whose weight gradient XLA does not turn into a transposed copy (fast_ops).
                k_in = math.prod(in_shape)
                y = fast_ops.matmul_last(x.reshape(x.shape[:x.ndim - n_in] + (k_in,)).astype(self.dtype),
                                         kernel.reshape(k_in, -1).astype(self.dtype))
                y = y.reshape(x.shape[:x.ndim - n_in] + features)
            else:
                y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), dims)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                                   self.axes[len(axis):]),
                              features, self.param_dtype)
            y = y + bias.astype(self.dtype)
        if adapted:
            y = y + self._adapter(x, in_shape, features, axis)
        return y

    def _int8_base(self, x, in_shape, features, dims):
        """x @ (q * scale): the int8 kernel is cast to the compute dtype (exact: |q| <= 127) and
        the per-output-channel scale applied to the product."""
        from vrefer_jax.models.lora import quantize_int8

        n_in = len(in_shape)
        init = {}

        def draw(key):  # one float draw, quantised: kernel and scale must come from the same weights
            if "q" not in init:
                init["q"], init["s"] = quantize_int8(self.kernel_init(key, in_shape + features, jnp.float32), n_in)
            return init

        q = self.param("kernel", nn.with_logical_partitioning(lambda k, *_: draw(k)["q"], self.axes),
                       in_shape + features, jnp.int8)
        scale = self.param("kernel_scale", nn.with_logical_partitioning(lambda k, *_: draw(k)["s"],
                                                                        self.axes[n_in:]),
                           features, jnp.float32)
        y = jax.lax.dot_general(x.astype(self.dtype), q.astype(self.dtype), dims)
        return y * scale.astype(self.dtype)

    def _adapter(self, x, in_shape, features, axis):
        """(alpha / r) * dropout(x) A B: x [..., *in] -> [..., *features] in the compute dtype."""
        c, n_in = self.lora, len(in_shape)
        a_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform",
                                                  in_axis=tuple(range(n_in)), out_axis=-1)  # PEFT: kaiming a=sqrt(5)
        a = self.param("lora_a", nn.with_logical_partitioning(a_init, self.axes[:n_in] + ("lora_rank",)),
                       in_shape + (c.rank,), self.param_dtype)
        b = self.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                              ("lora_rank",) + self.axes[n_in:]),
                       (c.rank,) + features, self.param_dtype)
        h = x.astype(self.dtype)
        if c.dropout > 0 and self.has_rng("dropout"):
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - c.dropout, h.shape)
            h = jnp.where(keep, h / (1.0 - c.dropout), 0).astype(self.dtype)
        low = jax.lax.dot_general(h, a.astype(self.dtype), ((axis, tuple(range(n_in))), ((), ())))
        out = jax.lax.dot_general(low, b.astype(self.dtype), (((low.ndim - 1,), (0,)), ((), ())))
        return out * jnp.asarray(c.scaling, self.dtype)


def dense(
    features: int | Sequence[int],
    axes: tuple[str, ...],
    *,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    axis: int | Sequence[int] = -1,
    name: str | None = None,
    kernel_init=default_kernel_init,
    lora=None,
) -> DenseGeneral:
    """A `DenseGeneral` whose kernel carries logical names `axes` (input dims then output dims);
    `lora`: a `LoraConfig` (adapter when it targets `name`)."""
    return DenseGeneral(features=features, axes=tuple(axes), axis=axis, use_bias=use_bias, dtype=dtype,
                        param_dtype=param_dtype, kernel_init=kernel_init, lora=lora, name=name)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with Flax `nn.LayerNorm`'s parameters (`scale`, `bias` [D]
    named `axis_name`) and numerics (fp32 statistics, E[(x-mean)^2] as PyTorch), output in `dtype`;
    its backward is the closed form of `fast_ops.layer_norm`. x [..., D] -> [..., D]."""

    epsilon: float = 1e-6
    axis_name: str = "norm"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis_name,)),
                           (d,), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.axis_name,)),
                          (d,), self.param_dtype)
        return fast_ops.layer_norm(x, scale, bias, self.epsilon, jnp.dtype(self.dtype))


def layer_norm(
    eps: float, axis_name: str = "norm", *, dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32, name: str | None = None,
) -> LayerNorm:
    """LayerNorm over the last axis (statistics in fp32), scale/bias named `axis_name`."""
    return LayerNorm(epsilon=eps, axis_name=axis_name, dtype=dtype, param_dtype=param_dtype, name=name)


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm with the official cast order.

    x: [..., D] in the activation dtype. The statistic is computed in fp32, the normalised value is
    cast back to the activation dtype, then multiplied by the (cast) weight.
    """

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        in_dtype = x.dtype
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(in_dtype)
        return scale.astype(in_dtype) * y


def remat_policy(name: str):
    """Named rematerialisation policies for scanned layers.

    none     -> no remat (keep every activation)
    full     -> save nothing, recompute the whole layer in the backward pass
    dots     -> save matmul outputs without batch dims (recompute elementwise ops)
    """
    policies = {
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }
    if name == "none":
        return None
    if name not in policies:
        raise ValueError(f"unknown remat_policy {name!r}; choose from none, {', '.join(policies)}")
    return policies[name]


def maybe_remat(module_cls, policy_name: str, static_argnums: tuple[int, ...] = ()):
    """Wrap a layer class in `nn.remat` when a policy is configured."""
    policy = remat_policy(policy_name)
    if policy is None:
        return module_cls
    return nn.remat(module_cls, policy=policy, prevent_cse=False, static_argnums=static_argnums)
