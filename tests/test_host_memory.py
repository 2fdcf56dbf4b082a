"""vrefer_jax.host_memory: an XLA:CPU step's temp arena stays mapped between runs.

Each case runs in a fresh interpreter (the setting must precede JAX's CPU client, and this test
process already has one)."""

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from vrefer_jax import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")

# An element-wise chain whose links are each read twice, so XLA keeps them in its temp arena
# (no matmul: the GEMM libraries' own packing buffers would fault regardless of the setting).
PROBE = textwrap.dedent("""
    import json, resource, sys
    from vrefer_jax import host_memory
    applied = host_memory.configure(sys.argv[1])
    assert host_memory.applied() == applied
    import jax, jax.numpy as jnp

    @jax.jit
    def f(x):
        for _ in range(4):
            x = jnp.sin(x)[::-1] + jnp.cos(x).sum(0)
        return x.sum()

    x = jnp.ones((8192, 2048), jnp.float32)
    temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
    for _ in range(3):  # the heap grows to the arena's size over the first runs
        f(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        f(x).block_until_ready()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
    print(json.dumps(dict(applied=applied, temp=temp, faults=faults)))
""")


def _run(code: str, *args: str, **env) -> subprocess.CompletedProcess:
    e = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **env}  # one CPU device
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=e, capture_output=True, text=True,
                          timeout=300)


def _probe(mode: str) -> dict:
    out = _run(PROBE, mode)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_reuse_keeps_the_temp_arena_mapped_between_runs():
    tuned, plain = _probe("reuse"), _probe("default")
    pages = tuned["temp"] / 4096
    assert tuned["applied"] and not plain["applied"]
    assert pages > 40_000  # the probe's arena is large enough to tell (192 MiB: 96 huge pages even)
    assert tuned["faults"] < 0.01 * pages, tuned  # reused as it is
    # JAX's own setting: the worker thread's arena maps it afresh each run (4 KiB pages here; with
    # transparent huge pages for every mapping it would be fewer, but never none)
    assert plain["faults"] > max(10 * tuned["faults"], 50), (plain, tuned)


def test_auto_leaves_accelerator_hosts_alone():
    code = "from vrefer_jax import host_memory; print(host_memory.cpu_only(), host_memory.configure('auto'))"
    for platforms, want in (("cuda", "False False"), ("tpu,cpu", "False False")):
        out = _run(code, JAX_PLATFORMS=platforms)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split() == want.split(), (platforms, out.stdout)


def test_too_late_is_an_error_only_when_asked_for():
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp
        from vrefer_jax import host_memory
        jnp.ones(3).block_until_ready()  # the CPU client exists now
        print(host_memory.configure("auto"), host_memory.configure("default"))
        try:
            host_memory.configure("reuse")
        except RuntimeError as e:
            print("refused:", e)
    """)
    out = _run(code)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "False False"
    assert lines[1].startswith("refused:") and "backends already exist" in lines[1]


def test_mode_is_checked_and_bound_by_gin():
    with pytest.raises(ValueError, match="not one of"):
        host_memory.configure("fast")
    code = textwrap.dedent("""
        import gin
        from vrefer_jax import host_memory
        gin.parse_config("host_memory.mode = 'default'")
        print(host_memory.configure(), host_memory.applied())
        gin.clear_config()  # unbound: 'auto', on this CPU-only interpreter
        print(host_memory.configure(), host_memory.applied())
    """)
    out = _run(code)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "False", "True", "True"], out.stdout
