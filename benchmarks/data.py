"""Data loader throughput: the Grain loader over converted records vs an official-style per-sample
pipeline (decode the mp4 at load time with PyAV, PIL resize + SigLIP normalisation, pycocotools mask
decode at full resolution) on the same samples, both with 2 worker processes.

    python benchmarks/data.py [--videos ../shared/data/videos] [--samples 8] [--measure 48]
                              [--formats png,raw,jpeg]

Samples: 16 frames at 384x384, 3 objects with 3 annotated frames each (9 region frames), real
1280x720 videos. Conversion time is reported separately (it is paid once, not per epoch). Each
stored frame format (`--formats`) is converted and loaded in turn, with its record size and its
largest pixel error against the exact resized frame (0 for the lossless png and raw).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

from data_pipeline import convert, loader, masks as masks_lib, video as video_lib  # noqa: E402
from vrefer_jax.text import HFTokenizer, build_training_example  # noqa: E402

T, S, GRID, K, FPO = 16, 384, 27, 3, 3  # frames, side, vision grid, objects, frames per object


def tiny_tokenizer() -> HFTokenizer:
    """A small byte-level BPE with ChatML specials (tokenisation cost is negligible here)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Relate the objects in the video and describe what happens to each of them."] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    return HFTokenizer(tok)


def make_entries(videos: list[str], n: int) -> list[dict]:
    H, W = 720, 1280
    out = []
    for i in range(n):
        objs = []
        for k in range(K):
            m = np.zeros((H, W), bool)
            m[50 * k: 50 * k + 200, 80 * k: 80 * k + 300] = True
            rle = {"size": [H, W], "counts": masks_lib.encode_mask(m).decode()}
            objs.append({str(f): {"segmentation": rle} for f in (5 + k + i, 60 + k, 120 + k)})
        out.append({"id": f"s{i}", "video": os.path.basename(videos[i % len(videos)]), "annotation": objs,
                    "conversations": [{"from": "human", "value": "<video>\nRelate <region>, <region> and <region>."},
                                      {"from": "gpt", "value": "They move together."}]})
    return out


# ----------------------------------------------------------------------------- official style

_LUT = video_lib.SIGLIP_LUT
_STATE: dict = {}


def _official_init(media_root: str, tokenizer) -> None:
    _STATE.update(root=media_root, tok=tokenizer)


def official_sample(entry: dict) -> dict:
    """One sample as the official dataset does it: decode at load time, resize, normalise, masks."""
    import av

    path = os.path.join(_STATE["root"], entry["video"])
    with av.open(path) as c:
        n = c.streams.video[0].frames
        sampled = video_lib.sample_indices_v1(n, T)
        region = sorted({int(f) for obj in entry["annotation"] for f in obj})
        want = set(sampled) | set(region)
        got = {}
        for i, fr in enumerate(c.decode(video=0)):  # decord-style get_batch: decode up to the last index
            if i in want:
                got[i] = fr.to_ndarray(format="rgb24")
            if i >= max(want):
                break

    def proc(img):
        from PIL import Image

        return _LUT[np.asarray(Image.fromarray(img).resize((S, S), Image.BICUBIC))]

    frames = np.stack([proc(got[i]) for i in sampled])
    region_frames = np.stack([proc(got[i]) for i in region])
    from pycocotools import mask as mask_utils

    ms = [mask_utils.decode(obj[f]["segmentation"] | {"counts": obj[f]["segmentation"]["counts"].encode()})
          for obj in entry["annotation"] for f in obj]
    masks = np.stack(ms).astype(np.float32)  # full resolution; the official model resizes on device
    ids, labels = build_training_example(_STATE["tok"], entry["conversations"], "<video>")
    return dict(frames=frames, region_frames=region_frames, masks=masks, ids=ids, labels=labels)


def bench_official(entries, media_root, tokenizer, measure: int, workers: int) -> float:
    todo = [entries[i % len(entries)] for i in range(measure)]
    with mp.get_context("spawn").Pool(workers, _official_init, (media_root, tokenizer)) as pool:
        list(pool.imap(official_sample, entries[:workers]))  # start-up
        t0 = time.perf_counter()
        for _ in pool.imap(official_sample, todo):
            pass
        return measure / (time.perf_counter() - t0)


def bench_loader(records_dir, tokenizer, measure: int, workers: int) -> float:
    cfg = loader.LoaderConfig(batch_size=1, seq_len=128, num_frames=T, image_size=S, grid=GRID,
                              max_region_frames=K * FPO, max_objects=K, max_object_frames=FPO,
                              num_epochs=None, num_shards=1, shard_index=0, worker_count=workers,
                              worker_buffer_size=2)
    it = loader.make_loader(records_dir, cfg, tokenizer)
    for _ in range(2 * workers):  # start-up
        next(it)
    t0 = time.perf_counter()
    for _ in range(measure):
        next(it)
    dt = time.perf_counter() - t0
    it.close()
    return measure / dt


def max_pixel_error(records_dir: str, media_root: str) -> int:
    """Largest |stored - exact resize| over the sampled frames of the first record (uint8 levels)."""
    from data_pipeline import records as records_lib

    rec = records_lib.RecordReader(records_dir)[0]
    src = video_lib.open_video(os.path.join(media_root, rec.media)).get(rec.frame_indices)
    exact = np.stack([video_lib.resize_frame(src[i], S) for i in rec.frame_indices]).astype(int)
    return int(np.abs(rec.decode_frames().astype(int) - exact).max())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--videos", default=os.path.join(ROOT, "..", "shared", "data", "videos"))
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--measure", type=int, default=48)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--formats", default="png,raw,jpeg", help="stored frame formats to compare, comma-separated")
    a = p.parse_args(argv)
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    videos = sorted(os.path.join(a.videos, f) for f in os.listdir(a.videos) if f.endswith(".mp4"))
    if not videos:
        raise SystemExit(f"no mp4 in {a.videos}")
    media_root = os.path.abspath(a.videos)
    entries = make_entries(videos, a.samples)
    tok = tiny_tokenizer()
    rows = []
    for fmt in a.formats.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "records")
            t0 = time.perf_counter()
            convert.convert(entries, out, media_root=media_root, num_shards=2, workers=a.workers,
                            config=convert.ConvertConfig(num_frames=T, image_size=S, image_format=fmt), progress=False)
            conv = a.samples / (time.perf_counter() - t0)
            mb = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".tfrecord"))
            err = max_pixel_error(out, media_root)
            rows.append((fmt, conv, mb / a.samples / 1e6, err, bench_loader(out, tok, a.measure, a.workers)))
    official = bench_official(entries, media_root, tok, a.measure, a.workers)
    print(f"{len(videos)} real videos, {a.samples} samples x {T} frames at {S}x{S}, {K} objects x {FPO} frames, "
          f"{a.workers} workers, {os.cpu_count()} CPUs")
    print("frames  conversion   record size  max pixel err  grain loader   vs official")
    for fmt, conv, mb, err, ours in rows:
        print(f"{fmt:6s} {conv:6.2f} smp/s {mb:8.2f} MB {err:10d}/255 {ours:8.2f} smp/s {ours / official:8.1f}x")
    print(f"official-style (decode mp4 at load time): {official:.2f} samples/s")


if __name__ == "__main__":
    main()
