"""The device mesh, the logical axis names, and the one table that maps them onto mesh axes.

The mesh `(data, fsdp, tensor)` comes from `MeshConfig` (gin: configs/meshes): each axis names its
size, -1 takes the devices left over (at most one -1). Across TPU slices (`dcn_data` > 1) the data
axis spans slices over DCN and the rest stays inside a slice. Training and inference build their
mesh here alike.

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

import dataclasses
import logging
from collections.abc import Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

log = logging.getLogger(__name__)

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
    ("lora_rank", None),  # LoRA adapters: A [in.., r], B [r, out..] shard like their base kernel
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


# ----------------------------------------------------------------------------- the mesh

AXES = ("data", "fsdp", "tensor")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    dcn_data: int = 1  # slices (multi-slice data parallelism over DCN)

    @classmethod
    def parse(cls, text: str) -> MeshConfig:
        """'data=1,fsdp=2,tensor=4' (omitted axes: data -1, fsdp 1, tensor 1) or '1,2,4'."""
        parts = [p.strip() for p in text.split(",") if p.strip()]
        try:
            if all("=" not in p for p in parts) and len(parts) == 3:
                return cls(*(int(p) for p in parts))
            sizes = {k.strip(): int(v) for k, v in (p.split("=", 1) for p in parts)}
        except ValueError:
            raise ValueError(f"mesh {text!r}: expected 'data=D,fsdp=F,tensor=T' or 'D,F,T'") from None
        unknown = set(sizes) - set(AXES)
        if unknown:
            raise ValueError(f"mesh {text!r}: unknown axes {sorted(unknown)} (axes: {AXES})")
        return cls(**sizes)

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """Axis sizes with -1 filled in; raises if they do not multiply to `num_devices`."""
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1:
            raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(AXES, sizes))}")
        known = int(np.prod([s for s in sizes if s != -1]))
        if any(s == 0 or s < -1 for s in sizes) or num_devices % known:
            raise ValueError(f"mesh {dict(zip(AXES, sizes))} does not fit {num_devices} devices")
        sizes = [num_devices // known if s == -1 else s for s in sizes]
        if int(np.prod(sizes)) != num_devices:
            raise ValueError(f"mesh {dict(zip(AXES, sizes))} uses {np.prod(sizes)} of {num_devices} devices")
        return tuple(sizes)


def make_mesh(cfg: MeshConfig | None = None, devices=None) -> Mesh:
    """The mesh over `devices` (default: all devices of all processes)."""
    cfg = cfg or MeshConfig()
    devices = list(jax.devices() if devices is None else devices)
    fixed = int(np.prod([cfg.data, cfg.fsdp, cfg.tensor]))
    if -1 not in (cfg.data, cfg.fsdp, cfg.tensor) and 0 < fixed < len(devices) and jax.process_count() == 1:
        log.warning("mesh %s uses the first %d of %d devices", (cfg.data, cfg.fsdp, cfg.tensor), fixed, len(devices))
        devices = devices[:fixed]
    shape = cfg.resolve(len(devices))
    if cfg.dcn_data > 1:
        if shape[0] % cfg.dcn_data:
            raise ValueError(f"data axis {shape[0]} not divisible by dcn_data {cfg.dcn_data}")
        ici = (shape[0] // cfg.dcn_data, shape[1], shape[2])
        arr = mesh_utils.create_hybrid_device_mesh(ici, (cfg.dcn_data, 1, 1), devices)
    else:
        try:
            arr = mesh_utils.create_device_mesh(shape, devices)
        except (AssertionError, NotImplementedError, ValueError):  # CPU / unusual topologies
            arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, AXES)


def fit_sharding(sharding: jax.sharding.NamedSharding, shape: Sequence[int]) -> jax.sharding.NamedSharding:
    """`sharding` with the mesh axes dropped from every dimension they do not divide evenly.

    Serving meshes put `tensor` over dimensions the training rules assume divisible (the 7B's
    vocabulary of 151,647 rows over 4 devices is not): such a dimension is replicated over that
    axis instead of failing, the others keep their split."""
    spec = []
    for dim, axes in zip(shape, tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        keep = []
        for a in names:
            if dim % (int(np.prod([sharding.mesh.shape[k] for k in keep])) * sharding.mesh.shape[a]) == 0:
                keep.append(a)
        spec.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
