"""Ahead-of-time memory check: compile the train step for a target topology and report the
per-device memory before renting it. Any model family: the family of the model gin's config
(`families.for_config`) gives the batch (`families.workloads`), the parameter groups and the
analytic breakdown.

    python -m vrefer_jax.training.aot --model configs/models/videorefer_7b.gin --target v5p-64 \\
        --global_batch 128 --seq_len 2048 --stage stage3 [--micro_batch 1] [--mesh 1,32,1]
    python -m vrefer_jax.training.aot ... --target 8xH100 --depth 4,4    # reduced depth, scaled
    python -m vrefer_jax.training.aot ... --target 1xH100 --stage lora     # LoRA (stage qlora: int8 base)
    python -m vrefer_jax.training.aot --model configs/models/vl3_7b.gin --target v5p-64 \\
        --global_batch 256 --seq_len 16384 --stage vl3_finetune --frames 180 --depth 2,2 \\
        --gin_bindings VL3Config.mm_max_length=8192 [VL3Config.vision_attention_chunk=180]

Batches: VideoRefer-7B rows hold `seq_len` minus the video tokens of text, 4 objects on 8 frames
(the loader's caps); VRVL3 rows are `seq_len` long and hold `--frames` video frames of
`--frame_hw` pixels resized within `mm_max_length` (no pruning: the worst case), `--regions`
crops of `--region_cells` cells, and text in the rest. The default stage is the family's
(`DEFAULT_STAGE`); its trainable names must be parameter groups of the family.

Targets: `v4-N`, `v5p-N` (N TensorCores = N/2 chips), `v5e-N` / `v5litepod-N` / `v6e-N` (N chips),
`KxH100`, `KxH200`, `KxA100`. One JAX device per chip / GPU.

How it compiles:
  1. TPU targets first try `jax.experimental.topologies.get_topology_desc` (compile-only TPU
     devices; needs libtpu installed on this machine).
  2. Otherwise it compiles against N fake CPU devices laid out in the target's mesh. The CPU
     compiler partitions the program exactly as the TPU/GPU one would (same shardings), but its
     buffer assignment, fusion and bf16 handling differ: treat the compiled figures as an
     approximation and the analytic breakdown as the floor.
     N fake CPU devices must be requested before JAX starts its CPU backend; the CLI re-executes
     itself with `XLA_FLAGS=--xla_force_host_platform_device_count=N` when needed.

Reduced depth (`--depth D,V`): compiling 28 + 26 scanned layers on a small CPU host is slow, so the
step can be compiled with D decoder and V vision layers, once more with one fewer of each, and the
figures extrapolated linearly per layer to the full depth (scanned layers add parameters, optimizer
state and saved activations linearly).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any

from vrefer_jax.aot_targets import (GIB, Target, compiled_memory, ensure_host_devices, nbytes, parse_target,
                                    shard_bytes, target_devices)
from vrefer_jax.training.stages import available_stages, stage_lora, stage_trainable

# The stage a family's AOT check uses when none is given (configs/stages/<name>.gin).
DEFAULT_STAGE = {"videorefer": "stage3", "videorefer_videollama3": "vl3_finetune"}


def parse_mesh(spec: str | None, n: int):
    """'data,fsdp,tensor' / 'data=..,fsdp=..,tensor=..' (one may be -1) or None -> all devices on fsdp."""
    from vrefer_jax.sharding import MeshConfig

    if not spec:
        return MeshConfig(data=1, fsdp=-1, tensor=1)
    return MeshConfig.parse(spec)


def default_workload(cfg, seq_len: int, **overrides):
    """The training workload of `cfg`'s family at static length `seq_len` (labels on).

    VideoRefer-7B: the loader's caps (4 objects on 8 frames; text = seq_len minus the video
    tokens). VRVL3: 180 frames of 250x450 pixels, which `smart_resize` makes 10x18 patches = 45
    merged tokens per frame within mm_max_length 8192 (8,100 visual rows, 32,400 frame patches: the
    PixelRefer recipe's worst case), 4 regions of 30 cells; text fills the rest of `seq_len`.
    `overrides`: `Workload` fields."""
    from vrefer_jax import families
    from vrefer_jax.families.workloads import Workload

    if families.for_config(cfg).name == "videorefer":
        base = Workload(total_len=seq_len, regions=4, region_frames=8, labels=True)
    else:
        base = Workload(total_len=seq_len, frames=180, frame_hw=(250, 450), regions=4, region_cells=30, labels=True)
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


def batch_shapes(cfg, global_batch: int, seq_len: int, workload=None) -> dict[str, Any]:
    """Abstract global batch as the loader makes it for `cfg`'s family (`default_workload(cfg,
    seq_len)` unless a `families.workloads.Workload` is given); the step runs it at out_len =
    seq_len."""
    return batch_and_sizes(cfg, global_batch, seq_len, workload)[0]


def batch_and_sizes(cfg, global_batch: int, seq_len: int, workload=None):
    """(abstract batch, out_len, sizes) of the training workload (see `batch_shapes`)."""
    from vrefer_jax.families.workloads import synthetic_batch

    wl = workload or default_workload(cfg, seq_len)
    batch, out_len, sizes = synthetic_batch(cfg, global_batch, wl, abstract=True)
    if out_len != seq_len:
        raise ValueError(f"the workload's static length {out_len} != seq_len {seq_len}")
    return batch, out_len, sizes


def trainable_groups(cfg, trainable) -> tuple[list[str], list[str]]:
    """(trained, frozen) parameter groups of `cfg`'s family (`Family.param_groups`) for the stage's
    trainable top-level names; a name that is no parameter of the family raises ValueError."""
    from vrefer_jax import families

    fam = families.for_config(cfg)
    known = {n for names in fam.param_groups.values() for n in names}
    unknown = sorted(set(trainable) - known)
    if unknown:
        raise ValueError(f"trainable {unknown} are not parameters of model family {fam.name} "
                         f"(its groups: {dict(fam.param_groups)}); use a stage of this family")
    trained = [g for g, names in fam.param_groups.items() if set(names) & set(trainable)]
    return trained, [g for g in fam.param_groups if g not in trained]


def _count(tree) -> int:
    import jax
    import numpy as np

    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(tree)))


def state_bytes(abstract_state) -> dict[str, int]:
    """Sums over the state's leaves, global and per device (from the shardings)."""
    import jax

    out = {}
    for name, tree in (("params", abstract_state.params), ("opt_state", abstract_state.opt_state)):
        leaves = jax.tree.leaves(tree)
        out[f"{name}_global"] = sum(nbytes(x) for x in leaves)
        out[f"{name}_per_device"] = sum(shard_bytes(x) for x in leaves)
    return out


def analytic_memory(cfg, abstract_state, trainable, batch, n_batch_shards: int, num_devices: int,
                    micro_batch: int, seq_len: int) -> dict[str, Any]:
    """Analytic per-device breakdown (bytes).

    Exact (from parameter counts and the state's shardings): fp32 master parameters, AdamW mu/nu of
    the trainable groups (frozen groups keep no optimizer state), the fp32 gradient accumulator,
    the batch. Estimates: bf16 compute copies of the (sharded) parameters, and activations with
    full remat (each scanned layer's input saved, one layer recomputed, one logits chunk), plus the
    family's encoders (`_encoder_activations`).
    """
    import jax
    import numpy as np

    from vrefer_jax.training.optimizer import trainable_mask

    p = abstract_state.params
    n_total = _count(p)
    leaves, mask = jax.tree.leaves(p), jax.tree.leaves(trainable_mask(p, trainable))
    train_leaves = [x for x, m in zip(leaves, mask) if m]  # whole groups, or a LoRA part's adapters
    n_train = sum(int(np.prod(x.shape, dtype=np.int64)) for x in train_leaves)
    w = np.dtype(cfg.param_dtype).itemsize
    c = np.dtype(cfg.dtype).itemsize
    per_dev = lambda tree: sum(shard_bytes(x) for x in jax.tree.leaves(tree))  # noqa: E731
    moments = [x for x in jax.tree.leaves(abstract_state.opt_state) if x.ndim > 0]
    scalars = [x for x in jax.tree.leaves(abstract_state.opt_state) if x.ndim == 0]
    # what the compute-dtype casts of the stored parameters take (int8 LoRA bases are cast too)
    copies = sum(shard_bytes(x) // x.dtype.itemsize * c for x in leaves if x.dtype.itemsize != c)
    t = cfg.text
    tok = micro_batch * seq_len
    # Full remat: the decoder scan keeps each layer's input [mb, L, E] in the compute dtype; the
    # backward pass recomputes one layer (q, k, v, attention out, gate/up/act, a few [mb, L, E]).
    saved = t.num_hidden_layers * tok * t.hidden_size * c
    layer = tok * c * (6 * t.hidden_size + 3 * t.intermediate_size
                       + 2 * t.num_key_value_heads * t.head_dim) * 2  # forward + its gradients
    chunk = micro_batch * min(seq_len, 512) * t.vocab_size * 4 * 3  # fp32 logits, softmax, grad
    # The XLA attention path materialises the scores of one layer: fp32 logits and probabilities in
    # the compute dtype per head ([H / tensor, L, L] per row), again for their gradients in the
    # recomputed layer, plus the boolean [L, L] mask.
    tp = max(1, num_devices // n_batch_shards)
    heads = -(-t.num_attention_heads // tp)
    attn = micro_batch * seq_len * seq_len * (heads * (4 + c) * 2 + 1)
    vision, conn, vision_note = _encoder_activations(cfg, batch, trainable, micro_batch, c, tp)
    # FSDP working set: one gathered decoder layer in the compute dtype plus its fp32 gradient before
    # the reduce-scatter; the LM head and the embedding table likewise (vocab-sized, unsharded).
    layer_params = _count(p["llm"]["layers"]) // t.num_hidden_layers
    gathered = layer_params * (c + 4) + t.vocab_size * t.hidden_size * (c + 4 + 4)
    out = dict(
        params_total=n_total, params_trainable=n_train,
        master_params_global=sum(nbytes(x) for x in leaves), master_params=per_dev(p),
        adam_moments_global=2 * n_train * w, adam_moments=sum(shard_bytes(x) for x in moments),
        opt_scalars=sum(shard_bytes(x) for x in scalars),
        grad_accumulator=sum(shard_bytes(x) for x in train_leaves),
        compute_copies=copies,
        batch=sum(nbytes(x) for x in batch.values()) // n_batch_shards,
        activations_estimate=int(saved + layer + attn + chunk + vision + conn), connector_activations=int(conn),
        decoder_attention=int(attn), vision_activations=int(vision), vision_note=vision_note,
        fsdp_working_set=int(gathered),
        ideal_master_params=sum(nbytes(x) for x in leaves) / num_devices,
    )
    out["total_estimate"] = sum(out[k] for k in ("master_params", "adam_moments", "opt_scalars", "grad_accumulator",
                                                 "compute_copies", "batch", "activations_estimate",
                                                 "fsdp_working_set"))
    return out


def _encoder_activations(cfg, batch, trainable, micro_batch: int, c: int, tp: int = 1) -> tuple[float, float, str]:
    """(vision tower bytes, connector / projector bytes, a note) of one micro-batch per device.

    VideoRefer-7B: the SigLIP tower's saved layer inputs over the frames and region frames (as if
    kept; it is frozen), and the STC connector (trained, not rematerialised). VRVL3: the NaViT
    encoder over the row's N packed patches: the saved layer inputs when it trains, one layer's
    working set (q, k, v, out, the MLP, and the attention scores: fp32 logits + probabilities + the
    boolean mask, [H, N, N] per row, or [N/P, H, P, P] with block attention of P patches; heads
    split over `tp` tensor devices), its output; the projector over the V visual tokens (trained,
    not rematerialised)."""
    t, v = cfg.text, cfg.vision
    if hasattr(v, "num_layers_run"):  # VideoRefer-7B
        frames = micro_batch * (cfg.num_frames + batch["region_frames"].shape[1])
        vision = v.num_layers_run * frames * v.num_patches * v.hidden_size * c  # vision tower, no grads
        # The STC connector is trained and not rematerialised: its RegStage keeps ~10 tensors per block
        # of [T, g, g, E] (stage 1) and [T/2, g/2, g/2, E] (stage 2, after the 2x2x2 Conv3d).
        g = v.grid
        conn = micro_batch * cfg.num_frames * g * g * t.hidden_size * c * 10 * cfg.connector.depth * (1 + 1 / 8)
        return vision, conn, "SigLIP layer inputs"
    N, V = batch["patches"].shape[1], batch["visual_patches"].shape[1]
    P = cfg.vision_attention_chunk or N
    trained = "vision_encoder" in trainable and cfg.train_vision_tower
    rows = micro_batch * N
    saved = v.num_hidden_layers * rows * v.hidden_size * c if trained else 0
    heads = -(-v.num_attention_heads // tp)
    scores = micro_batch * heads * N * P * (4 + c) + micro_batch * N * P  # logits, probs, mask
    one = rows * c * (5 * v.hidden_size + 2 * v.intermediate_size) + scores
    vision = saved + one * (2 if trained else 1) + rows * v.hidden_size * c  # + the encoder output
    conn = micro_batch * V * c * (v.hidden_size + 3 * t.hidden_size) * 2  # merged in, fc1, GELU, fc2; grads
    note = (f"NaViT over N = {N} patches{', trained' if trained else ', frozen: forward only'}; attention "
            + (f"in blocks of {P}" if cfg.vision_attention_chunk else "dense [H, N, N]")
            + f" (scores {scores / GIB:.2f} GiB)")
    return vision, conn, note


def vision_layers(cfg) -> int:
    """Vision layers the model runs (VideoRefer: up to the selected layer; VRVL3: all)."""
    v = cfg.vision
    return v.num_layers_run if hasattr(v, "num_layers_run") else v.num_hidden_layers


def with_depth(cfg, decoder_layers: int, vision_layers: int):
    """`cfg` with `decoder_layers` Qwen2 layers and `vision_layers` vision layers actually run."""
    v = cfg.vision
    if hasattr(v, "num_layers_run"):  # SigLIP: layers after the selected one are never run
        extra = v.num_hidden_layers - v.num_layers_run
        vision = dataclasses.replace(v, num_hidden_layers=vision_layers + extra)
    else:
        vision = dataclasses.replace(v, num_hidden_layers=vision_layers)
    return cfg.replace(text=dataclasses.replace(cfg.text, num_hidden_layers=decoder_layers), vision=vision)


def compile_step(cfg, devices, mesh_cfg, trainable, global_batch: int, seq_len: int, accum_steps: int,
                 logits_chunk: int = 512, rules=None, workload=None):
    """Lower and compile the train step with abstract inputs. Returns (compiled, abstract_state,
    batch, mesh, timings)."""
    from vrefer_jax.sharding import logical_axis_rules, make_mesh
    from vrefer_jax.training import train_state
    from vrefer_jax.training.optimizer import OptimizerConfig, make_optimizer
    from vrefer_jax.training.step import StepConfig, make_train_step

    rules = rules or logical_axis_rules()
    mesh = make_mesh(mesh_cfg, devices)
    tx, schedule = make_optimizer(OptimizerConfig(trainable=tuple(trainable)), total_steps=1000)
    shardings = train_state.state_shardings(cfg, tx, mesh, rules)
    state = train_state.abstract_unboxed(cfg, tx, shardings)
    batch = batch_shapes(cfg, global_batch, seq_len, workload)
    step_cfg = StepConfig(out_len=seq_len, accum_steps=accum_steps, logits_chunk=logits_chunk)
    run = make_train_step(cfg, step_cfg, tx, schedule, tuple(trainable), mesh, rules, shardings,
                          {k: v.ndim for k, v in batch.items()})
    t0 = time.perf_counter()
    lowered = run.lower(state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return compiled, state, batch, mesh, dict(lower_s=t1 - t0, compile_s=t2 - t1)


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def check(cfg, target: Target, *, global_batch: int, seq_len: int, stage: str | None = None, micro_batch: int = 1,
          mesh: str | None = None, depth: tuple[int, int] | None = None, try_tpu: bool = True,
          logits_chunk: int = 512, workload=None, log=print) -> dict[str, Any]:
    """Compile for `target` and return the report dict (all byte figures per device).

    stage: a stage name or gin file (default: the family's, `DEFAULT_STAGE`). workload: a
    `families.workloads.Workload` (default: `default_workload(cfg, seq_len)`)."""
    from vrefer_jax import families

    family = families.for_config(cfg).name
    stage = stage or DEFAULT_STAGE[family]
    trainable = stage_trainable(stage)
    if (lora_cfg := stage_lora(stage)) is not None:  # a LoRA stage: the model gets its adapters
        cfg = cfg.replace(text=dataclasses.replace(cfg.text, lora=lora_cfg))
    trained, frozen = trainable_groups(cfg, trainable)
    workload = workload or default_workload(cfg, seq_len)
    devices, how = target_devices(target, try_tpu)
    mesh_cfg = parse_mesh(mesh, len(devices))
    d, f, t = mesh_cfg.resolve(len(devices))
    shards = d * f
    if global_batch % shards:
        raise ValueError(f"global batch {global_batch} not divisible by data x fsdp = {shards}")
    per_device = global_batch // shards
    if per_device % micro_batch:
        raise ValueError(f"per-device batch {per_device} not divisible by micro_batch {micro_batch}")
    accum = per_device // micro_batch
    full_cfg = cfg
    log(f"target {target.name}: {target.num_devices} devices, {target.hbm_gib:.0f} GiB HBM each; compiling on {how}")
    log(f"mesh data={d} fsdp={f} tensor={t}; global batch {global_batch} = {shards} shards x {per_device}"
        f" = accum_steps {accum} x micro-batch {micro_batch}/device; seq {seq_len}; {stage} trains {trainable}")
    _, _, sizes = batch_and_sizes(full_cfg, 1, seq_len, workload)
    log(f"{family} rows: {sizes}")

    lora = cfg.text.lora
    report: dict[str, Any] = dict(target=target.name, how=how, mesh=(d, f, t), accum_steps=accum,
                                  lora=(f"LoRA rank {lora.rank} on {', '.join(lora.targets)}, base kernels stored "
                                        f"{lora.base_dtype}; LLM base and LM head frozen" if lora.enabled else None),
                                  micro_batch=micro_batch, stage=stage, hbm_gib=target.hbm_gib, family=family,
                                  trained_groups=trained, frozen_groups=frozen, sizes=sizes)
    if depth is None:
        compiled, state, batch, _, times = compile_step(full_cfg, devices, mesh_cfg, trainable, global_batch,
                                                        seq_len, accum, logits_chunk, workload=workload)
        report["compiled"] = compiled_memory(compiled)
        report["times"] = times
        report["scaled_from"] = None
    else:
        D, V = depth
        figs, times = {}, {}
        for dd, vv in ((D, V), (D - 1, V), (D, V - 1)):
            log(f"  compiling with {dd} decoder / {vv} vision layers ...")
            c, state_small, _, _, tm = compile_step(with_depth(full_cfg, dd, vv), devices, mesh_cfg, trainable,
                                                    global_batch, seq_len, accum, logits_chunk, workload=workload)
            figs[(dd, vv)] = compiled_memory(c)
            times[f"{dd}x{vv}"] = tm
            log(f"    lower {tm['lower_s']:.1f} s, compile {tm['compile_s']:.1f} s")
        FD, FV = full_cfg.text.num_hidden_layers, vision_layers(full_cfg)
        scaled = {}
        for k in figs[(D, V)]:
            per_dec = figs[(D, V)][k] - figs[(D - 1, V)][k]
            per_vis = figs[(D, V)][k] - figs[(D, V - 1)][k]
            scaled[k] = int(figs[(D, V)][k] + (FD - D) * per_dec + (FV - V) * per_vis)
        report["compiled"] = scaled
        report["compiled_at_depth"] = {f"{a}x{b}": v for (a, b), v in figs.items()}
        report["times"] = times
        report["scaled_from"] = (D, V)
        from vrefer_jax.training import train_state
        from vrefer_jax.sharding import make_mesh
        from vrefer_jax.training.optimizer import OptimizerConfig, make_optimizer
        from vrefer_jax.sharding import logical_axis_rules

        mesh_obj = make_mesh(mesh_cfg, devices)
        tx, _ = make_optimizer(OptimizerConfig(trainable=tuple(trainable)), total_steps=1000)
        state = train_state.abstract_unboxed(full_cfg, tx, train_state.state_shardings(
            full_cfg, tx, mesh_obj, logical_axis_rules()))
        batch = batch_shapes(full_cfg, global_batch, seq_len, workload)
    report["analytic"] = analytic_memory(full_cfg, state, trainable, batch, shards, len(devices), micro_batch, seq_len)
    report["state_bytes"] = state_bytes(state)
    report["host_peak_rss"] = _peak_rss()
    return report


def format_report(r: dict[str, Any]) -> str:
    g = lambda b: f"{b / GIB:8.2f} GiB" if abs(b) >= GIB / 4 else f"{b / 2**20:8.2f} MiB"  # noqa: E731
    a, c = r["analytic"], r["compiled"]
    hbm = r["hbm_gib"]
    lines = [f"== {r['target']} | mesh (data, fsdp, tensor) = {r['mesh']} | {r['stage']} | "
             f"accum {r['accum_steps']} x micro-batch {r['micro_batch']}/device",
             f"compiled on: {r['how']}",
             f"family {r.get('family', '?')}: trains {r.get('trained_groups')}, frozen {r.get('frozen_groups')}",
             f"rows: {_sizes_line(r['sizes'])}" if r.get("sizes") else "",
             f"parameters: {a['params_total']:,} total, {a['params_trainable']:,} trainable"
             + (f" ({r['lora']})" if r.get("lora") else ""),
             "analytic, per device:",
             f"  fp32 master params    {g(a['master_params'])}   (global {g(a['master_params_global'])};"
             f" ideal 1/N split {g(a['ideal_master_params'])})",
             f"  AdamW mu+nu (trainable){g(a['adam_moments'])}   (global {g(a['adam_moments_global'])})",
             f"  fp32 grad accumulator {g(a['grad_accumulator'])}",
             f"  bf16 compute copies   {g(a['compute_copies'])}   (if XLA casts all sharded params at once)",
             f"  batch shard           {g(a['batch'])}",
             f"  activations (est.)    {g(a['activations_estimate'])}   (full remat: saved layer inputs + one layer"
             f" + one logits chunk; decoder attention scores of one layer: {g(a['decoder_attention'])};"
             f" connector, not remat'd: {g(a['connector_activations'])}; vision:"
             f" {g(a['vision_activations'])}, {a['vision_note']})",
             f"  FSDP working set (est.){g(a['fsdp_working_set'])}   (one gathered layer + LM head/embedding"
             " gathered and their unsharded fp32 grads)",
             f"  total (est.)          {g(a['total_estimate'])}",
             "compiled (memory_analysis), per device"
             + (f", extrapolated per layer from depth {r['scaled_from'][0]} decoder / {r['scaled_from'][1]} vision:"
                if r["scaled_from"] else ":"),
             f"  arguments (state+batch){g(c['arguments'])}",
             f"  outputs               {g(c['outputs'])}   (aliased with donated arguments: {g(c['aliased'])})",
             f"  temporaries           {g(c['temporaries'])}",
             f"  total                 {g(c['total'])}" + (f"   vs HBM {hbm:.0f} GiB: "
                                                         f"{'fits' if c['total'] < 0.9 * hbm * GIB else 'DOES NOT FIT'}"
                                                         f" ({c['total'] / (hbm * GIB):.0%})" if hbm == hbm else "")]
    if r["scaled_from"]:
        D, V = r["scaled_from"]
        at = r["compiled_at_depth"]
        full, dec, vis = at[f"{D}x{V}"], at[f"{D - 1}x{V}"], at[f"{D}x{V - 1}"]
        lines.append(f"  at depth {D}/{V}: total {g(full['total'])} (temporaries {g(full['temporaries'])}); per decoder "
                     f"layer {g(full['total'] - dec['total'])}, per vision layer {g(full['total'] - vis['total'])}")
    lines = [x for x in lines if x]
    if "CPU" in r["how"]:
        lines.append("  NOTE: compiled by the CPU backend with the target's mesh: sharding is the target's, but "
                     "buffer assignment / fusion / bf16 handling are the CPU compiler's, so these figures "
                     "approximate the TPU/GPU compile (typically within tens of percent).")
    times = r["times"]
    ts = ([times] if "compile_s" in times else list(times.values()))
    lines.append(f"compile time {sum(t['compile_s'] for t in ts):.1f} s (lowering {sum(t['lower_s'] for t in ts):.1f} s);"
                 f" host peak RSS {r['host_peak_rss'] / GIB:.1f} GiB")
    return "\n".join(lines)


def _sizes_line(s: dict[str, Any]) -> str:
    if s["family"] == "videorefer":
        return (f"L {s['L']} ids (out_len {s['out_len']}), {s['frames']} frames -> {s['video_tokens']} video tokens, "
                f"{s['objects']} objects x {s['object_frames']} frames")
    return (f"L {s['L']} = {s['visual_tokens']} visual + {s['L'] - s['visual_tokens'] - s['text']} region + "
            f"{s['text']} text rows; {s['frames']} frames of {s['frame_grid'][0]}x{s['frame_grid'][1]} patches "
            f"({s['tokens_per_frame']} tokens each); N {s['patches']} patches ({s['frame_patches']} of frames, "
            f"{s['regions']} crops of {s['crop_grid'][0]}x{s['crop_grid'][1]})"
            + (f"; vision attention in blocks of {s['chunk']}" if s["chunk"] else "; dense vision attention"))


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model gin file, e.g. configs/models/videorefer_7b.gin")
    ap.add_argument("--gin_bindings", nargs="*", default=[])
    ap.add_argument("--target", required=True, help="v5p-64, v5e-16, v4-32, 8xH100, ...")
    ap.add_argument("--global_batch", type=int, default=128)
    ap.add_argument("--seq_len", type=int, default=2048, help="static spliced length (out_len)")
    ap.add_argument("--stage", default=None,
                    help=f"stage gin: one of {available_stages()} (configs/stages) or a gin file path; default "
                         f"the family's ({DEFAULT_STAGE})")
    ap.add_argument("--micro_batch", type=int, default=1, help="samples per device per accumulation step")
    ap.add_argument("--mesh", default=None, help="data,fsdp,tensor (one may be -1); default all on fsdp")
    ap.add_argument("--remat", default="full", choices=["none", "full", "dots"])
    ap.add_argument("--logits_chunk", type=int, default=512)
    ap.add_argument("--depth", default=None, help="D,V: compile with D decoder / V vision layers and extrapolate")
    ap.add_argument("--no_tpu", action="store_true", help="skip the libtpu topology attempt")
    ap.add_argument("--frames", type=int, default=None, help="video frames per row (VRVL3 default 180)")
    ap.add_argument("--frame_hw", type=int, nargs=2, default=None, help="VRVL3 source frame size h w (250 450)")
    ap.add_argument("--regions", type=int, default=None, help="objects (VideoRefer, 4) / region crops (VRVL3, 4)")
    ap.add_argument("--region_cells", type=int, default=None, help="VRVL3 mask cells per region (30)")
    args = ap.parse_args(argv)

    target = parse_target(args.target)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    ensure_host_devices(target.num_devices, argv)

    from vrefer_jax import families

    cfg = families.config_from_gin([args.model], args.gin_bindings).replace(remat_policy=args.remat)
    depth = tuple(int(x) for x in args.depth.split(",")) if args.depth else None
    workload = default_workload(cfg, args.seq_len, frames=args.frames, regions=args.regions,
                                region_cells=args.region_cells,
                                frame_hw=tuple(args.frame_hw) if args.frame_hw else None)
    r = check(cfg, target, global_batch=args.global_batch, seq_len=args.seq_len, stage=args.stage,
              micro_batch=args.micro_batch, mesh=args.mesh, depth=depth, try_tpu=not args.no_tpu,
              logits_chunk=args.logits_chunk, workload=workload)
    print(format_report(r))


if __name__ == "__main__":
    main()
