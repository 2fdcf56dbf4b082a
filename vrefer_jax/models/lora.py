"""LoRA tensors: the adapter leaves, int8 storage of frozen base kernels, and merging.

A projection with an adapter (`layers.DenseGeneral` named in `LoraConfig.targets`) holds, beside
its base `kernel [*in, *out]` (and `bias [*out]`):

  lora_a        [*in, r]   logical names: the kernel's input names + "lora_rank"
  lora_b        [r, *out]  logical names: "lora_rank" + the kernel's output names
  kernel_scale  [*out]     only with int8 storage: the kernel is int8, W = kernel * kernel_scale

so adapters shard like their base kernel ("lora_rank" is replicated) and gain the scanned `layers`
axis like every other layer parameter. Everything here is a pure function of arrays; the model and
the trainer call it.

Why not qwix (checked: `qwix` 0.1.8 installs from PyPI next to jax 0.10 / flax 0.12): its linen path
rewrites a module through method interception, so the adapters exist only while the wrapped model is
applied (every entry point: trainer, predictor, evaluation, export would have to wrap it), they are
named `kernel_lora_a` after qwix's own rules, and its QLoRA base becomes qwix `QArray` structures in
the parameter tree that the checkpoint key maps, the Orbax restore-target check, the optimizer's leaf
labels and the PEFT export would all have to learn. The int8 scheme QLoRA needs here (symmetric, per
output channel, frozen) is a few lines, kept as plain `int8` + `float32` leaves.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

ADAPTER_LEAVES = ("lora_a", "lora_b")
SCALE_LEAF = "kernel_scale"
INT8_MAX = 127.0


def quantize_int8(w, n_in: int, lead: int = 0):
    """Symmetric per-output-channel int8: w [(L,) *in (n_in dims), *out] -> (q int8, same shape;
    scale fp32 [(L,) *out]) with w ~= q * scale (the scale broadcast over the input dims). A channel
    of zeros gets scale 1 (q = 0). `lead` = 1 for a scanned stack (one scale per layer)."""
    xp = _xp(w)
    w = w.astype(xp.float32)
    amax = xp.max(xp.abs(w), axis=tuple(range(lead, lead + n_in)))
    scale = xp.where(amax > 0, amax / INT8_MAX, 1.0).astype(xp.float32)
    s = scale.reshape(scale.shape[:lead] + (1,) * n_in + scale.shape[lead:])
    return xp.clip(xp.round(w / s), -INT8_MAX, INT8_MAX).astype(xp.int8), scale


def _xp(x):
    return jnp if isinstance(x, jax.Array) else np


def layout(node: Mapping) -> tuple[int, int, int]:
    """(lead, n_in, n_out) of one projection dict: `lead` = 1 for a scanned stack (leading layers
    axis on every leaf), else 0. From the ranks alone: kernel = lead + in + out dims, lora_a = lead +
    in + 1, lora_b = lead + 1 + out."""
    k, a, b = node["kernel"].ndim, node["lora_a"].ndim, node["lora_b"].ndim
    lead = a + b - k - 2
    n_in = a - lead - 1
    return lead, n_in, k - lead - n_in


def delta(node: Mapping, scaling: float):
    """(alpha / r) A B of one projection dict, fp32 [(L,) *in, *out]: a contraction over the rank,
    batched over the layers axis when stacked."""
    lead, n_in, n_out = layout(node)
    xp = _xp(node["lora_a"])
    a = xp.asarray(node["lora_a"]).astype(xp.float32)
    b = xp.asarray(node["lora_b"]).astype(xp.float32)
    L = a.shape[:lead]
    a2 = a.reshape(L + (-1, a.shape[-1]))
    b2 = b.reshape(L + (b.shape[lead], -1))
    d = xp.einsum("...ir,...ro->...io", a2, b2)
    return scaling * d.reshape(a.shape[:-1] + b.shape[lead + 1:])


def base_kernel(node: Mapping):
    """The frozen base kernel of one projection dict in fp32 (dequantised when stored int8: the
    scale [(L,) *out] broadcasts over the input dims)."""
    k = node["kernel"]
    xp = _xp(k)
    w = xp.asarray(k).astype(xp.float32)
    if SCALE_LEAF not in node:
        return w
    lead, n_in, _ = layout(node)
    s = xp.asarray(node[SCALE_LEAF]).astype(xp.float32)
    return w * s.reshape(s.shape[:lead] + (1,) * n_in + s.shape[lead:])


def projections(tree: Mapping, path: tuple[str, ...] = ()):
    """Yields (path, dict) of every projection dict that holds an adapter (`lora_a`)."""
    if "lora_a" in tree:
        yield path, tree
        return
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from projections(v, path + (k,))


def has_adapters(params: Mapping) -> bool:
    """Whether a parameter tree holds any LoRA leaves."""
    return next(projections(params), None) is not None


def merge_params(params: Mapping, scaling: float, dtype=None) -> dict:
    """A LoRA parameter tree -> the plain tree with every adapter folded in: kernel <- W + (alpha/r) A B
    (W dequantised when stored int8), `lora_a` / `lora_b` / `kernel_scale` dropped. Merged kernels
    are fp32 (or `dtype`); other leaves are returned as they are. numpy or jax arrays."""
    def merge(tree):
        if not isinstance(tree, Mapping):
            return tree
        if "lora_a" not in tree:
            return {k: merge(v) for k, v in tree.items()}
        out = {k: v for k, v in tree.items() if k not in (*ADAPTER_LEAVES, SCALE_LEAF)}
        kernel = base_kernel(tree) + delta(tree, scaling)
        out["kernel"] = kernel if dtype is None else kernel.astype(dtype)
        return out

    return merge(params)
