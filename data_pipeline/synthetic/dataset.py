"""The whole synthetic dataset folder (see the package docstring) and its command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np

from data_pipeline.synthetic.render import make_video, write_media
from data_pipeline.synthetic.samples import eval_entries, train_samples
from data_pipeline.synthetic.scene import KIND_TYPES, QUESTION_TYPES, SPLITS, SynthConfig
from data_pipeline.synthetic.tokenizer import corpus_texts, train_tokenizer
from vrefer_jax.json_files import write_json


def generate(out_dir: str, *, seed: int = 0, train_videos: int = 256, eval_videos: int = 64,
             cfg: SynthConfig = SynthConfig(), vocab_size: int = 1024, tokenizer: bool = True) -> dict:
    """Write the whole dataset (see the module docstring); returns a summary with counts and timings."""
    t0 = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    train, bench_q, bench_d, tracks = [], [], [], {}
    for split, n in (("train", train_videos), ("eval", eval_videos)):
        for i in range(n):
            video = make_video(seed, split, i, cfg)
            rel = write_media(video, out_dir, split, cfg)
            tracks[video.vid] = {"video": rel, "objects": [t.to_json() for t in video.tracks]}
            qrng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS[split], i, 1]))
            if split == "train":
                train.extend(train_samples(video, rel, qrng, cfg))
            else:
                q, d = eval_entries(video, rel, qrng, cfg)
                bench_q.extend(q)
                bench_d.extend(d)
    t_gen = time.perf_counter() - t0
    write_json(os.path.join(out_dir, "train.json"), train, indent=None)
    write_json(os.path.join(out_dir, "bench_q.json"), bench_q, indent=None)
    write_json(os.path.join(out_dir, "bench_d.json"), bench_d, indent=None)
    write_json(os.path.join(out_dir, "tracks.json"), {"seed": seed, "config": dataclasses.asdict(cfg), "videos": tracks},
               indent=None)
    t1 = time.perf_counter()
    if tokenizer:
        train_tokenizer(corpus_texts(train, bench_q, bench_d), out_dir, vocab_size)
    summary = {
        "out": out_dir, "train_videos": train_videos, "eval_videos": eval_videos, "train_samples": len(train),
        "bench_q": len(bench_q), "bench_d": len(bench_d),
        "bench_q_types": {t: sum(e["type"] == t for e in bench_q) for t in QUESTION_TYPES},
        "seconds": {"videos_and_json": round(t_gen, 3), "tokenizer": round(time.perf_counter() - t1, 3)},
        "videos_per_second": round((train_videos + eval_videos) / max(t_gen, 1e-9), 1)}
    write_json(os.path.join(out_dir, "summary.json"), summary, indent=None)
    return summary


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vrefer-data synthetic", description="synthetic moving-shapes referring data")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-videos", type=int, default=256)
    ap.add_argument("--eval-videos", type=int, default=64)
    ap.add_argument("--num-frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--min-objects", type=int, default=2)
    ap.add_argument("--max-objects", type=int, default=4)
    ap.add_argument("--media", default="png", choices=["png", "jpg", "mp4"])
    ap.add_argument("--mask-frames", type=int, default=4, help="annotated frames per object in train samples")
    ap.add_argument("--turns-per-sample", type=int, default=1, help="supervised turns per training conversation")
    ap.add_argument("--eval-mask-frames", type=int, default=4,
                    help="annotated frames per object in Bench-Q/D entries (0 = every frame)")
    ap.add_argument("--fixed-options", action="store_true", help="full option sets in a fixed order")
    ap.add_argument("--question-kinds", default=",".join(SynthConfig.question_kinds),
                    help=f"comma-separated, from: {', '.join(KIND_TYPES)}")
    ap.add_argument("--captions-per-video", type=int, default=2, choices=[0, 1, 2])
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--no-tokenizer", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    cfg = SynthConfig(num_frames=a.num_frames, size=a.size, min_objects=a.min_objects, max_objects=a.max_objects,
                      media=a.media, mask_frames=a.mask_frames, eval_mask_frames=a.eval_mask_frames,
                      turns_per_sample=a.turns_per_sample, fixed_options=a.fixed_options,
                      question_kinds=tuple(k.strip() for k in a.question_kinds.split(",") if k.strip()),
                      captions_per_video=a.captions_per_video)
    summary = generate(a.out, seed=a.seed, train_videos=a.train_videos, eval_videos=a.eval_videos, cfg=cfg,
                       vocab_size=a.vocab_size, tokenizer=not a.no_tokenizer)
    print(json.dumps(summary, indent=1))
    return 0

