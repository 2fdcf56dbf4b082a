"""Launch tooling: sweeps (`launch.sweep`), TPU VMs (`launch.tpu_vm`), GPU clusters (`launch.gpu_cluster`).

Run from the repository root, e.g. ``python -m launch.tpu_vm create my-tpu --zone=... --dry-run``.
Every launcher builds its shell commands as argv lists first (see `launch.common`), so ``--dry-run``
prints exactly what would run.
"""
