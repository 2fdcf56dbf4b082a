"""Multi-process start-up: `jax.distributed` from the environment (TPU pods, GPU clusters, tests)."""

from __future__ import annotations

import logging
import os

import jax

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
