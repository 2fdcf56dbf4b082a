"""HTTP request bodies -> prepared, validated jobs (everything a request can get wrong, checked alone).

Two bodies (pydantic, unknown fields refused at every level):

* `AskBody` (`/v1/regions/ask`): a `vrefer-infer` request (`vrefer_jax.inference.request_files`:
  `video` | `image`, `question`, `frame`, `objects`, `history`) plus generation fields.
* `ChatBody` (`/v1/chat/completions`, OpenAI-style): `messages` alternate user / assistant and end
  with a user turn; the first user message carries the video or image as a content part
  (`{"type": "video", "video": PATH}`, `{"type": "image_url", "image_url": {"url": "data:..."}}`,
  ...); a user message may carry `objects` (the `<region>`s / `<objectN>` tags of its text, in
  order); earlier turns become the request's `history`.

Media are paths under the server's media root or uploaded inline as `data:<mime>;base64,...` URLs
(written to the upload folder, deleted once decoded). Objects are masks by path (`mask`), inline
PNG (`png`, base64), COCO RLE (`rle`), polygon (`polygon`) or box (`box`), on one frame or several
(`frames`).

`Preparer.prepare` runs in a worker thread: limits, `request_to_sample`, the predictor's own decode
(`Predictor.prepare`) and the family's batch check on the request alone, so a request that would
break a batch is refused (4xx, naming the field) before it is queued.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import tempfile
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from data_pipeline import schema
from data_pipeline import video as video_lib
from vrefer_jax.inference import request_files as req_lib
from vrefer_jax.inference.sampling import GenerationConfig
from vrefer_jax.serving.config import ServeConfig

_MIME_EXT = {"video/mp4": ".mp4", "video/webm": ".webm", "video/quicktime": ".mov", "video/x-matroska": ".mkv",
             "video/avi": ".avi", "video/x-msvideo": ".avi", "image/gif": ".gif", "image/png": ".png",
             "image/jpeg": ".jpg", "image/webp": ".webp", "image/bmp": ".bmp"}


class ApiError(Exception):
    """A request the server refuses: HTTP `status`, a reason `code`, a message naming the field."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None):
        self.status, self.code, self.message, self.param = status, code, message, param
        super().__init__(message)

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "code": self.code, "param": self.param}}


# ----------------------------------------------------------------------------- bodies


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MaskSpec(_Strict):
    """One mask: exactly one of the kinds (checked by `request_files`)."""

    mask: str | None = None
    png: str | None = None
    rle: dict[str, Any] | str | None = None
    polygon: list[list[float]] | None = None
    box: list[float] | str | None = None


class ObjectSpec(MaskSpec):
    """An object on `frame` (default: the request's `frame`) or on several (`frames`)."""

    frame: int | str | None = None
    frames: dict[str, MaskSpec] | None = None


class Turn(_Strict):
    question: str
    answer: str


class GenerationFields(_Strict):
    """Per-request generation settings; unset ones come from the checkpoint's defaults (official
    `mm_infer`: greedy with its `generation_config.json`). `temperature` 0 means greedy; > 0 samples
    unless `do_sample` is false."""

    max_new_tokens: int | None = Field(None, ge=1)
    do_sample: bool | None = None
    temperature: float | None = Field(None, ge=0)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = None
    stream: bool = False
    timeout: float | None = Field(None, gt=0, description="seconds from arrival to the last token")


class AskBody(GenerationFields):
    id: str | None = None
    video: str | None = None
    image: str | None = None
    question: str
    frame: int | str | None = None
    objects: list[ObjectSpec] | None = None
    history: list[Turn] | None = None
    bench_q_style: bool = False


class UrlRef(_Strict):
    url: str
    detail: str | None = None


class ContentPart(_Strict):
    type: Literal["text", "video", "image", "video_url", "image_url"]
    text: str | None = None
    video: str | None = None
    image: str | None = None
    video_url: UrlRef | None = None
    image_url: UrlRef | None = None


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]
    objects: list[ObjectSpec] | None = None
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatBody(GenerationFields):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=1)
    stream_options: StreamOptions | None = None
    user: str | None = None
    frame: int | str | None = None


# ----------------------------------------------------------------------------- body -> request dict


def ask_request(body: AskBody, rid: str) -> dict:
    """A `/v1/regions/ask` body -> a `request_files` request (generation fields dropped)."""
    req = body.model_dump(exclude_none=True, exclude=set(GenerationFields.model_fields) | {"bench_q_style"})
    req["id"] = body.id or rid
    return req


def _text_of(msg: ChatMessage, k: int) -> tuple[str, list[tuple[str, str]]]:
    """A message's text and its media parts [(modality, value)]."""
    if isinstance(msg.content, str):
        return msg.content, []
    texts, media = [], []
    for j, part in enumerate(msg.content):
        field = f"messages[{k}].content[{j}]"
        value = {"text": part.text, "video": part.video, "image": part.image,
                 "video_url": part.video_url.url if part.video_url else None,
                 "image_url": part.image_url.url if part.image_url else None}[part.type]
        if value is None:
            raise ApiError(400, "bad_request", f"{field}: a {part.type!r} part needs its `{part.type}` field", field)
        if part.type == "text":
            texts.append(value)
        else:
            media.append((part.type.removesuffix("_url"), value))
    return "\n".join(texts), media


def chat_request(body: ChatBody, rid: str) -> dict:
    """A `/v1/chat/completions` body -> a `request_files` request (see the module docstring)."""
    msgs = body.messages
    if msgs[0].role == "system":
        raise ApiError(400, "bad_request", "messages[0]: system messages are not supported (the model's chat "
                       "template brings its own)", "messages[0].role")
    for k, m in enumerate(msgs):
        want = "user" if k % 2 == 0 else "assistant"
        if m.role != want:
            raise ApiError(400, "bad_request", f"messages[{k}].role: turns alternate user / assistant starting with "
                           f"user; expected {want!r}, got {m.role!r}", f"messages[{k}].role")
        if m.role == "assistant" and m.objects:
            raise ApiError(400, "bad_request", f"messages[{k}].objects: only user messages carry objects",
                           f"messages[{k}].objects")
    if msgs[-1].role != "user":
        raise ApiError(400, "bad_request", "the last message must be a user turn", "messages")
    texts, media, objects = [], [], []
    for k, m in enumerate(msgs):
        text, parts = _text_of(m, k)
        if parts and k != 0:
            raise ApiError(400, "bad_request", f"messages[{k}]: the video / image goes in the first user message",
                           f"messages[{k}].content")
        media += parts
        texts.append(text)
        objects += [o.model_dump(exclude_none=True) for o in (m.objects or [])]
    if len(media) != 1:
        raise ApiError(400, "bad_request", f"messages[0]: give exactly one video or image part, got {len(media)}",
                       "messages[0].content")
    modality, value = media[0]
    req = {"id": rid, modality: value, "question": texts[-1], "objects": objects,
           "history": [{"question": q, "answer": a} for q, a in zip(texts[:-1:2], texts[1:-1:2])]}
    if body.frame is not None:
        req["frame"] = body.frame
    if not req["history"]:
        del req["history"]
    return req


def generation(base: GenerationConfig, body: GenerationFields, cfg: ServeConfig,
               max_new_tokens: int | None = None) -> GenerationConfig:
    """The request's `GenerationConfig`: the predictor's defaults, then the body's fields."""
    n = max_new_tokens or body.max_new_tokens or cfg.default_max_new_tokens
    if n > cfg.max_new_tokens:
        raise ApiError(400, "limit_exceeded", f"max_new_tokens {n} is over the server's limit of "
                       f"{cfg.max_new_tokens}", "max_new_tokens")
    kw: dict[str, Any] = {"max_new_tokens": n}
    for name in ("top_k", "top_p", "repetition_penalty", "seed"):
        if getattr(body, name) is not None:
            kw[name] = getattr(body, name)
    if body.temperature is not None:
        if body.temperature == 0:
            kw["do_sample"] = False
        else:
            kw["temperature"], kw["do_sample"] = body.temperature, True
    if body.do_sample is not None:
        kw["do_sample"] = body.do_sample
    try:
        return base.replace(**kw)
    except ValueError as e:
        raise ApiError(400, "bad_request", f"generation settings: {e}", "generation") from None


# ----------------------------------------------------------------------------- preparation


@dataclasses.dataclass
class PreparedRequest:
    """A request checked and decoded, ready for a batch."""

    rid: str
    prepared: Any
    prompt_tokens: int
    warnings: list[str]


class Preparer:
    """Limits + `request_to_sample` + `Predictor.prepare` + the family's batch check, per request."""

    def __init__(self, predictor, cfg: ServeConfig):
        self.predictor, self.cfg = predictor, cfg
        self.upload_dir = cfg.upload_dir or tempfile.mkdtemp(prefix="vrefer-serve-uploads-")
        os.makedirs(self.upload_dir, exist_ok=True)
        self.policy = req_lib.PathPolicy(confine=True, allow_absolute=cfg.allow_absolute_paths,
                                         max_image_pixels=cfg.max_image_pixels)

    # -- limits that need no media

    def _check_request(self, req: dict) -> None:
        c = self.cfg
        texts = [("question", req.get("question", ""))] + [
            (f"history[{k}].{f}", t[f]) for k, t in enumerate(req.get("history", [])) for f in ("question", "answer")]
        for field, text in texts:
            if isinstance(text, str) and len(text) > c.max_text_chars:
                raise ApiError(400, "limit_exceeded", f"{field}: {len(text)} characters, over the limit of "
                               f"{c.max_text_chars}", field)
        objects = req.get("objects") or []
        if len(objects) > c.max_objects:
            raise ApiError(400, "limit_exceeded", f"objects: {len(objects)} objects, over the limit of {c.max_objects}",
                           "objects")
        for k, o in enumerate(objects):
            n = len(o.get("frames") or {}) or 1
            if n > c.max_mask_frames:
                raise ApiError(400, "limit_exceeded", f"objects[{k}].frames: {n} masks, over the limit of "
                               f"{c.max_mask_frames} per object", f"objects[{k}].frames")

    # -- media

    def _upload(self, modality: str, url: str) -> str:
        """A `data:` URL -> a file in the upload folder (size checked before decoding)."""
        head, _, data = url.partition(",")
        mime = head[5:].split(";")[0].strip().lower()
        if not head.endswith(";base64") or not data:
            raise ApiError(400, "bad_request", f"{modality}: a data URL must be data:<mime>;base64,<data>", modality)
        if not mime.startswith(("video/", "image/")):
            raise ApiError(400, "bad_request", f"{modality}: unsupported media type {mime!r}", modality)
        if len(data) * 3 // 4 > self.cfg.max_media_bytes:
            raise ApiError(413, "media_too_large", f"{modality}: about {len(data) * 3 // 4} bytes, over the limit "
                           f"of {self.cfg.max_media_bytes} (max_media_bytes)", modality)
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ApiError(400, "bad_request", f"{modality}: the data URL is not base64 ({e})", modality) from None
        ext = _MIME_EXT.get(mime, "." + mime.split("/")[1].split("+")[0])
        path = os.path.join(self.upload_dir, f"{uuid.uuid4().hex}{ext}")
        with open(path, "wb") as f:
            f.write(raw)
        return path

    def _check_media(self, modality: str, path: str) -> None:
        c = self.cfg
        if not os.path.exists(path):
            return  # the predictor names it (media_not_found)
        size = (sum(e.stat().st_size for e in os.scandir(path) if e.is_file()) if os.path.isdir(path)
                else os.path.getsize(path))
        if size > c.max_media_bytes:
            raise ApiError(413, "media_too_large", f"{modality}: {size} bytes, over the limit of {c.max_media_bytes} "
                           "(max_media_bytes)", modality)
        if modality == "image":
            from PIL import Image

            try:
                with Image.open(path) as im:
                    w, h = im.size
            except (OSError, Image.DecompressionBombError):
                return  # unreadable: the predictor names it (unreadable_media)
            if w * h > c.max_image_pixels:
                raise ApiError(400, "image_too_large", f"image: {w}x{h} pixels, over the limit of {c.max_image_pixels}",
                               "image")
            return
        try:
            reader = video_lib.open_video(path)
        except video_lib.MediaError:
            return  # the predictor names it
        n, fps = reader.num_frames, reader.fps
        if n > c.max_video_frames or (fps and n / fps > c.max_video_seconds):
            raise ApiError(400, "video_too_long", f"video: {n} frames ({n / fps if fps else 0:.1f} s), over the limit "
                           f"of {c.max_video_frames} frames / {c.max_video_seconds:g} s", "video")

    def _sample(self, req: dict, media_file: str | None) -> schema.Sample:
        try:
            return req_lib.request_to_sample(req, 0, self.cfg.media_root, policy=self.policy, media_file=media_file)
        except req_lib.RequestError as e:
            raise ApiError(400, e.reason, str(e), e.field) from None
        except schema.SampleError as e:
            raise ApiError(400, e.reason, str(e), e.field) from None

    # -- the whole check

    def prepare(self, req: dict, media_file: str | None = None) -> PreparedRequest:
        """Runs in a worker thread. Raises `ApiError` (4xx) naming the field. `media_file`: the
        media, stored by an in-process caller (the demo's upload), read where it is."""
        self._check_request(req)
        rid = str(req["id"])
        modality = next((m for m in ("video", "image") if req.get(m)), None)
        upload = None
        try:
            if media_file is not None:
                sample = self._sample(req, media_file)
                media = media_file
            elif modality and isinstance(req[modality], str) and req[modality].startswith("data:"):
                upload = self._upload(modality, req[modality])
                sample = self._sample(dict(req, **{modality: f"upload{os.path.splitext(upload)[1]}"}), upload)
                media = upload
            else:
                sample = self._sample(req, None)
                media = sample.media if os.path.isabs(sample.media) else os.path.join(self.cfg.media_root, sample.media)
            self._check_media(sample.modality, media)
            try:
                p = self.predictor.prepare(sample, self.cfg.media_root, allow_absolute=True)
            except schema.SampleError as e:
                status = 404 if e.reason == "media_not_found" else 400
                raise ApiError(status, e.reason, str(e), e.field) from None
            except (ValueError, OSError) as e:
                raise ApiError(400, "bad_request", f"request {rid!r}: {e}") from None
        finally:
            if upload:
                os.unlink(upload)
        n = len(p.input_ids)
        if n > self.cfg.max_prompt_tokens:
            raise ApiError(400, "prompt_too_long", f"request {rid!r}: the prompt is {n} tokens, over the limit of "
                           f"{self.cfg.max_prompt_tokens}", "question")
        try:  # the family's batch checks on this request alone: a batch it joins cannot fail them
            batch, out_len = self.predictor.make_batch([p])  # rows: a multiple of the mesh's row shards
            self.predictor.family.validate(self.predictor.cfg, batch, out_len,
                                           sample_ids=[rid] * batch["input_ids"].shape[0])
        except ValueError as e:  # batch.BatchError (both families' checks raise it)
            raise ApiError(400, "bad_batch", f"request {rid!r}: {e}") from None
        return PreparedRequest(rid, p, n, list(p.warnings))


__all__ = ["ApiError", "AskBody", "ChatBody", "ChatMessage", "ContentPart", "ObjectSpec", "MaskSpec",
           "GenerationFields", "ask_request", "chat_request", "generation", "Preparer", "PreparedRequest"]
