"""Padded vs packed training throughput on a length mix shaped like VideoRefer-700K.

    python benchmarks/packing.py                        # small config, fp32, one CPU device
    python benchmarks/packing.py --model tiny --iters 3 --attention xla_blockwise

The mix (sample counts as VideoRefer-700K's subsets: 500K short captions, 75K QA, 125K detailed
captions; text tokens before the splice, uniform in the range; one video and 1-2 objects each):

  short caption / short QA   71 %   40 - 100 text tokens
  multi-round QA             11 %  150 - 400
  detailed caption           18 %  200 - 450

Both runs use the same static row (out_len = the longest sample's worst-case expanded length,
rounded up to 64) and batch B, so each step has the same shape and cost; what differs is how many
real tokens a step holds. Padded: one sample per row (the loader without `pack`). Packed: the
loader's first-fit-decreasing packing (`data_pipeline.packing.first_fit_decreasing` over windows of
`--window` samples, `vrefer_jax.batch.pack_examples`) with P video slots per row; every slot's
frames go through the tower, so packing pays for more frames per row. Figures:

  rows        rows the sample set needs        fill   real / row length (expanded tokens)
  step ms     median step time (forward, backward, AdamW; state donated)
  tokens/s    real (non-padding) expanded tokens per second over the timed steps
  samples/s   samples per second
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import statistics
import sys
import time

import jax
import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from data_pipeline.packing import first_fit_decreasing  # noqa: E402
from vrefer_jax import batch as batch_lib  # noqa: E402
from vrefer_jax.config import IGNORE_INDEX, VIDEO_TOKEN_INDEX, model_config_from_gin  # noqa: E402
from vrefer_jax.sharding import MeshConfig, logical_axis_rules, make_mesh  # noqa: E402
from vrefer_jax.training import train_state  # noqa: E402
from vrefer_jax.training.optimizer import OptimizerConfig, make_optimizer  # noqa: E402
from vrefer_jax.training.stages import stage_trainable  # noqa: E402
from vrefer_jax.training.step import StepConfig, batch_sharding, make_train_step  # noqa: E402

CONFIGS = HERE.parent / "configs" / "models"
MIX = (("short", 0.71, (40, 100)), ("multi-round QA", 0.11, (150, 400)), ("detailed caption", 0.18, (200, 450)))


def make_samples(cfg, n: int, seed: int = 0) -> list[batch_lib.Example]:
    """`n` samples of the mix: random ids around one <video> and 1-2 <region>s, the second half of
    each supervised, random frames and 2x2-cell masks on 1-2 annotated frames."""
    rng = np.random.default_rng(seed)
    T, S, g = cfg.num_frames, cfg.vision.image_size, cfg.vision.grid
    kinds = rng.choice(len(MIX), size=n, p=[m[1] for m in MIX])
    out = []
    for i, kind in enumerate(kinds):
        lo, hi = MIX[kind][2]
        L = int(rng.integers(lo, hi + 1))
        K = int(rng.integers(1, 3))
        ids = rng.integers(1, cfg.text.vocab_size - 1, size=L).astype(np.int32)
        ids[1] = VIDEO_TOKEN_INDEX
        ids[3:3 + K] = cfg.region_token_id
        labels = ids.copy()
        labels[: L // 2] = IGNORE_INDEX
        F = int(rng.integers(1, 3))
        frames, masks = [], []
        for _ in range(K):
            frames.append(list(range(F)))
            m = np.zeros((F, g, g), bool)
            y, x = rng.integers(0, g - 1, size=2)
            m[:, y:y + 2, x:x + 2] = True
            masks.append(m)
        out.append(batch_lib.Example(
            f"{MIX[kind][0]}-{i}", ids.tolist(), rng.standard_normal((T, S, S, 3)).astype(np.float32),
            rng.standard_normal((F, S, S, 3)).astype(np.float32), frames, masks, labels.tolist()))
    return out


def worst_len(cfg, ex) -> int:
    return batch_lib.expanded_length(ex.input_ids, [len(f) for f in ex.object_frames],
                                     region_token_id=cfg.region_token_id,
                                     num_video_tokens=batch_lib.model_video_tokens(cfg),
                                     region_token_num=cfg.object_encoder.region_token_num)


def padded_rows(cfg, samples, L: int):
    return [batch_lib.pad_example(ex, seq_len=L, region_frames=2, objects=2, object_frames=2,
                                  mask_size=cfg.vision.grid, pad_token_id=0) for ex in samples]


def packed_rows(cfg, samples, L: int, out_len: int, P: int, window: int):
    F = K = 2 * P
    budget = dict(L=L, expanded=out_len, videos=P, F=F, K=K)
    rows = []
    for w in range(0, len(samples), window):
        chunk = samples[w:w + window]
        sizes = [dict(L=len(ex.input_ids), expanded=worst_len(cfg, ex), videos=1,
                      F=ex.region_frames.shape[0], K=len(ex.object_frames)) for ex in chunk]
        groups, _ = first_fit_decreasing(sizes, budget, "expanded")
        rows += [batch_lib.pack_examples([chunk[i] for i in sorted(g)], seq_len=L, videos=P, region_frames=F,
                                         objects=K, object_frames=2, mask_size=cfg.vision.grid, pad_token_id=0)
                 for g in groups]
    return rows


def time_rows(cfg, rows, *, B: int, out_len: int, iters: int, stage: str) -> dict:
    """Train on batches of B rows (cycling); median step time and real tokens/s over `iters` steps."""
    batches = []
    for i in range(0, len(rows) - B + 1, B):
        b = batch_lib.stack(rows[i:i + B])
        b.pop("sample_ids")
        batches.append(b)
    trainable = stage_trainable(stage)
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), jax.devices()[:1])
    rules = logical_axis_rules()
    tx, schedule = make_optimizer(OptimizerConfig(trainable=trainable), total_steps=1000)
    shardings = train_state.state_shardings(cfg, tx, mesh, rules)
    state = train_state.create_state(cfg, tx, shardings, seed=0)
    step = make_train_step(cfg, StepConfig(out_len=out_len, logits_chunk=0), tx, schedule, trainable, mesh, rules,
                           shardings, {k: v.ndim for k, v in batches[0].items()})
    put = lambda b: {k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in b.items()}  # noqa: E731
    t0 = time.perf_counter()
    state, m = step(state, put(batches[0]))  # compile + warm-up
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - t0
    times, tokens = [], 0
    for i in range(iters):
        b = put(batches[(i + 1) % len(batches)])
        t0 = time.perf_counter()
        state, m = step(state, b)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t0)
        tokens += int(m["tokens"])
    return dict(compile_s=compile_s, step_ms=1e3 * statistics.median(times), tokens_per_s=tokens / sum(times),
                loss=float(m["loss"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", help="a name in configs/models")
    ap.add_argument("--samples", type=int, default=192)
    ap.add_argument("--batch", type=int, default=4, help="rows per step")
    ap.add_argument("--videos", type=int, default=4, help="P: video slots per packed row")
    ap.add_argument("--window", type=int, default=64, help="packing window (samples)")
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--attention", default="dense", help="TextConfig.attention_impl")
    ap.add_argument("--stage", default="stage3")
    args = ap.parse_args()

    cfg = model_config_from_gin([str(CONFIGS / f"{args.model}.gin")])
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, attention_impl=args.attention, attention_block=256))
    samples = make_samples(cfg, args.samples)
    worst = [worst_len(cfg, ex) for ex in samples]
    out_len = -(-max(worst) // 64) * 64
    L = max(len(ex.input_ids) for ex in samples)
    counts = {m[0]: sum(ex.sample_id.startswith(m[0]) for ex in samples) for m in MIX}
    print(f"model {args.model} ({jax.devices()[0].device_kind}), fp32, attention {args.attention}; "
          f"{args.samples} samples {counts}; expanded length mean {np.mean(worst):.0f}, max {max(worst)}; "
          f"row {out_len} tokens, B {args.batch}")
    layouts = [("padded", padded_rows(cfg, samples, L)),
               (f"packed P={args.videos}", packed_rows(cfg, samples, out_len, out_len, args.videos, args.window))]
    header = f"{'layout':14} {'rows':>5} {'fill':>6} | {'compile s':>9} {'step ms':>8} {'tokens/s':>9} {'samples/s':>9}"
    print(header)
    print("-" * len(header))
    results = {}
    for name, rows in layouts:
        fill = sum(worst) / (len(rows) * out_len)
        r = time_rows(cfg, rows, B=args.batch, out_len=out_len, iters=args.iters, stage=args.stage)
        samples_per_s = r["tokens_per_s"] / (sum(worst) / len(samples))
        results[name] = r
        print(f"{name:14} {len(rows):>5} {fill:>6.1%} | {r['compile_s']:>9.1f} {r['step_ms']:>8.0f} "
              f"{r['tokens_per_s']:>9.0f} {samples_per_s:>9.2f}", flush=True)
    a, b = results.values()
    print(f"packed / padded tokens/s: {b['tokens_per_s'] / a['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
