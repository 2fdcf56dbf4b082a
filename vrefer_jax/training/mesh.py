"""Device mesh `(data, fsdp, tensor)` from config, and multi-process start-up.

A mesh config names the size of each axis; -1 takes the devices left over (at most one -1).
Across TPU slices (`dcn_data` > 1) the data axis spans slices over DCN and the rest stays inside a
slice (`mesh_utils.create_hybrid_device_mesh`).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import gin
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

log = logging.getLogger(__name__)

AXES = ("data", "fsdp", "tensor")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    dcn_data: int = 1  # slices (multi-slice data parallelism over DCN)

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
    """The training mesh over `devices` (default: all devices of all processes)."""
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


def maybe_initialize_distributed() -> bool:
    """Start `jax.distributed` when the environment says this is one of several processes.

    GPU clusters / localhost: VREFER_COORDINATOR (host:port), VREFER_NUM_PROCESSES, VREFER_PROCESS_ID
    (set by `launch/gpu_cluster.py`). TPU pods: the TPU runtime's env (no arguments needed).
    Returns whether it initialised.
    """
    env = os.environ
    if env.get("VREFER_COORDINATOR") and env.get("JAX_PLATFORMS", "") == "cpu":
        # CPU processes need a collectives backend for cross-process computations (tests, laptops).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if env.get("VREFER_COORDINATOR"):
        jax.distributed.initialize(
            coordinator_address=env["VREFER_COORDINATOR"],
            num_processes=int(env["VREFER_NUM_PROCESSES"]),
            process_id=int(env["VREFER_PROCESS_ID"]))
    elif len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()
    else:
        return False
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
