"""`ServeConfig`: what `vrefer-serve` batches, allows and waits for (bound in `configs/serve/*.gin`)."""

from __future__ import annotations

import dataclasses

import gin

from vrefer_jax.inference.request_files import MAX_IMAGE_PIXELS


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Batching, limits and timeouts of the server.

    Batching. Requests that arrive within `batch_window_ms` of the first queued one are grouped by
    the family host's bucket (`group_key`: VideoRefer-7B rows share a frame count) and their
    generation settings (greedy / sampling parameters shape the compiled program; `max_new_tokens`
    does not: a batch decodes to the largest of its rows, rounded up to a power of two, and each row
    stops at its own limit), at most `max_batch_size` rows per batch (rows rounded up to a power of
    two, so few programs compile). `stream_chunk` decode steps run between two reads of the tokens
    (streamed text arrives in pieces of up to that many tokens; smaller = smoother, a little slower).

    Limits (a request over one is refused with a 4xx naming the field, before it reaches a batch):
    `max_queue` waiting jobs (503 beyond), `max_media_bytes` per video / image (413),
    `max_video_frames` / `max_video_seconds` per video, `max_objects` per request, `max_mask_frames`
    per object, `max_image_pixels` per mask image and frame, `max_prompt_tokens` (the tokenised
    prompt before the video / region expansion), `max_text_chars` per message, `max_new_tokens` per
    request (`default_max_new_tokens` when a request gives none).

    Timeouts: `request_timeout_s` from arrival to the last token (504; a request may ask for less),
    `shutdown_timeout_s` to finish in-flight requests on SIGTERM before the process exits anyway.

    Paths: media and mask paths in requests resolve under `media_root` and must stay inside it
    (`allow_absolute_paths` reads absolute ones); uploaded media (data: URLs) are written to
    `upload_dir` (default: a temporary folder) and deleted once decoded.
    """

    media_root: str = "."
    allow_absolute_paths: bool = False
    upload_dir: str | None = None
    max_batch_size: int = 8
    batch_window_ms: float = 5.0
    stream_chunk: int = 8
    max_queue: int = 256
    prepare_workers: int = 2
    max_media_bytes: int = 512 << 20
    max_video_frames: int = 100_000
    max_video_seconds: float = 3600.0
    max_objects: int = 16
    max_mask_frames: int = 32
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_prompt_tokens: int = 4096
    max_text_chars: int = 16_000
    max_new_tokens: int = 1024
    default_max_new_tokens: int = 512
    request_timeout_s: float = 300.0
    shutdown_timeout_s: float = 600.0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
                raise ValueError(f"ServeConfig.{f.name} must be >= 0, got {v}")
        for name in ("max_batch_size", "stream_chunk", "max_new_tokens", "default_max_new_tokens", "prepare_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServeConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError(f"ServeConfig.default_max_new_tokens {self.default_max_new_tokens} > max_new_tokens "
                             f"{self.max_new_tokens}")

    def replace(self, **kw) -> ServeConfig:
        return dataclasses.replace(self, **kw)
