"""Test set-up: CPU with 8 fake devices, fp32 matmuls, an import-only torchvision stand-in for timm."""

import enum
import importlib.machinery
import importlib.util
import os
import sys
import types

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight fake CPU devices for the sharding tests (must be set before jax is imported); single-device
# code keeps running on device 0.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def _stub_torchvision() -> None:
    """timm imports a few torchvision modules at import time; RegStage never calls them.

    There is no CPU torchvision build for torch 2.13 on PyPI, so when the real one cannot be
    imported, register empty modules under exactly the names timm imports.
    """
    try:
        if importlib.util.find_spec("torchvision") is not None:
            import torchvision  # noqa: F401

            return
    except Exception:  # a CUDA-only wheel fails at import
        pass
    names = [
        "torchvision", "torchvision.ops", "torchvision.ops.misc", "torchvision.transforms",
        "torchvision.transforms.functional", "torchvision.transforms.v2", "torchvision.datasets",
        "torchvision.io", "torchvision.utils",
    ]
    for name in names:
        mod = types.ModuleType(name)
        mod.__path__ = []  # mark as package so submodule imports resolve
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        sys.modules[name] = mod

    class _Any:  # placeholder for any attribute timm touches at import time
        def __init__(self, *a, **k):
            raise RuntimeError("torchvision stand-in: not available in this environment")

    def _getattr(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Any

    for name in names:
        sys.modules[name].__getattr__ = _getattr
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, sys.modules[name])
    tf = sys.modules["torchvision.transforms"]
    tf.InterpolationMode = enum.Enum("InterpolationMode", {
        "NEAREST": "nearest", "BILINEAR": "bilinear", "BICUBIC": "bicubic", "BOX": "box",
        "HAMMING": "hamming", "LANCZOS": "lanczos", "NEAREST_EXACT": "nearest-exact"})
    sys.modules["torchvision.transforms.functional"].InterpolationMode = tf.InterpolationMode


def _import_timm() -> None:
    """Import timm under the stand-in, then remove it again so that `transformers` (which probes
    for torchvision's version) sees no torchvision at all."""
    if importlib.util.find_spec("timm") is None:
        return
    before = set(sys.modules)
    _stub_torchvision()
    try:
        import timm.models.regnet  # noqa: F401
    finally:
        for name in [n for n in sys.modules if n.startswith("torchvision") and n not in before]:
            del sys.modules[name]


_import_timm()
