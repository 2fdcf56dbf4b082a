"""Synthetic referring-video data: moving shapes, exact masks, Bench-Q-style questions, captions, a tokenizer.

    python -m data_pipeline.synthetic --out DIR [--train-videos 256] [--eval-videos 64] [--seed 0]

Each video shows 2-4 objects (circle / square / triangle, distinct colours, three sizes) moving in a
straight line over a textured grey background. Objects are painted in list order, so later ones
hide earlier ones; an object's mask on a frame is exactly its visible pixels (no anti-aliasing, so
with PNG frames the pixels of an object's colour are its mask).

Output folder:

    videos/{train,eval}/<vid>/00000.png ...     frame folders (DAVIS layout; or <vid>.mp4 with PyAV)
    train.json        training samples, official VideoRefer format (QA in the Bench-Q prompt + captions)
    bench_q.json      held-out questions, official Bench-Q format (video, Question, options, Answer,
                      type, frame_idx, annotation)
    bench_d.json      held-out descriptions, Bench-D format (video, caption, frame_idx, annotation)
                      plus `attributes` {colour, shape, motion} for
                      `vrefer_jax.evaluation.attribute_score`
    tracks.json       ground truth per video (config, objects, per-frame centres)
    tokenizer.json, tokenizer_config.json   byte-level BPE trained on the text above

Every video's randomness comes from `SeedSequence([seed, split, index])`: the same seed gives the
same bytes, and train / eval videos never share a stream. Masks are COCO compressed RLE.

Modules, one job each: `scene` (vocabulary, `SynthConfig`, `Track`, `Video`), `render` (frames,
masks, media files, RLE annotations), `captions`, `questions`, `samples` (train / Bench-Q / Bench-D
entries of a video), `tokenizer`, `dataset` (`generate`, the command line). The package re-exports
nothing: import the module you need.
"""
