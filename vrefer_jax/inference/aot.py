"""Ahead-of-time memory check for generation: compile `generate_multimodal` (prefill + the decode
loop over a static KV cache) for a target and report the per-device memory before serving on it.

    python -m vrefer_jax.inference.aot --model configs/models/videorefer_7b.gin --target v5e-8 \\
        --batch 8 --text_len 512 --new_tokens 256 [--mesh 1,2,4] [--param_dtype bfloat16]
    python -m vrefer_jax.inference.aot --model configs/models/videorefer_7b.gin --target 1xH100

    python -m vrefer_jax.inference.aot --model configs/models/vl3_7b.gin --target v5e-8 \\
        --batch 8 --frames 64 --max_objects 2 --text_len 512 --new_tokens 256

The prompt comes from the config's family (`families.workloads`). VideoRefer-7B: the official 7B
video prompt, `num_frames` frames (1,352 video tokens at 16 frames), `text_len` prompt ids and up to
`max_objects` objects of 4 tokens each. VRVL3: `--frames` video frames of `--frame_hw` pixels
within `mm_max_length` (no pruning), `max_objects` region crops of `--region_cells` cells (10
tokens each) and `text_len` text rows. The KV cache holds the whole prompt plus `new_tokens`. Parameters are served in `param_dtype` (bf16 by default, as a
serving checkpoint is), sharded by the same logical-axis rules as training; the batch is split over
(data, fsdp) and the heads / MLP / vocabulary over `tensor`. Devices as in `training/aot.py`:
compile-only TPU devices when libtpu is installed, else N fake CPU devices (an approximation of the
TPU/GPU compiler's buffer assignment, stated in the output).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from vrefer_jax.aot_targets import (GIB, Target, compiled_memory, ensure_host_devices, nbytes, parse_target,
                                    shard_bytes, target_devices)

MODULE = "vrefer_jax.inference.aot"


def default_mesh(target: Target) -> tuple[int, int, int]:
    """(data, fsdp, tensor) for serving: one device takes everything; several split heads / MLP
    over `tensor` as far as the KV heads allow (4 at 7B) and the rest of the devices over `fsdp`."""
    n = target.num_devices
    tensor = next(t for t in (4, 2, 1) if n % t == 0)
    return 1, n // tensor, tensor


def prompt_workload(cfg, text_len: int, max_objects: int, frames: int | None = None,
                    frame_hw: tuple[int, int] | None = None, region_cells: int | None = None):
    """The serving prompt of `cfg`'s family (see the module docstring) as a `Workload`. VideoRefer:
    `text_len` prompt ids in all (the <video> and <region> ids among them), objects on all
    `num_frames` frames; VRVL3: `text_len` text rows, one crop per object, 30 cells (k-means)."""
    from vrefer_jax import families
    from vrefer_jax.families.workloads import Workload

    if families.for_config(cfg).name == "videorefer":
        return Workload(text_len=text_len - 1 - max_objects, frames=frames, regions=max_objects,
                        region_frames=frames or cfg.num_frames)
    return Workload(text_len=text_len, frames=frames or 64, frame_hw=tuple(frame_hw or (360, 640)),
                    regions=max_objects, region_cells=region_cells or 30)


def compile_generate(cfg, devices, mesh_shape: tuple[int, int, int], *, batch: int, text_len: int, new_tokens: int,
                     max_objects: int, param_dtype: str, rules=None, workload=None):
    """Lower and compile generation with abstract, sharded inputs. Returns (compiled, abstract
    params, out_len, timings); the prompt is `workload` (default `prompt_workload`)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from vrefer_jax.checkpoints.hf_import import abstract_params, param_shardings
    from vrefer_jax.families.workloads import synthetic_batch
    from vrefer_jax.inference import generate as gen_lib
    from vrefer_jax.inference.sampling import GenerationConfig
    from vrefer_jax.sharding import MeshConfig, logical_axis_rules, make_mesh

    rules = rules or logical_axis_rules()
    mesh = make_mesh(MeshConfig(*mesh_shape), devices)
    shardings = param_shardings(cfg, mesh, rules)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, jnp.dtype(param_dtype), sharding=s),
                          abstract_params(cfg), shardings)
    spec, out_len, _ = synthetic_batch(cfg, batch, workload or prompt_workload(cfg, text_len, max_objects),
                                       abstract=True)
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    inputs = {k: jax.ShapeDtypeStruct(spec[k].shape, spec[k].dtype, sharding=rows) for k in gen_lib.input_keys(cfg)}
    gen = GenerationConfig(max_new_tokens=new_tokens).static
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=NamedSharding(mesh, PartitionSpec()))
    t0 = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):  # the jitted function the predictor runs; shardings from the inputs
        lowered = gen_lib._generate_multimodal.lower(params, inputs, rng, cfg=cfg, gen=gen, out_len=out_len)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return compiled, params, out_len, dict(lower_s=t1 - t0, compile_s=t2 - t1)


def kv_cache_bytes(cfg, batch: int, positions: int, dtype_bytes: int = 2) -> int:
    """Global bytes of the KV cache: K and V per layer, [batch, positions, kv_heads, head_dim]."""
    t = cfg.text
    head_dim = t.hidden_size // t.num_attention_heads
    return 2 * t.num_hidden_layers * batch * positions * t.num_key_value_heads * head_dim * dtype_bytes


def check(cfg, target: Target, *, batch: int = 8, text_len: int = 512, new_tokens: int = 256, max_objects: int = 1,
          mesh: tuple[int, int, int] | None = None, param_dtype: str = "bfloat16", try_tpu: bool = True,
          workload=None, log=print) -> dict[str, Any]:
    """Compile generation for `target`; the report's byte figures are per device. `workload`: the
    prompt (default `prompt_workload(cfg, text_len, max_objects)`)."""
    import jax

    from vrefer_jax.families.workloads import synthetic_batch

    devices, how = target_devices(target, try_tpu)
    mesh = mesh or default_mesh(target)
    workload = workload or prompt_workload(cfg, text_len, max_objects)
    sizes = synthetic_batch(cfg, 1, workload, abstract=True)[2]
    log(f"target {target.name}: {target.num_devices} devices, {target.hbm_gib:.0f} GiB each; compiling on {how}")
    log(f"mesh data={mesh[0]} fsdp={mesh[1]} tensor={mesh[2]}; batch {batch}, text {text_len}, "
        f"{new_tokens} new tokens; parameters in {param_dtype}; rows {sizes}")
    compiled, params, out_len, times = compile_generate(cfg, devices, mesh, batch=batch, text_len=text_len,
                                                        new_tokens=new_tokens, max_objects=max_objects,
                                                        param_dtype=param_dtype, workload=workload)
    leaves = jax.tree.leaves(params)
    cache_dtype = 4 if cfg.compute_dtype == "float32" else 2
    return dict(target=target.name, how=how, mesh=mesh, batch=batch, text_len=text_len, new_tokens=new_tokens,
                out_len=out_len, hbm_gib=target.hbm_gib, param_dtype=param_dtype, sizes=sizes,
                params_global=sum(nbytes(x) for x in leaves), params_per_device=sum(shard_bytes(x) for x in leaves),
                kv_cache_global=kv_cache_bytes(cfg, batch, out_len + new_tokens, cache_dtype),
                compiled=compiled_memory(compiled), times=times)


def format_report(r: dict[str, Any]) -> str:
    c, n = r["compiled"], r["mesh"][0] * r["mesh"][1] * r["mesh"][2]
    g = lambda b: f"{b / GIB:7.2f} GiB"  # noqa: E731
    return "\n".join([
        f"== {r['target']} | mesh (data, fsdp, tensor) = {r['mesh']} | generation, batch {r['batch']}, prompt "
        f"{r['out_len']} (text {r['text_len']}), {r['new_tokens']} new tokens | {r['how']}",
        *([f"  prompt rows: {_rows(r['sizes'])}"] if r.get("sizes") else []),
        f"  parameters ({r['param_dtype']})  {g(r['params_per_device'])} per device   (global {g(r['params_global'])})",
        f"  KV cache                  {g(r['kv_cache_global'] / n)} per device if evenly split (global "
        f"{g(r['kv_cache_global'])})",
        f"  compiled: arguments {g(c['arguments'])}, temporaries {g(c['temporaries'])}, outputs {g(c['outputs'])}",
        f"  per-device total (compiled) {g(c['total'])} of {r['hbm_gib']:.0f} GiB"
        + ("" if c["total"] <= r["hbm_gib"] * GIB else "   ** DOES NOT FIT **"),
        f"  compile time {r['times']['compile_s']:.1f} s (lowering {r['times']['lower_s']:.1f} s)"])


def _rows(s: dict[str, Any]) -> str:
    if s["family"] == "videorefer":
        return f"{s['frames']} frames -> {s['video_tokens']} video tokens, {s['objects']} objects"
    return (f"{s['frames']} frames of {s['frame_grid'][0]}x{s['frame_grid'][1]} patches -> {s['visual_tokens']} visual"
            f" rows, {s['regions']} regions, {s['text']} text rows; N {s['patches']} patches, vision attention "
            + (f"in blocks of {s['chunk']}" if s["chunk"] else "dense"))


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model gin file, e.g. configs/models/videorefer_7b.gin")
    ap.add_argument("--gin_bindings", nargs="*", default=[])
    ap.add_argument("--target", required=True, help="v5e-8, v5p-16, 1xH100, 8xH100, ...")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--text_len", type=int, default=512, help="text tokens of the prompt")
    ap.add_argument("--new_tokens", type=int, default=256)
    ap.add_argument("--max_objects", type=int, default=1)
    ap.add_argument("--mesh", default=None, help="data,fsdp,tensor (default: tensor up to 4, the rest fsdp)")
    ap.add_argument("--param_dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--no_tpu", action="store_true", help="skip the libtpu topology attempt")
    ap.add_argument("--frames", type=int, default=None, help="video frames (VideoRefer: num_frames; VRVL3: 64)")
    ap.add_argument("--frame_hw", type=int, nargs=2, default=None, help="VRVL3 source frame size h w (360 640)")
    ap.add_argument("--region_cells", type=int, default=None, help="VRVL3 mask cells per object (30)")
    args = ap.parse_args(argv)

    target = parse_target(args.target)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    ensure_host_devices(target.num_devices, argv, MODULE)

    from vrefer_jax import families

    cfg = families.config_from_gin([args.model], args.gin_bindings)
    from vrefer_jax.sharding import MeshConfig

    mesh = MeshConfig.parse(args.mesh).resolve(target.num_devices) if args.mesh else None
    workload = prompt_workload(cfg, args.text_len, args.max_objects, args.frames, args.frame_hw, args.region_cells)
    r = check(cfg, target, batch=args.batch, text_len=args.text_len, new_tokens=args.new_tokens,
              max_objects=args.max_objects, mesh=mesh, param_dtype=args.param_dtype, try_tpu=not args.no_tpu,
              workload=workload)
    print(format_report(r))


if __name__ == "__main__":
    main()
