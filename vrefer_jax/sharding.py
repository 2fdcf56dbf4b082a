"""Logical axis names and the one table that maps them onto mesh axes.

Every parameter is created with logical names (``nn.with_logical_partitioning``) and the main
activations are constrained with ``constrain`` at block boundaries. Training maps the names onto a
mesh ``(data, fsdp, tensor)`` with ``DEFAULT_RULES`` (overridable from gin); outside a mesh the
constraints are no-ops, so the model runs unchanged on one device.

Parameter axes
  vocab, embed, mlp, heads, kv_heads, head_dim, layers            Qwen2 decoder
  vit_embed, vit_mlp, vit_heads, vit_head_dim, vit_pos,            SigLIP tower
  vit_patch_h, vit_patch_w, vit_channels
  conv_in, conv_out, conv_spatial[_1, _2], se_reduce               STC connector convs
  norm                                                             norm scales/biases
Activation axes
  activation_batch, activation_length, activation_embed, activation_heads, activation_kv_heads,
  activation_mlp, activation_vocab, activation_frames, activation_patches, activation_vit_embed,
  activation_objects, activation_head_dim

A logical name may appear only once per array (Flax rejects repeats), hence the numbered spatial
kernel names.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import gin
import jax

# Ordered (logical name, mesh axes) pairs; the first rule whose mesh axes are free wins.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_frames", ("data", "fsdp")),
    ("activation_objects", None),
    ("activation_length", None),
    ("activation_patches", None),
    ("activation_embed", None),
    ("activation_vit_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("activation_head_dim", None),
    # decoder parameters: FSDP over `embed`, tensor parallel over heads / mlp / vocab
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    # vision tower and connector: lightly sharded (frozen tower, small compared to the LLM)
    ("vit_embed", None),
    ("vit_mlp", "tensor"),
    ("vit_heads", "tensor"),
    ("vit_head_dim", None),
    ("vit_patch_h", None),
    ("vit_patch_w", None),
    ("vit_channels", None),
    ("vit_pos", None),
    # conv_in stays replicated: with it over `fsdp` while the batch is split over (data, fsdp),
    # XLA's SPMD partitioner returns wrong connector gradients (RegStage SE gate -> 1x1 conv;
    # reproduced in plain JAX on a (2, 2, 2) CPU mesh;
    # tests/test_train.py::test_sharded_step_matches_single_device guards it).
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("conv_spatial", None),
    ("conv_spatial_1", None),
    ("conv_spatial_2", None),
    ("se_reduce", None),
    ("norm", None),
)


@gin.configurable
def logical_axis_rules(rules: Sequence[tuple[str, object]] = DEFAULT_RULES):
    """The rules table in force (bind `logical_axis_rules.rules` in gin to change it)."""
    return tuple((name, tuple(ax) if isinstance(ax, list) else ax) for name, ax in rules)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside a mesh / rules context."""
    return nn.with_logical_constraint(x, tuple(names))
