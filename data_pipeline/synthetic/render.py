"""Rendering: moving shapes over a textured background, exact visible masks, media files and the
official RLE annotation lists."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from data_pipeline import masks as masks_lib
from data_pipeline.synthetic.scene import COLOURS, DIRECTIONS, MIN_VISIBLE, SHAPES, SIZES, SPLITS, SynthConfig, Track, Video


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """[size, size] bool: pixel centres inside the shape of 'radius' r centred at (cx, cy)."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        h = 0.85 * r  # about the circle's area
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":  # upward, apex at top; base 2r wide at cy + r
        t = (dy + r) / (2 * r)  # 0 at apex, 1 at base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * 1.15 * r)
    raise ValueError(f"unknown shape {shape!r}")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Grey noise plus stripes in [40, 170] (never an object colour)."""
    y, x = np.mgrid[0:size, 0:size]
    theta, period = rng.uniform(0, np.pi), rng.uniform(6, 16)
    stripes = 25 * np.sin(2 * np.pi * (x * np.cos(theta) + y * np.sin(theta)) / period)
    g = rng.uniform(80, 130) + stripes + rng.normal(0, 8, (size, size))
    return np.repeat(np.clip(g, 40, 170).astype(np.uint8)[..., None], 3, axis=2)


def _sample_tracks(rng: np.random.Generator, cfg: SynthConfig) -> list[Track]:
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    colours = rng.choice(list(COLOURS), n, replace=False)
    dirs = rng.permutation(list(DIRECTIONS))  # distinct directions where possible
    tracks = []
    S, T = cfg.size, cfg.num_frames
    for k in range(n):
        size = str(rng.choice(list(SIZES)))
        r = SIZES[size] * S
        direction = str(dirs[k % 4])
        d = np.array(DIRECTIONS[direction])
        lo, hi = r + 1, S - r - 1
        span = rng.uniform(*cfg.travel) * (hi - lo)
        speed = span / (T - 1)
        drift = rng.uniform(-0.15, 0.15) * speed  # small sideways drift: the direction stays clear
        v = d * speed + np.array([d[1], d[0]]) * drift
        start_lo = np.maximum(lo, lo - v * (T - 1))
        start_hi = np.minimum(hi, hi - v * (T - 1))
        start = rng.uniform(start_lo, start_hi)
        centres = start[None] + v[None] * np.arange(T)[:, None]
        tracks.append(Track(str(colours[k]), str(rng.choice(SHAPES)), size, float(r), direction,
                            float(speed), centres))
    return tracks


def render(tracks: Sequence[Track], rng: np.random.Generator, cfg: SynthConfig) -> tuple[np.ndarray, np.ndarray]:
    """Frames [T, S, S, 3] uint8 and visible masks [N, T, S, S] bool (later objects on top)."""
    S, T = cfg.size, cfg.num_frames
    bg = _background(rng, S)
    if cfg.scene_tint > 0 and not cfg.tint_objects:
        bg = _cast(bg, cfg.scene_tint)
    frames = np.repeat(bg[None], T, axis=0)
    if cfg.frame_noise > 0:  # drawn only when asked: the default videos stay byte-identical
        noisy = frames.astype(np.float32) + rng.normal(0, cfg.frame_noise, frames.shape[:3])[..., None]
        frames = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    full = np.stack([[shape_mask(tr.shape, *tr.centres[t], tr.radius, S) for t in range(T)] for tr in tracks])
    visible = full.copy()
    for k in range(len(tracks)):
        visible[k] &= ~full[k + 1:].any(axis=0)
        frames[full[k]] = COLOURS[tracks[k].colour]
    if cfg.scene_tint > 0 and cfg.tint_objects:
        frames = _cast(frames, cfg.scene_tint)
    return frames, visible


def _cast(img: np.ndarray, tint: float) -> np.ndarray:
    """uint8 [..., S, S, 3] with red shifted by up to +-tint rightwards and blue downwards."""
    S = img.shape[-2]
    ramp = (np.arange(S) + 0.5) / S * 2 - 1  # -1 .. 1 across the frame
    out = img.astype(np.float32)
    out[..., 0] += tint * ramp[None, :]
    out[..., 2] += tint * ramp[:, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def make_video(seed: int, split: str, index: int, cfg: SynthConfig) -> Video:
    """Video `index` of `split`: redrawn until every object is visible on at least half the frames
    and on a shared frame (needed for single-frame questions)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS[split], index]))
    while True:
        tracks = _sample_tracks(rng, cfg)
        frames, vis = render(tracks, rng, cfg)
        seen = vis.sum(axis=(2, 3)) >= MIN_VISIBLE  # [N, T]
        if seen.mean(axis=1).min() >= 0.5 and seen.all(axis=0).any():
            return Video(f"{split}_{index:06d}", frames, vis, tracks)


def write_media(video: Video, root: str, split: str, cfg: SynthConfig) -> str:
    """Write the frames under `root`; returns the `video` path relative to `root`."""
    if cfg.media == "mp4":
        import av

        rel = os.path.join("videos", split, video.vid + ".mp4")
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        with av.open(os.path.join(root, rel), "w") as c:
            s = c.add_stream("libx264", rate=8)
            s.width = s.height = cfg.size
            s.pix_fmt = "yuv444p"
            s.options = {"crf": "10"}
            for f in video.frames:
                for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
        return rel
    rel = os.path.join("videos", split, video.vid)
    d = os.path.join(root, rel)
    os.makedirs(d, exist_ok=True)
    ext = "png" if cfg.media == "png" else "jpg"
    for t, f in enumerate(video.frames):
        img = Image.fromarray(f)
        if ext == "png":
            img.save(os.path.join(d, f"{t:05d}.png"), compress_level=1)
        else:
            img.save(os.path.join(d, f"{t:05d}.jpg"), quality=95, subsampling=0)
    return rel


def _rle(mask: np.ndarray) -> dict:
    return {"size": list(mask.shape), "counts": masks_lib.encode_mask(mask).decode("ascii")}


def annotation(video: Video, objects: Sequence[int], frames: Sequence[int]) -> list[dict]:
    """Official annotation list: per object, {str(frame): {"segmentation": RLE}} on the given
    frames where the object is visible (at least one frame is kept)."""
    out = []
    for k in objects:
        keep = [t for t in frames if video.masks[k, t].sum() >= MIN_VISIBLE] or list(frames[:1])
        out.append({str(t): {"segmentation": _rle(video.masks[k, t])} for t in keep})
    return out
