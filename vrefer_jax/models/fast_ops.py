"""Array ops with hand-written backward passes that XLA compiles well (measured on CPU; nothing here
is CPU-specific code, and the same HLO is what a TPU/GPU backend gets).

Why custom VJPs: autodiff's transpose of these ops is correct but lays out badly.
* `matmul_last`: the weight gradient of a dot over leading batch dims ([..., I] x [I, O]) comes out of
  JAX as a dot_general with a transpose that XLA folds into the producer of the cotangent; the
  producer (a LayerNorm backward) then writes a transposed [O, N] copy with strided reads, 3-5x
  slower than the matmul it feeds. Flattening to 2-D and writing dW = x^T g explicitly gives a plain
  GEMM with no copy.
* `layer_norm`: Flax's LayerNorm differentiates to a graph in which the broadcast scale is
  materialised at the full activation shape and the statistics are recomputed in several passes;
  the closed-form backward is two fused passes.
* `depthwise_conv`: a grouped convolution (`feature_group_count = C`) runs 10x slower than taps on
  XLA:CPU and has a wrong kernel gradient under the SPMD partitioner when the batch is split over
  two mesh axes and channels over a third (tests/test_train.py guards it). Its taps are nine
  shifted multiply-adds; the backward materialises the cotangent once (an optimisation barrier)
  so that its producer is not re-fused, and recomputed, into each of the nine shifted reads.

Shapes: x [..., I] / [N, H, W, C]; all functions accept any float dtype and keep it (LayerNorm
statistics and reductions in fp32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# ----------------------------------------------------------------------------- x @ w over the last dim


def _dot(a: jax.Array, b: jax.Array, a_dim: int, b_dim: int, out_dtype) -> jax.Array:
    """2-D dot contracting a's `a_dim` with b's `b_dim`, accumulated and returned in fp32, cast to
    `out_dtype`. Written as one dot_general (no `.T` operand) with an fp32 result: XLA:CPU runs a
    bf16 dot natively (AVX512-BF16/AMX, 3-5x the fp32 rate) only in that form, and otherwise
    upcasts both operands to fp32 in extra passes (measured: bf16 [328, 32000] x [512, 32000]^T
    21 ms as dot_general((1,), (1,)) vs 135 ms as dot(g, w.T))."""
    y = jax.lax.dot_general(a, b, (((a_dim,), (b_dim,)), ((), ())), preferred_element_type=jnp.float32)
    return y.astype(out_dtype)


@jax.custom_vjp
def matmul_last(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., I] @ w [I, O] -> [..., O] in x's dtype, as one [prod(...), I] x [I, O] GEMM with
    fp32 accumulation."""
    return _dot(x.reshape(-1, x.shape[-1]), w, 1, 0, x.dtype).reshape(x.shape[:-1] + w.shape[1:])


def _matmul_fwd(x, w):
    return matmul_last(x, w), (x, w)


def _matmul_bwd(res, g):
    x, w = res
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    dx = _dot(g2, w, 1, 1, x.dtype).reshape(x.shape)  # g w^T
    dw = _dot(x2, g2, 0, 0, w.dtype)  # x^T g
    return dx, dw


matmul_last.defvjp(_matmul_fwd, _matmul_bwd)


# ----------------------------------------------------------------------------- LayerNorm over the last dim


def _ln_stats(x32: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)  # E[(x-mean)^2], as PyTorch
    return mean, jax.lax.rsqrt(var + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float, out_dtype=None) -> jax.Array:
    """LayerNorm over the last axis: fp32 statistics and affine (as Flax's `nn.LayerNorm` with
    `use_fast_variance=False`), result in `out_dtype` (default x's). x [..., D], scale/bias [D]."""
    return _layer_norm_fwd(x, scale, bias, eps, out_dtype)[0]


def _layer_norm_fwd(x, scale, bias, eps, out_dtype):
    x32 = x.astype(jnp.float32)
    mean, rstd = _ln_stats(x32, eps)
    y = (x32 - mean) * (rstd * scale.astype(jnp.float32)) + bias.astype(jnp.float32)
    return y.astype(out_dtype or x.dtype), (x, mean, rstd, scale, bias)


def _layer_norm_bwd(eps, out_dtype, res, g):
    x, mean, rstd, scale, bias = res
    xhat = (x.astype(jnp.float32) - mean) * rstd
    g32 = g.astype(jnp.float32)
    red = tuple(range(g.ndim - 1))
    dscale = jnp.sum(g32 * xhat, axis=red).astype(scale.dtype)
    dbias = jnp.sum(g32, axis=red).astype(bias.dtype)
    dxhat = g32 * scale.astype(jnp.float32)
    dx = rstd * (dxhat - jnp.mean(dxhat, axis=-1, keepdims=True)
                 - xhat * jnp.mean(dxhat * xhat, axis=-1, keepdims=True))
    return dx.astype(x.dtype), dscale, dbias


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


# ----------------------------------------------------------------------------- depthwise k x k conv


def _shifted(x: jax.Array, k: int) -> list[jax.Array]:
    """The k*k windows of x [N, H, W, C] zero-padded by k // 2, row-major over the taps (i, j)."""
    p = k // 2
    H, W = x.shape[1:3]
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    return [xp[:, i:i + H, j:j + W, :] for i in range(k) for j in range(k)]


def _taps(x: jax.Array, w: jax.Array) -> jax.Array:
    k = w.shape[0]
    return functools.reduce(jnp.add, [s * w[t // k, t % k] for t, s in enumerate(_shifted(x, k))])


@jax.custom_vjp
def depthwise_conv(x: jax.Array, w: jax.Array) -> jax.Array:
    """Per-channel k x k correlation, stride 1, zero 'same' padding (k odd), no bias:
    x [N, H, W, C], w [k, k, C] -> [N, H, W, C] (PyTorch `Conv2d(groups=C)` / Flax
    `nn.Conv(feature_group_count=C)` with the kernel's group dim squeezed)."""
    return _taps(x, w)


def _depthwise_fwd(x, w):
    return _taps(x, w), (x, w)


def _depthwise_bwd(res, g):
    x, w = res
    k = w.shape[0]
    g = jax.lax.optimization_barrier(g)  # materialise once; see the module docstring
    dx = _taps(g, w[::-1, ::-1])  # the transposed correlation: flipped taps
    dw = jnp.stack([jnp.sum((s * g).astype(jnp.float32), axis=(0, 1, 2)) for s in _shifted(x, k)])
    return dx, dw.reshape(w.shape).astype(w.dtype)


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)
