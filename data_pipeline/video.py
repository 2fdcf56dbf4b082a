"""Media decoding (PyAV, PIL), the official 'v1' frame sampling, and SigLIP's host-side resize.

Sources (reference §2.1):
* video files (mp4/webm/mkv/mov/avi, anything FFmpeg reads) and GIFs, through PyAV;
* folders of frames (DAVIS/MeViS layout: `.../JPEGImages/480p/<name>/00000.jpg`), frames being the
  image files of the folder sorted by name;
* single images (`read_image`).

Frame `i` of a video is the i-th frame in presentation order, as decord (the official reader)
counts it: the number of frames is the number of video packets, and frame i's timestamp is the
i-th smallest packet pts. `VideoReader.get` decodes any set of absolute indices in one forward
pass, seeking to the last keyframe before a wanted frame whenever that skips decoding work. GIFs and
streams without packet timestamps are decoded sequentially from the start.

Resizing is SigLIP's (`SiglipImageProcessor`, §2.2): PIL bicubic on the uint8 RGB frame to
(size, size); 'square' squashes, 'pad' first pastes the frame centred on a square canvas filled with
(127, 127, 127). The converter stores exactly that uint8 image, so the loader's only remaining steps
are rescale and normalise (`siglip_normalize`).
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterable, Sequence

import av
import numpy as np
from PIL import Image

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
FOLDER_FPS = 3.0  # the official reader hard-codes these
GIF_FPS = 25.0
PAD_FILL = (127, 127, 127)  # int(0.5 * 255) per channel: SigLIP's image_mean
MAX_FRAMES = 32  # official MAX_FRAMES: `process_video` keeps at most this many sampled frames


class MediaError(RuntimeError):
    """Media that cannot be used: `reason` is "media_not_found", "unreadable_media" or
    "truncated_media" (samplers add "bad_clip_bound", "bad_frame_ids", "no_frames")."""

    def __init__(self, reason: str, message: str):
        self.reason, self.message = reason, message
        super().__init__(f"[{reason}] {message}")


# ----------------------------------------------------------------------------- sampling


def sample_indices_v1(duration: int, num_frames: int) -> list[int]:
    """Official uniform 'v1' sampling (`frame_sample(mode='uniform')`), bit for bit.

    seg = (duration - 1) / n in float64; index i -> round((seg*i + seg*(i+1)) / 2 + 1e-6) with
    NumPy's round-half-to-even. Duplicates are kept (short videos repeat frames).
    """
    if duration < 1 or num_frames < 1:
        raise ValueError(f"need duration >= 1 and num_frames >= 1, got {duration}, {num_frames}")
    seg = float(duration - 1) / num_frames
    mids = [(seg * i + seg * (i + 1)) / 2 for i in range(num_frames)]
    return [int(v) for v in np.round(np.array(mids) + 1e-6).astype(int)]


def clip_candidates(num_source_frames: int, fps: float, bound: Sequence[float] | None) -> list[int]:
    """Frames a clip bound (start, end) in seconds admits, as the official `process_video` (used by
    MVBench): first `max(int(s*fps) - 1, 0)`, last `min(int(e*fps) - 1, N - 1)`; no bound = all.
    Raises `MediaError` for a bound that admits no frame."""
    if bound is None:
        return list(range(num_source_frames))
    s, e = float(bound[0]), float(bound[1])
    first, last = max(int(s * fps) - 1, 0), min(int(e * fps) - 1, num_source_frames - 1)
    if last < first:
        raise MediaError("bad_clip_bound", f"bound {s}..{e} s at {fps} fps admits no frame of {num_source_frames}")
    return list(range(first, last + 1))


def sample_clip_v1(num_source_frames: int, fps: float, num_frames: int,
                   bound: Sequence[float] | None = None) -> list[int]:
    """'v1' sampling of `num_frames` over the frames `bound` admits (the whole video without one)."""
    cands = clip_candidates(num_source_frames, fps, bound)
    return [cands[i] for i in sample_indices_v1(len(cands), num_frames)]


# ----------------------------------------------------------------------------- readers


class VideoReader:
    """Random access to the frames of a video file or GIF through PyAV.

    `num_frames`, `fps`; `get(indices) -> {index: [H, W, 3] uint8 RGB}` for unique indices.
    """

    def __init__(self, path: str, threads: int = 1):
        self.path = path
        self.threads = threads
        self.is_gif = path.lower().endswith(".gif")
        try:
            with av.open(path) as c:
                if not c.streams.video:
                    raise MediaError("unreadable_media", f"{path}: no video stream")
                s = c.streams.video[0]
                rate = s.average_rate or s.guessed_rate
                self.fps = GIF_FPS if self.is_gif else (float(rate) if rate else 0.0)
                packets = [(p.pts, p.is_keyframe, p.duration) for p in c.demux(s) if p.size > 0]
                declared = s.frames  # the container's own count (mp4 sample table); 0 = not stored
                # Timing facts for fps-based sampling (data_pipeline.vl3.frames): the stream's time
                # base and start (time-base units), the container's start and duration (AV_TIME_BASE
                # = microseconds); None where the file does not say.
                self.time_base = s.time_base
                self.stream_start_time = s.start_time
                self.container_start_time = c.start_time
                self.container_duration = c.duration
        except MediaError:
            raise
        except (av.error.FFmpegError, OSError, ValueError) as e:
            raise MediaError("unreadable_media", f"{path}: {e}") from None
        # A cut-off file whose index survived (mp4 with the moov atom first) demuxes only the
        # packets that are still there: without this check it would pass for a shorter video.
        if declared and len(packets) < declared:
            raise MediaError("truncated_media", f"{path}: {len(packets)} of the {declared} frames the container "
                                                "declares are present (truncated file?)")
        self.num_frames = len(packets)
        # Timestamp index for seeking: frame i <-> i-th smallest packet pts. Without usable
        # timestamps (or for GIFs) frames are counted while decoding from the start instead.
        self._pts: list[int] | None = None
        self._keyframes: np.ndarray | None = None
        pts = [p for p, _, _ in packets]
        # Duration (time-base units) of the last frame in presentation order; 0 = unknown.
        self.last_duration = 0
        if not self.is_gif and pts and None not in pts and len(set(pts)) == len(pts):
            self._pts = sorted(pts)
            pos = {p: i for i, p in enumerate(self._pts)}
            keys = sorted({0} | {pos[p] for p, key, _ in packets if key})
            self._keyframes = np.asarray(keys, np.int64)
            self.last_duration = int(max(packets, key=lambda q: q[0])[2] or 0)

    @property
    def pts(self) -> list[int] | None:
        """Frame i's presentation timestamp (time-base units), ascending; None where the packets carry
        no usable timestamps (GIFs, missing or repeated pts), whose frames are counted while decoding."""
        return None if self._pts is None else list(self._pts)

    def _open(self):
        c = av.open(self.path)
        s = c.streams.video[0]
        s.thread_count = self.threads
        if self.threads > 1:
            s.thread_type = "AUTO"
        return c, s

    def get(self, indices: Iterable[int]) -> dict[int, np.ndarray]:
        want = sorted(set(int(i) for i in indices))
        if not want:
            return {}
        bad = [i for i in want if not 0 <= i < self.num_frames]
        if bad:
            raise MediaError("unreadable_media", f"{self.path}: frame(s) {bad[:5]} outside [0, {self.num_frames})")
        try:
            if self._pts is not None:
                try:
                    return self._get_seek(want)
                except _NoTimestamps:
                    pass
            return self._get_sequential(want)
        except MediaError:
            raise
        except (av.error.FFmpegError, OSError, ValueError) as e:
            raise MediaError("unreadable_media", f"{self.path}: {e}") from None

    def _get_sequential(self, want: list[int]) -> dict[int, np.ndarray]:
        out: dict[int, np.ndarray] = {}
        wanted, last = set(want), want[-1]
        c, s = self._open()
        with c:
            for i, frame in enumerate(c.decode(s)):
                if i in wanted:
                    out[i] = frame.to_ndarray(format="rgb24")
                if i >= last:
                    break
        self._check(want, out)
        return out

    def _get_seek(self, want: list[int]) -> dict[int, np.ndarray]:
        pos = {p: i for i, p in enumerate(self._pts)}
        wanted = set(want)
        out: dict[int, np.ndarray] = {}
        c, s = self._open()
        with c:
            frames, cur = None, -1  # decode generator; index of the last decoded frame
            for t in want:
                if t in out:
                    continue
                k = int(self._keyframes[np.searchsorted(self._keyframes, t, side="right") - 1])
                # (Re)start at keyframe k when that skips frames the decoder would otherwise run
                # through; the very first pass from frame 0 needs no seek.
                if frames is None or k > cur + 1 or t <= cur:
                    if frames is not None or k > 0:
                        c.seek(self._pts[k], stream=s, backward=True, any_frame=False)
                    frames, cur = c.decode(s), k - 1
                for frame in frames:
                    i = pos.get(frame.pts)
                    if i is None:
                        raise _NoTimestamps()
                    cur = i
                    if i in wanted and i not in out:
                        out[i] = frame.to_ndarray(format="rgb24")
                    if i >= t:
                        break
                if t not in out:
                    break
        self._check(want, out)
        return out

    def _check(self, want: Sequence[int], out: dict) -> None:
        missing = [i for i in want if i not in out]
        if missing:
            raise MediaError("unreadable_media", f"{self.path}: frame(s) {missing[:5]} could not be decoded "
                                                 f"({self.num_frames} packets)")


class _NoTimestamps(Exception):
    pass


class FolderReader:
    """A folder of frame images, sorted by file name (image extensions only; hidden files skipped)."""

    def __init__(self, path: str):
        self.path = path
        try:
            names = os.listdir(path)
        except OSError as e:
            raise MediaError("unreadable_media", f"{path}: {e}") from None
        self.files = sorted(n for n in names if not n.startswith(".") and n.lower().endswith(IMAGE_EXTS))
        self.num_frames = len(self.files)
        self.fps = FOLDER_FPS

    def get(self, indices: Iterable[int]) -> dict[int, np.ndarray]:
        out = {}
        for i in sorted(set(int(i) for i in indices)):
            if not 0 <= i < self.num_frames:
                raise MediaError("unreadable_media", f"{self.path}: frame {i} outside [0, {self.num_frames})")
            out[i] = read_image(os.path.join(self.path, self.files[i]))
        return out


def open_video(path: str, threads: int = 1) -> VideoReader | FolderReader:
    """A reader for a video file, GIF or frame folder. Raises MediaError."""
    if not os.path.exists(path):
        raise MediaError("media_not_found", f"{path} does not exist")
    if os.path.isdir(path):
        return FolderReader(path)
    return VideoReader(path, threads=threads)


def read_image(path: str) -> np.ndarray:
    """An image file -> [H, W, 3] uint8 RGB (official `Image.open(...).convert('RGB')`)."""
    if not os.path.exists(path):
        raise MediaError("media_not_found", f"{path} does not exist")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError("unreadable_media", f"{path}: {e}") from None


# ----------------------------------------------------------------------------- resize / encode


def expand_to_square(frame: np.ndarray, fill: tuple[int, int, int] = PAD_FILL) -> np.ndarray:
    """Official `expand2square`: centre the frame on a square canvas of side max(H, W)."""
    h, w = frame.shape[:2]
    if h == w:
        return frame
    side = max(h, w)
    out = np.empty((side, side, 3), np.uint8)
    out[...] = np.asarray(fill, np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    out[top:top + h, left:left + w] = frame
    return out


def resize_frame(frame: np.ndarray, size: int, aspect: str = "square") -> np.ndarray:
    """[H, W, 3] uint8 -> [size, size, 3] uint8, exactly SiglipImageProcessor's resize step.

    size 0 returns the frame untouched (stored at original resolution; the loader then pads and
    resizes).
    """
    if aspect not in ("square", "pad"):
        raise ValueError(f"aspect must be 'square' or 'pad', got {aspect!r}")
    if size == 0:
        return frame
    if aspect == "pad":
        frame = expand_to_square(frame)
    return np.asarray(Image.fromarray(frame).resize((size, size), Image.BICUBIC))


IMAGE_FORMATS = ("png", "raw", "jpeg")
# 'raw' frames are this magic, big-endian uint32 height and width, then the H*W*3 RGB bytes.
RAW_MAGIC = b"RAWRGB8\0"


def encode_image(frame: np.ndarray, image_format: str = "png", quality: int = 95) -> bytes:
    """uint8 RGB -> PNG (lossless, zlib level 1), raw (lossless, uncompressed) or JPEG (4:4:4
    chroma, `quality`; lossy) bytes."""
    if image_format == "raw":
        frame = np.ascontiguousarray(frame, np.uint8)
        if frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"raw frames are [H, W, 3] uint8, got shape {frame.shape}")
        return RAW_MAGIC + struct.pack(">II", *frame.shape[:2]) + frame.tobytes()
    buf = io.BytesIO()
    im = Image.fromarray(frame)
    if image_format == "jpeg":
        im.save(buf, format="JPEG", quality=quality, subsampling=0)
    elif image_format == "png":
        im.save(buf, format="PNG", compress_level=1)
    else:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """PNG/raw/JPEG bytes (as `encode_image` writes them) -> [H, W, 3] uint8 RGB."""
    if data[:len(RAW_MAGIC)] == RAW_MAGIC:
        h, w = struct.unpack_from(">II", data, len(RAW_MAGIC))
        pixels = memoryview(data)[len(RAW_MAGIC) + 8:]
        if len(pixels) != h * w * 3:
            raise ValueError(f"raw frame of {h}x{w} needs {h * w * 3} bytes, got {len(pixels)}")
        return np.frombuffer(pixels, np.uint8).reshape(h, w, 3)
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


# ----------------------------------------------------------------------------- normalise


def _siglip_lut() -> np.ndarray:
    """uint8 -> float32 exactly as SiglipImageProcessor: rescale in float64, cast, (x - .5) / .5 in fp32."""
    x = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    return (x - np.float32(0.5)) / np.float32(0.5)


SIGLIP_LUT = _siglip_lut()


def siglip_normalize(img: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 [..., 3] -> float32 in [-1, 1], bit-identical to `SIGLIP_LUT[img]` (checked for all 256
    values in the tests: fp32 x / 255 rounds like HF's fp64 rescale here) and ~3x faster."""
    out = np.empty(img.shape, np.float32) if out is None else out
    np.divide(img, np.float32(255), out=out, dtype=np.float32)
    out -= np.float32(0.5)
    out *= np.float32(2)
    return out
