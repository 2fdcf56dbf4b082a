"""Padded vs packed (per-row video slots) vs packed (per-batch video pool) training throughput on
a length mix shaped like VideoRefer-700K.

    python benchmarks/packing.py                        # small config, fp32, one CPU device
    python benchmarks/packing.py --model tiny --iters 3 --attention xla_blockwise

The mix (sample counts as VideoRefer-700K's subsets: 500K short captions, 75K QA, 125K detailed
captions; text tokens before the splice, uniform in the range; one video and 1-2 objects each with
1-2 annotated frames):

  short caption / short QA   71 %   40 - 100 text tokens
  multi-round QA             11 %  150 - 400
  detailed caption           18 %  200 - 450

Every layout uses the same static row (out_len = the longest sample's worst-case expanded length,
rounded up to 64) and batch B, so the decoder's cost per step is the same; what differs is how many
real tokens a step holds and how many frames go through the vision tower and the connector (which
run on every video slot or pool entry, empty or not):

  padded      one sample per row (the loader without `pack`): B videos, 2 region frames per row
  slots P=4   first-fit-decreasing packing (`data_pipeline.packing.first_fit_decreasing` over
              windows of `--window` samples, `vrefer_jax.packed_batch.pack_examples`) with P video slots
              per row: B * P videos per step
  pool V=v    the same packing with a video pool of v entries per group of `--pool-rows` rows
              (a group budget of the packer, `vrefer_jax.packed_batch.pack_batch`): B / pool_rows * v
              videos per step

Packed layouts hold `--row-region-frames` region frames per row (a row budget too). Figures:

  rows        rows the sample set needs        fill   real / row length (expanded tokens)
  videos      video entries per step (slots or pool) and the share of them holding a video
  enc ms      median time of the tower + connector alone on a step's frames (forward)
  step ms     median step time (forward, backward, AdamW; state donated); the layouts are compiled
              first, then timed round-robin (step i of every layout, then step i+1), so a shared
              machine's load hits them alike
  tokens/s    real (non-padding) expanded tokens of the layout's whole epoch / (its steps x step ms):
              a step's time does not depend on its content (static shapes), while the few timed
              batches are not a fair sample of the content (the device's count on them is checked
              against the host's)
  samples/s   samples per second, the same way
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib
import statistics
import sys
import time

import flax.linen as nn
import grain
import jax
import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from forward import add_host_memory_flag, timeit  # noqa: E402

from data_pipeline.packing import PACK_KEY, PackedBatches  # noqa: E402
from vrefer_jax import batch as batch_lib  # noqa: E402
from vrefer_jax import host_memory  # noqa: E402
from vrefer_jax import packed_batch  # noqa: E402
from vrefer_jax.config import IGNORE_INDEX, VIDEO_TOKEN_INDEX, model_config_from_gin  # noqa: E402
from vrefer_jax.models.videorefer import VideoRefer  # noqa: E402
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


def _packed(cfg, samples, out_len: int, window: int, B: int, budget: dict, **kw):
    """The loader's packer (`data_pipeline.packing.PackedBatches`: first-fit decreasing per window,
    topped up to whole batches) over the samples -> (real rows, batches of B rows)."""
    items = [{PACK_KEY: dict(L=len(ex.input_ids), expanded=worst_len(cfg, ex), videos=1,
                             F=ex.region_frames.shape[0], K=len(ex.object_frames)), "_item": ex} for ex in samples]
    ds = PackedBatches(grain.MapDataset.source(items).to_iter_dataset(), batch_size=B, window=window, budget=budget,
                       key="expanded", caps=(), seed=0, drop_remainder=False, **kw)
    batches = list(ds)
    n_rows = sum(int((b["segment_ids"].max(axis=1) > 0).sum()) for b in batches)
    return n_rows, [b for b in batches if b["input_ids"].shape[0] == B]


def slot_batches(cfg, samples, out_len: int, P: int, F: int, window: int, B: int):
    budget = dict(L=out_len, expanded=out_len, videos=P, F=F, K=F)
    row = functools.partial(packed_batch.pack_examples, seq_len=out_len, videos=P, region_frames=F, objects=F,
                            object_frames=2, mask_size=cfg.vision.grid, pad_token_id=0)
    n_rows, batches = _packed(cfg, samples, out_len, window, B, budget, build_row=row,
                              finish=lambda rows, counts: batch_lib.stack(rows))
    return n_rows, batches, (B * P,)


def pool_batches(cfg, samples, out_len: int, P: int, F: int, window: int, B: int, pool_rows: int, V: int):
    """Rows in groups of `pool_rows` sharing V videos (a group budget of the packer)."""
    budget = dict(L=out_len, expanded=out_len, videos=P, F=F, K=F)
    build = functools.partial(packed_batch.pack_batch, pool_rows=pool_rows, pool_videos=V, seq_len=out_len, videos=P,
                              region_frames=F, objects=F, object_frames=2, mask_size=cfg.vision.grid, pad_token_id=0)
    n_rows, batches = _packed(cfg, samples, out_len, window, B, budget, build_row=None, finish=None,
                              build_batch=lambda rows, counts: build(rows), group_rows=pool_rows,
                              group_budget=dict(videos=V))
    return n_rows, batches, (B // pool_rows * V,)


def padded_batches(cfg, samples, L: int, B: int):
    rows = padded_rows(cfg, samples, L)
    return len(rows), [batch_lib.stack(rows[i:i + B]) for i in range(0, len(rows) - B + 1, B)], (B,)


def encoder_ms(cfg, state, batch, iters: int) -> float:
    """Median forward time of the tower + connector on one batch's frames."""
    model = VideoRefer(cfg)

    def enc(params, frames, region_frames):
        def f(m):
            feats, _ = m.encode_visual(frames, region_frames)
            return m.encode_video(feats)
        return nn.apply(f, model)({"params": params})

    return 1e3 * timeit(jax.jit(enc), state.params, batch["frames"], batch["region_frames"], iters=iters)


class LayoutRunner:
    """One layout's train step, compiled and warmed up; `step(i)` trains on batch i (cycling) and
    returns (seconds, real tokens). Layouts are timed round-robin (`main`), so a change in the load of
    a shared machine hits every layout alike."""

    def __init__(self, cfg, batches, *, out_len: int, stage: str, enc_iters: int):
        self.batches = [{k: v for k, v in b.items() if k != "sample_ids"} for b in batches]
        self.sample_ids = [[s for row in b["sample_ids"] for s in str(row).split(packed_batch.PACK_SEPARATOR) if s]
                           for b in batches]
        trainable = stage_trainable(stage)
        mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), jax.devices()[:1])
        rules = logical_axis_rules()
        tx, schedule = make_optimizer(OptimizerConfig(trainable=trainable), total_steps=1000)
        shardings = train_state.state_shardings(cfg, tx, mesh, rules)
        self.state = train_state.create_state(cfg, tx, shardings, seed=0)
        self.enc_ms = encoder_ms(cfg, self.state, self.batches[0], enc_iters)
        self._step = make_train_step(cfg, StepConfig(out_len=out_len, logits_chunk=0), tx, schedule, trainable, mesh,
                                     rules, shardings, {k: v.ndim for k, v in self.batches[0].items()})
        self._put = lambda b: {k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in b.items()}  # noqa: E731
        t0 = time.perf_counter()
        self.state, _ = self._step(self.state, self._put(self.batches[0]))  # compile + warm-up
        jax.block_until_ready(self.state)
        self.compile_s = time.perf_counter() - t0
        self.times, self.timed = [], []

    def step(self, i: int) -> None:
        j = (i + 1) % len(self.batches)
        b = self._put(self.batches[j])
        t0 = time.perf_counter()
        self.state, m = self._step(self.state, b)
        jax.block_until_ready((self.state, m))
        self.times.append(time.perf_counter() - t0)
        self.timed.append((j, int(m["tokens"])))

    def result(self, tokens_of: dict[str, int]) -> dict:
        """tokens_of: a sample's expanded length. Per-step figures over the whole epoch."""
        per_batch = [sum(tokens_of[s] for s in ids) for ids in self.sample_ids]
        for j, seen in self.timed:
            if seen != per_batch[j]:
                raise AssertionError(f"batch {j}: the step counted {seen} tokens, the host {per_batch[j]}")
        step_s = statistics.median(self.times)
        return dict(compile_s=self.compile_s, step_ms=1e3 * step_s, enc_ms=self.enc_ms,
                    tokens_per_s=statistics.mean(per_batch) / step_s,
                    samples_per_s=statistics.mean(len(ids) for ids in self.sample_ids) / step_s)


def video_share(batches) -> float:
    """Share of the video entries (slots / pool entries) that hold a video."""
    used = total = 0
    for b in batches:
        if batch_lib.VIDEO_INDEX in b:
            used += int((b[batch_lib.VIDEO_INDEX] >= 0).sum())
            total += int(np.prod(b["frames"].shape[:2]))
        elif b["frames"].ndim == 6:
            ids = b["input_ids"]
            used += int((ids < -199).sum())  # <video> -201, <image> -200
            total += int(np.prod(b["frames"].shape[:2]))
        else:
            used += int((b["segment_ids"].max(axis=1) > 0).sum())
            total += b["frames"].shape[0]
    return used / total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", help="a name in configs/models")
    ap.add_argument("--samples", type=int, default=192)
    ap.add_argument("--batch", type=int, default=4, help="rows per step")
    ap.add_argument("--videos", type=int, default=4, help="P: video slots per packed row (the slot layout), "
                    "the cap of a row's videos (the pool layout)")
    ap.add_argument("--pool-rows", type=int, default=0, help="rows per video pool (0 = the batch)")
    ap.add_argument("--pool-videos", default="8,10", help="V: videos per pool, comma-separated values to compare")
    ap.add_argument("--row-region-frames", type=int, default=6, help="F: region frames (and objects) per packed row")
    ap.add_argument("--window", type=int, default=64, help="packing window (samples)")
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--attention", default="dense", help="TextConfig.attention_impl")
    ap.add_argument("--stage", default="stage3")
    add_host_memory_flag(ap)
    ap.add_argument("--layouts", default="padded,slots,pool", help="which layouts to run")
    args = ap.parse_args()
    reuse = host_memory.configure(args.host_memory)  # before the first computation

    cfg = model_config_from_gin([str(CONFIGS / f"{args.model}.gin")])
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, attention_impl=args.attention, attention_block=256))
    samples = make_samples(cfg, args.samples)
    worst = [worst_len(cfg, ex) for ex in samples]
    out_len = -(-max(worst) // 64) * 64
    L = max(len(ex.input_ids) for ex in samples)
    B, P, F = args.batch, args.videos, args.row_region_frames
    R = args.pool_rows or B
    counts = {m[0]: sum(ex.sample_id.startswith(m[0]) for ex in samples) for m in MIX}
    print(f"model {args.model} ({jax.devices()[0].device_kind}), fp32, attention {args.attention}; "
          f"{args.samples} samples {counts}; expanded length mean {np.mean(worst):.0f}, max {max(worst)}; "
          f"row {out_len} tokens, B {B}, {cfg.num_frames} frames per video; load {_loadavg()}; "
          f"host memory {'reused' if reuse else 'as is'}")
    want = args.layouts.split(",")
    layouts = []
    if "padded" in want:
        layouts.append(("padded", lambda: padded_batches(cfg, samples, L, B)))
    if "slots" in want:
        layouts.append((f"slots P={P}", lambda: slot_batches(cfg, samples, out_len, P, F, args.window, B)))
    if "pool" in want:
        for V in [int(v) for v in args.pool_videos.split(",")]:
            layouts.append((f"pool V={V}/{R}r", lambda V=V: pool_batches(cfg, samples, out_len, P, F, args.window, B,
                                                                          R, V)))
    header = (f"{'layout':14} {'rows':>5} {'fill':>6} {'videos':>11} | {'compile s':>9} {'enc ms':>7} "
              f"{'step ms':>8} {'tokens/s':>9} {'samples/s':>9}")
    print(header)
    print("-" * len(header))
    runners = {}
    for name, build in layouts:
        n_rows, batches, (n_videos,) = build()
        runners[name] = (n_rows, n_videos, video_share(batches),
                         LayoutRunner(cfg, batches, out_len=out_len, stage=args.stage, enc_iters=max(2, args.iters // 2)))
    for i in range(args.iters):  # round-robin: every layout sees the same load
        for *_, runner in runners.values():
            runner.step(i)
    results = {}
    tokens_of = {ex.sample_id: w for ex, w in zip(samples, worst)}
    for name, (n_rows, n_videos, share, runner) in runners.items():
        r = results[name] = runner.result(tokens_of)
        fill = sum(worst) / (n_rows * out_len)
        print(f"{name:14} {n_rows:>5} {fill:>6.1%} {n_videos:>4} {share:>6.0%} | "
              f"{r['compile_s']:>9.1f} {r['enc_ms']:>7.0f} {r['step_ms']:>8.0f} {r['tokens_per_s']:>9.0f} "
              f"{r['samples_per_s']:>9.2f}", flush=True)
    if "padded" in results:
        base = results["padded"]["tokens_per_s"]
        print("tokens/s vs padded: " + ", ".join(f"{k} {v['tokens_per_s'] / base:.2f}x"
                                                 for k, v in results.items() if k != "padded"))
    print(f"load average at the end: {_loadavg()}")


def _loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "n/a"


if __name__ == "__main__":
    main()
