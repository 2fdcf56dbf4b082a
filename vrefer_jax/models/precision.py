"""Mixed-precision helpers: casting the weights once per step, and element-wise math in fp32.

Why (measured on XLA:CPU, issue 19; elsewhere `to_bf16` is the plain convert, and fp32 element-wise
math only rounds less: its fp32 values live inside one fusion):
* XLA keeps bf16 semantics op by op: a bf16 `silu` or `gelu` becomes fp32 math with a rounding to
  bf16 after every primitive (6-8 convert pairs per element for the tanh GELU), and XLA:CPU's
  f32 -> bf16 convert is a scalar loop (~0.7 ns per element here). PyTorch's bf16 CPU kernels
  compute element-wise functions in fp32 and round once; `f32_math` does the same, so the result is
  also closer to the exact value than the op-by-op rounding.
* Each layer cast its fp32 master kernel to bf16 with that slow convert (the 512 x 32000 LM head:
  19 ms a step). `cast_weights` casts every matmul weight once at the top of the step with the
  same round-to-nearest-even written as integer ops that vectorise (4x faster on this CPU,
  bit-identical to `astype`, NaN and infinities included); the layers' own `astype` then is a no-op.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import traverse_util

# Leaves that layers only ever use as matmul operands in the compute dtype (norm scales and biases
# stay fp32: norms use them in fp32).
WEIGHT_NAMES = ("kernel", "embedding")


def _bf16_bits(x: jax.Array) -> jax.Array:
    """fp32 -> bf16, round to nearest even, as integer ops (NaN stays a quiet NaN)."""
    u = jax.lax.bitcast_convert_type(x, jnp.uint32)
    rounded = u + (jnp.uint32(0x7FFF) + ((u >> 16) & jnp.uint32(1)))
    u = jnp.where(jnp.isnan(x), u | jnp.uint32(0x400000), rounded)
    return jax.lax.bitcast_convert_type((u >> 16).astype(jnp.uint16), jnp.bfloat16)


def to_bf16(x: jax.Array) -> jax.Array:
    """fp32 -> bf16 equal to `x.astype(jnp.bfloat16)`; the integer form on CPU only (a TPU/GPU
    convert is one instruction)."""
    if x.dtype != jnp.float32 or jax.default_backend() != "cpu":
        return x.astype(jnp.bfloat16)
    return _bf16_bits(x)


@jax.custom_vjp
def _cast_bf16(x: jax.Array) -> jax.Array:
    return to_bf16(x)


def _cast_fwd(x):
    return to_bf16(x), None


def _cast_bwd(_, g):
    return (g.astype(jnp.float32),)  # as astype's transpose: bf16 -> fp32 is exact


_cast_bf16.defvjp(_cast_fwd, _cast_bwd)


def cast_weights(params: dict[str, Any], compute_dtype) -> dict[str, Any]:
    """The fp32 `kernel` / `embedding` leaves of a parameter tree in `compute_dtype` (bf16; other
    dtypes and leaves unchanged). Differentiable: the gradient is the cotangent in fp32, as through
    each layer's own cast."""
    if jnp.dtype(compute_dtype) != jnp.bfloat16:
        return params
    flat = traverse_util.flatten_dict(params)
    flat = {k: (_cast_bf16(v) if k[-1] in WEIGHT_NAMES and v.dtype == jnp.float32 else v)
            for k, v in flat.items()}
    return traverse_util.unflatten_dict(flat)


def f32_math(fn: Callable[..., jax.Array], *xs: jax.Array) -> jax.Array:
    """fn over fp32 copies of xs, rounded once to xs[0]'s dtype (no-op casts in fp32)."""
    dtype = xs[0].dtype
    y = fn(*(x.astype(jnp.float32) for x in xs))
    return _cast_bf16(y) if dtype == jnp.bfloat16 else y.astype(dtype)
