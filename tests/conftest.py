"""Test set-up: CPU with 8 fake devices, fp32 matmuls, an import-only torchvision stand-in for timm."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight fake CPU devices for the sharding tests (must be set before jax is imported); single-device
# code keeps running on device 0.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from timm_compat import import_timm  # noqa: E402

import_timm()
