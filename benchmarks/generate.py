"""Generation speed: prefill time and decode tokens/s of `generate_multimodal` (random weights), for
model configs of any family.

    python benchmarks/generate.py [--configs configs/models/small.gin configs/models/vl3_small.gin]
                                  [--batch 1 8] [--new-tokens 32] [--text 64] [--frames N]
                                  [--regions 2] [--region-cells 30] [--frame-hw 224 392] [--repeats 3]
                                  [--gin_bindings VL3Config.vision_attention_chunk=448]

The family of each config (`families.for_config`) decides the batch (`families.workloads`):
VideoRefer-7B gets one <video> of its `num_frames` frames, `--text` prompt ids and `--regions`
single-frame objects; VRVL3 gets `--frames` (16) video frames of `--frame-hw` pixels resized by the
processor rules (every merged token kept: no pruning), `--regions` crops of `--region-cells` mask
cells (k-means above 10) and `--text` text rows. `--gin_bindings` apply to every config of the run
(bind one family's class, e.g. VRVL3's block attention, in a run of that family's configs only).

Prefill = encoders + splice + one decoder pass over the prompt (`generate_multimodal` with
max_new_tokens=1). Decode tokens/s = B * (N - 1) / (time(N) - time(1)) of the generation loop
(`decode_loop`) started from the spliced embeddings, so the encoders' run-to-run noise (seconds for
VRVL3 on a CPU) does not swamp the difference; EOS disabled so every row runs all N steps. Times are
the best of `--repeats` runs after a warm-up compile, with `block_until_ready` (the minimum is robust
against other load on shared cores; a median is not).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vrefer_jax import families  # noqa: E402
from vrefer_jax.families.workloads import Workload, synthetic_batch  # noqa: E402
from vrefer_jax.inference import generate as gen_lib  # noqa: E402
from vrefer_jax.inference.generate import generate_multimodal  # noqa: E402
from vrefer_jax.inference.sampling import GenerationConfig  # noqa: E402


def random_params(cfg, seed=0):
    """Random weights from the parameter shapes of the config's family (cheaper than `init`)."""
    rng = np.random.default_rng(seed)
    paths, treedef = jax.tree_util.tree_flatten_with_path(families.for_config(cfg).abstract_params(cfg))
    leaves = [jnp.asarray((1.0 if "scale" in str(p[-1]) else 0.0) + 0.05 * rng.standard_normal(x.shape), x.dtype)
              for p, x in paths]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def make_batch(cfg, B: int, workload: Workload, seed=0):
    """(batch, out_len, sizes) of the config's family for `workload`, checked by the family's
    `validate` (labels dropped: generation does not read them)."""
    batch, out_len, sizes = synthetic_batch(cfg, B, workload, seed=seed)
    families.for_config(cfg).validate(cfg, batch, out_len)
    return batch, out_len, sizes


def decode_fn(cfg, params, batch, out_len: int):
    """gen -> the generation loop from the prompt's embeddings (encoders and splice run once, here)."""
    model, fns = gen_lib._model_fns(cfg)
    inputs = jax.jit(lambda p, b: model.apply({"params": p}, b, out_len, method=type(model).embed_inputs))(
        params, {k: batch[k] for k in gen_lib.input_keys(cfg)})
    loop = jax.jit(lambda p, x, gen: gen_lib.decode_loop(
        fns, p, x["inputs_embeds"], x["positions"], x["segment_ids"], x["lengths"], cfg.text, gen,
        jax.random.key(0), cfg.compute_dtype), static_argnums=2)
    return lambda gen: loop(params, inputs, gen.static)


def timed(fn, repeats: int) -> float:
    """Best wall time of `repeats` calls after a warm-up (compile) call."""
    jax.block_until_ready(fn())  # compile
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return min(ts)


def describe(sizes: dict) -> str:
    if sizes["family"] == "videorefer":
        return (f"{sizes['frames']} frames -> {sizes['video_tokens']} video tokens, {sizes['objects']} objects x "
                f"{sizes['object_frames']} frame(s), {sizes['L']} prompt ids")
    gh, gw = sizes["frame_grid"]
    ch, cw = sizes["crop_grid"]
    return (f"{sizes['frames']} frames of {gh}x{gw} patches ({sizes['tokens_per_frame']} tokens each, no pruning) "
            f"-> {sizes['visual_tokens']} visual rows; {sizes['regions']} regions of {sizes['cells']} cells "
            f"({ch}x{cw} crops); {sizes['text']} text rows; N = {sizes['patches']} patches"
            + (f", vision attention in blocks of {sizes['chunk']}" if sizes["chunk"] else ", dense vision attention"))


def main(argv=None) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=[os.path.join(root, "configs/models", f"{n}.gin")
                                                     for n in ("tiny", "small", "vl3_small")])
    ap.add_argument("--gin_bindings", nargs="*", default=[])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--text", type=int, default=64, help="text tokens of the prompt (besides video and regions)")
    ap.add_argument("--frames", type=int, default=None, help="video frames (VideoRefer: num_frames; VRVL3: 16)")
    ap.add_argument("--frame-hw", type=int, nargs=2, default=(224, 392), help="VRVL3 source frame size (h w)")
    ap.add_argument("--regions", type=int, default=2)
    ap.add_argument("--region-cells", type=int, default=30, help="VRVL3 mask cells per region")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    print(f"backend {jax.default_backend()}, devices {jax.device_count()} ({os.cpu_count()} host cores), "
          f"new tokens {a.new_tokens}")
    print(f"{'config':10s} {'family':22s} {'B':>3s} {'prompt':>7s} {'prefill ms':>11s} {'decode tok/s':>13s}"
          f" {'ms/step':>8s}")
    for path in a.configs:
        cfg = families.config_from_gin([path], a.gin_bindings)
        fam = families.for_config(cfg)
        params = random_params(cfg)
        name = os.path.splitext(os.path.basename(path))[0]
        workload = Workload(text_len=a.text, frames=a.frames, frame_hw=tuple(a.frame_hw), regions=a.regions,
                            region_cells=a.region_cells)
        for B in a.batch:
            batch, out_len, sizes = make_batch(cfg, B, workload)
            if B == a.batch[0]:
                print(f"  {name}: {describe(sizes)}", flush=True)
            gen = GenerationConfig(max_new_tokens=a.new_tokens, eos_token_ids=(), pad_token_id=0)
            one = gen.replace(max_new_tokens=1)
            prefill = timed(lambda: generate_multimodal(cfg, params, batch, out_len, one).tokens, a.repeats)
            decode = decode_fn(cfg, params, batch, out_len)
            t1 = timed(lambda: decode(one).tokens, a.repeats)
            tn = timed(lambda: decode(gen).tokens, a.repeats)
            step = (tn - t1) / (a.new_tokens - 1)
            print(f"{name:10s} {fam.name:22s} {B:3d} {out_len:7d} {1e3 * prefill:11.1f} {B / step:13.1f}"
                  f" {1e3 * step:8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
