"""Accelerator targets for ahead-of-time compiles: what a `v5p-64` or `8xH100` is, the devices to
compile against (compile-only TPU devices when libtpu can describe the topology, else N fake CPU
devices), and the per-device memory figures of a compiled program. Shared by the train-step check
(`training/aot.py`) and the inference check (`inference/aot.py`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys

GIB = 1024**3

# HBM per device (GiB) by accelerator family.
HBM_GIB = {"v4": 32.0, "v5p": 95.0, "v5e": 16.0, "v6e": 32.0, "H100": 80.0, "H200": 141e9 / GIB, "A100": 80.0}

@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str  # tpu | gpu
    family: str
    num_devices: int
    hbm_gib: float
    tpu_topology: str | None = None  # name for get_topology_desc


def parse_target(name: str) -> Target:
    """'v5p-64' -> 32 v5p chips; '8xH100' -> 8 H100s; 'cpu-8' -> 8 host devices (tests)."""
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
    if m:
        fam = "v5e" if m[1] == "v5litepod" else m[1]
        n = int(m[2])
        chips = n // 2 if fam in ("v4", "v5p") else n  # v4/v5p names count TensorCores (2 per chip)
        if chips < 1:
            raise ValueError(f"target {name!r} has no chips")
        return Target(name, "tpu", fam, chips, HBM_GIB[fam], f"{fam}-{n}")
    m = re.fullmatch(r"(\d+)x(H100|H200|A100)", name, flags=re.I)
    if m:
        fam = m[2].upper()
        return Target(name, "gpu", fam, int(m[1]), HBM_GIB[fam])
    m = re.fullmatch(r"cpu-(\d+)", name)
    if m:
        return Target(name, "cpu", "cpu", int(m[1]), float("nan"))
    raise ValueError(f"unknown target {name!r}: use v4-N, v5p-N, v5e-N, v6e-N, KxH100, KxH200, KxA100 or cpu-N")


def ensure_host_devices(n: int, argv: list[str] | None = None, module: str = "vrefer_jax.training.aot") -> None:
    """Make sure JAX will see at least `n` CPU devices. Call before anything touches a JAX backend.

    Sets `--xla_force_host_platform_device_count`; if a backend with fewer devices is already up
    and `argv` is given, re-executes this module with the flag in the environment.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    cur = re.search(r"--xla_force_host_platform_device_count=(\d+)", flags)
    if cur and int(cur[1]) >= n:
        return
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    if "jax" not in sys.modules:
        return
    import jax
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_num_cpu_devices", n)
        return
    if len(jax.devices("cpu")) >= n:
        return
    if argv is None:
        raise RuntimeError(f"JAX already started with {len(jax.devices('cpu'))} CPU devices; need {n}: "
                           f"set XLA_FLAGS=--xla_force_host_platform_device_count={n} before importing jax")
    os.execv(sys.executable, [sys.executable, "-m", module, *argv])


def target_devices(target: Target, try_tpu: bool = True):
    """(devices, how): compile-only TPU devices when libtpu can describe the topology, else the
    first `num_devices` CPU devices."""
    import jax

    if target.platform == "tpu" and try_tpu:
        try:
            from jax.experimental import topologies

            topo = topologies.get_topology_desc(target.tpu_topology, "tpu")
            if len(topo.devices) == target.num_devices:
                return list(topo.devices), f"TPU topology description {target.tpu_topology} (libtpu)"
        except Exception as e:  # no libtpu here: fall back
            reason = f"no libtpu: {type(e).__name__}: {str(e).splitlines()[0][:60]}"
        else:
            reason = f"topology has {len(topo.devices)} devices, expected {target.num_devices}"
    else:
        reason = "no compile-only topology for this platform"
    cpus = jax.devices("cpu")
    if len(cpus) < target.num_devices:
        raise RuntimeError(f"need {target.num_devices} fake CPU devices, have {len(cpus)}: "
                           f"set XLA_FLAGS=--xla_force_host_platform_device_count={target.num_devices}")
    return cpus[: target.num_devices], f"{target.num_devices} fake CPU devices ({reason})"


def nbytes(x) -> int:
    import numpy as np

    return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


def shard_bytes(x) -> int:
    """Bytes of one device's shard of a `ShapeDtypeStruct` with a sharding (largest shard)."""
    import numpy as np

    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


def compiled_memory(compiled) -> dict[str, int]:
    """Per-device figures from `compiled.memory_analysis()` (state donated: outputs alias inputs)."""
    m = compiled.memory_analysis()
    m = m[0] if isinstance(m, (list, tuple)) else m
    out = dict(arguments=int(m.argument_size_in_bytes), outputs=int(m.output_size_in_bytes),
               aliased=int(m.alias_size_in_bytes), temporaries=int(m.temp_size_in_bytes),
               code=int(m.generated_code_size_in_bytes))
    out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    peak = getattr(m, "peak_memory_in_bytes", 0)
    if peak:
        out["peak"] = int(peak)
    return out
