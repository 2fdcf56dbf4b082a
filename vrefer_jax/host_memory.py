"""Keep an XLA:CPU step's scratch memory mapped between steps (CPU runs only).

An XLA:CPU executable allocates its whole temp arena on every run (about 800 MB for the
`small_224` train step) with `posix_memalign`, and frees it at the end. With async dispatch the run
happens on an XLA worker thread, whose glibc arena serves anything over 64 MB by a fresh `mmap` and
gives it back with `munmap`: every page of the arena faults in again, zero-filled, on every step.
Measured here (2-core CPU, `small_224`, batch 1, `benchmarks/train_step.py`): 207k minor faults
and 0.3 s of kernel time a step; the bf16 step 755 ms, fp32 925 ms. With the step run inline on the
calling thread (glibc's main arena) and glibc told never to `mmap` and not to trim below 2 GiB, the
arena is reused as it is: 0 faults, bf16 632 ms, fp32 852 ms.

Both halves are needed (inline runs alone: 761 ms; glibc settings alone: the worker thread still
maps afresh) and both are process-wide, so `configure` runs once, at an entry point, before JAX
creates its CPU client: `jax_cpu_enable_async_dispatch` is read only then. The CPU client runs only
single-device computations inline; what inline runs give up is the overlap of the trainer's host
loop with the step (the loaders prefetch in their own threads: the main job took 303 s with the
setting, 297 s without). On TPU / GPU hosts nothing is changed (`mode='auto'`): their steps do not
allocate through glibc, and a heap that never unmaps could only grow there.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import logging
import platform

import gin

log = logging.getLogger(__name__)

MODES = ("auto", "reuse", "default")
_applied = False
_M_TRIM_THRESHOLD = -1  # glibc <malloc.h> mallopt parameters
_M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest free top kept mapped (2 GiB)


def cpu_only() -> bool:
    """Whether JAX will run on its CPU backend: `JAX_PLATFORMS` puts cpu first, or neither a PJRT
    plugin (CUDA, ROCm, ...) nor libtpu is installed. Decided without creating a backend (that
    would fix the dispatch mode)."""
    import jax

    platforms = (jax.config.jax_platforms or "").strip()  # JAX_PLATFORMS, read by jax at import
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not (importlib.metadata.entry_points(group="jax_plugins") or importlib.util.find_spec("libtpu"))


def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "mallopt") else None


@gin.configurable("host_memory")
def configure(mode: str = "auto") -> bool:
    """Apply the setting; returns whether it is in force.

    mode: 'auto' (reuse when `cpu_only()`), 'reuse' (always; an error if too late or not glibc),
    'default' (leave JAX and glibc as they are).
    """
    from jax._src import xla_bridge

    if mode not in MODES:
        raise ValueError(f"host_memory.configure: mode {mode!r} is not one of {MODES}")
    if mode == "default" or (mode == "auto" and not cpu_only()):
        return False
    libc = _glibc()
    why = ("JAX's backends already exist (configure before the first computation)"
           if xla_bridge.backends_are_initialized() else "this C library is not glibc" if libc is None else None)
    if why is not None:
        if mode == "reuse":
            raise RuntimeError(f"host_memory.configure('reuse'): {why}")
        log.info("host memory: left as it is: %s", why)
        return False
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)
    if not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        raise RuntimeError("glibc mallopt refused M_MMAP_MAX / M_TRIM_THRESHOLD")
    log.info("host memory: XLA:CPU steps run inline and reuse glibc's main arena (no mmap, trim at 2 GiB)")
    global _applied
    _applied = True
    return True


def applied() -> bool:
    """Whether `configure` put the setting in force in this process."""
    return _applied
