"""Importing timm (the RegStage reference) without torchvision.

timm 1.0 imports a few torchvision modules at import time; RegStage never calls them, and there is
no CPU torchvision build for torch 2.13 on PyPI. Shared by `conftest.py` (tests) and
`torch_reference.py` (tests and benchmarks/train_step.py). Imports neither torch nor timm itself.
"""

import enum
import importlib.machinery
import importlib.util
import sys
import types

_NAMES = [
    "torchvision", "torchvision.ops", "torchvision.ops.misc", "torchvision.transforms",
    "torchvision.transforms.functional", "torchvision.transforms.v2", "torchvision.datasets",
    "torchvision.io", "torchvision.utils",
]


def stub_torchvision() -> None:
    """When the real torchvision cannot be imported, register empty modules under exactly the names
    timm imports."""
    try:
        if importlib.util.find_spec("torchvision") is not None:
            import torchvision  # noqa: F401

            return
    except Exception:  # a CUDA-only wheel fails at import
        pass
    for name in _NAMES:
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

    for name in _NAMES:
        sys.modules[name].__getattr__ = _getattr
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, sys.modules[name])
    tf = sys.modules["torchvision.transforms"]
    tf.InterpolationMode = enum.Enum("InterpolationMode", {
        "NEAREST": "nearest", "BILINEAR": "bilinear", "BICUBIC": "bicubic", "BOX": "box",
        "HAMMING": "hamming", "LANCZOS": "lanczos", "NEAREST_EXACT": "nearest-exact"})
    sys.modules["torchvision.transforms.functional"].InterpolationMode = tf.InterpolationMode


def import_timm() -> bool:
    """Import timm's RegNet under the stand-in, then remove the stand-in again so that `transformers`
    (which probes for torchvision's version) sees no torchvision at all. False when timm is missing."""
    if "timm.models.regnet" in sys.modules:
        return True
    if importlib.util.find_spec("timm") is None:
        return False
    before = set(sys.modules)
    stub_torchvision()
    try:
        import timm.models.regnet  # noqa: F401
    finally:
        for name in [n for n in sys.modules if n.startswith("torchvision") and n not in before]:
            del sys.modules[name]
    return True
