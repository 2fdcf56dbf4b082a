"""Multi-process: `jax.distributed` from the environment (TPU pods, GPU clusters, tests), and
host-local batches placed as global arrays."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

log = logging.getLogger(__name__)


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


def to_global(batch: Mapping[str, Any], mesh, data_axes=("data",)) -> dict[str, Any]:
    """Host-local numpy batch -> global `jax.Array`s sharded over `data_axes` on the batch dim
    (`jax.make_array_from_process_local_data`); `sample_ids` stays on the host."""
    out = {}
    for k, v in batch.items():
        if k == "sample_ids":
            out[k] = v
            continue
        spec = PartitionSpec(data_axes, *([None] * (np.ndim(v) - 1)))
        out[k] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), np.asarray(v))
    return out
