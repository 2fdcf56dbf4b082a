"""VideoRefer-7B host side for the predictor: decode, prompt, pad into buckets.

Per sample, in memory: `convert.decode_sample` decodes and checks the media exactly as the converter
does (official 'v1' frame sampling, SigLIP resize, masks at full resolution), and the loader's own
per-sample transform (`loader.to_example`: normalisation, masks to the vision grid after
`pad_mask_to_square` in 'pad' mode) turns it into model arrays, so the model sees what training with
lossless records shows it. The question is the sample's first human turn without its
`<video>`/`<image>` tag, and the prompt is `build_inference_prompt` (the official chat prompt ending
in `<|im_start|>assistant\\n`). Batches are padded and stacked by `vrefer_jax.batch`.

Buckets: rows of one batch share a frame count (videos: `num_frames`; images: the model's
`num_frames`, as officially); every dynamic size is rounded up to a power of two (text ids >= 32,
region frames / objects / frames per object >= 1, the expanded prompt = video tokens + a power of
two >= 64 for the rest; floors configurable), so a benchmark compiles a handful of programs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from data_pipeline import convert as convert_lib
from data_pipeline import loader as loader_lib
from data_pipeline import schema
from vrefer_jax import batch as batch_lib
from vrefer_jax.config import ModelConfig
from vrefer_jax.text.multimodal import build_inference_prompt
from vrefer_jax.text.tokenizer import Tokenizer

_TAGS = {"video": "<video>", "image": "<image>"}
# Smallest bucket per dynamic size: text ids, region frames, objects, frames per object, and the
# expanded prompt beyond the video tokens.
BUCKET_FLOORS = {"input_ids": 32, "region_frames": 1, "objects": 1, "object_frames": 1, "expanded": 64}


def next_pow2(n: int, minimum: int = 1) -> int:
    n = max(int(n), minimum)
    return 1 << (n - 1).bit_length()

def question_of(sample: schema.Sample) -> str | list[dict]:
    """The prompt's question without the modal tag (a leading `<video>\\n` is the usual form; a tag
    elsewhere is removed as the official `preprocess_multimodal` would move it): the first human
    turn's text, or for a chat (`schema.prompt_turns`: earlier turns, then an empty gpt turn) the
    message list up to the question, the tag moved to its first message."""
    turns = schema.prompt_turns(sample)
    if not turns:
        raise schema.SampleError("bad_conversations", sample.sample_id, "conversations", "no human turn")
    if len(turns) > 1:
        return [{"role": "user" if schema.ROLES[t["from"]] == "human" else "assistant",
                 "content": _untagged(t["value"], sample.modality)} for t in turns]
    return _untagged(turns[0]["value"], sample.modality)


def _untagged(text: str, modality: str) -> str:
    tag = _TAGS.get(modality)
    if tag is None:
        return text
    if text.startswith(tag + "\n"):
        return text[len(tag) + 1:]
    return text.replace(tag, "").strip()


@dataclasses.dataclass
class Prepared(batch_lib.Example):
    """One sample on the host, before batching (a `batch.Example` without labels, arrays unpadded)."""

    # e.g. "empty_mask: object 0": answered, but the object has no pixel to look at (the CLI reports it)
    warnings: list[str] = dataclasses.field(default_factory=list)


class VideoReferHost:
    """num_frames: frames sampled per video (the released Bench scripts use 8, training 16; default
    the model config's). aspect: 'square' or 'pad' (frames on a mean-colour square canvas, masks
    zero padded alike); default the model config's `image_aspect_ratio` (the checkpoint's).
    bucket_floors: smallest bucket per size (see `BUCKET_FLOORS`); raise them to share one program
    between e.g. single- and multi-frame samples."""

    def __init__(self, cfg: ModelConfig, tokenizer: Tokenizer, *, num_frames: int | None = None,
                 aspect: str | None = None, bucket_floors: Mapping[str, int] | None = None,
                 allow_absolute_media: bool = False):
        self.cfg, self.tokenizer = cfg, tokenizer
        unknown = set(bucket_floors or {}) - set(BUCKET_FLOORS)
        if unknown:
            raise ValueError(f"unknown bucket_floors keys {sorted(unknown)}; expected {sorted(BUCKET_FLOORS)}")
        self.bucket_floors = {**BUCKET_FLOORS, **(bucket_floors or {})}
        self.num_frames = int(num_frames or cfg.num_frames)
        self.aspect = aspect = aspect or cfg.image_aspect_ratio
        if tokenizer.token_to_id("<region>") not in (None, cfg.region_token_id):
            raise ValueError(f"tokenizer's <region> id {tokenizer.region_id} != model region_token_id "
                             f"{cfg.region_token_id}")
        self._convert = convert_lib.ConvertConfig(num_frames=self.num_frames, image_size=cfg.vision.image_size,
                                                  aspect=aspect, image_format="png",
                                                  allow_absolute_media=allow_absolute_media)

    def prepare(self, sample: schema.Sample, media_root: str, allow_absolute: bool = False) -> Prepared:
        """Decode the media and tokenise the prompt of one sample (raises `schema.SampleError`).

        The media path must stay inside `media_root` (`media_outside_root`), as in the converter;
        absolute paths are read as given with `allow_absolute` (requests whose paths were already
        checked) or the predictor's `allow_absolute_media`. Nothing is encoded: the decoded frames
        and masks go through the loader's per-sample transform in memory."""
        conv = dataclasses.replace(self._convert, allow_absolute_media=True) if allow_absolute else self._convert
        d = convert_lib.decode_sample(sample, media_root, conv)
        modal = sample.modality if sample.modality in _TAGS else "text"
        ids = build_inference_prompt(self.tokenizer, question_of(sample), modal)
        masks = [o.decode() for o in d.objects]
        # videos give num_frames frames; an image is repeated to the model's num_frames (official)
        T = self.num_frames if sample.modality == "video" else self.cfg.num_frames
        ex = loader_lib.to_example(sample.sample_id, sample.modality, d.frames, d.region_frames,
                                   [(o.region_index, m) for o, m in zip(d.objects, masks)], ids,
                                   num_frames=T, image_size=self.cfg.vision.image_size,
                                   grid=self.cfg.vision.grid, aspect=self.aspect)
        warnings = [w for k, (o, m) in enumerate(zip(d.objects, masks)) for w in _empty_mask_warnings(k, o.frames, m)]
        return Prepared(**{f.name: getattr(ex, f.name) for f in dataclasses.fields(ex)}, warnings=warnings)

    def expanded_length(self, p: Prepared) -> int:
        """Worst-case LLM input length of a prepared sample (`batch.expanded_length`)."""
        return batch_lib.expanded_length(
            p.input_ids, [len(f) for f in p.object_frames], region_token_id=self.cfg.region_token_id,
            num_video_tokens=batch_lib.model_video_tokens(self.cfg, p.frames.shape[0]),
            region_token_num=self.cfg.object_encoder.region_token_num)

    def make_batch(self, rows: Sequence[Prepared]) -> tuple[dict, int]:
        """Bucketed contract batch (no labels) of exactly these rows, and its static expanded
        length `out_len`."""
        T = rows[0].frames.shape[0]
        if any(r.frames.shape[0] != T for r in rows):
            raise ValueError("all rows of a batch need the same frame count")
        fl = self.bucket_floors
        sizes = [r.sizes() for r in rows]
        dims = {k: next_pow2(max(sz[k] for sz in sizes), fl[{"seq_len": "input_ids"}.get(k, k)])
                for k in ("seq_len", "region_frames", "objects", "object_frames")}
        nv = batch_lib.model_video_tokens(self.cfg, T)
        out_len = nv + next_pow2(max(self.expanded_length(r) for r in rows) - nv, fl["expanded"])
        batch = batch_lib.stack([batch_lib.pad_example(r, **dims, mask_size=self.cfg.vision.grid,
                                                       pad_token_id=self.cfg.pad_token_id) for r in rows])
        del batch["sample_ids"]
        return batch, out_len


    def group_key(self, p: Prepared) -> int:
        """Rows of one batch share their frame count."""
        return p.frames.shape[0]

    def configure(self, num_frames: int | None = None, aspect: str | None = None) -> None:
        self.num_frames = int(num_frames or self.num_frames)
        self.aspect = aspect or self.aspect
        self._convert = dataclasses.replace(self._convert, num_frames=self.num_frames, aspect=self.aspect)


def _empty_mask_warnings(k: int, frames: Sequence[int], masks: np.ndarray) -> list[str]:
    """`empty_mask: object k` when none of object k's masks [M, H, W] has a pixel (the model then
    pools nothing for it), `empty_mask: object k frame f` for each empty mask of an otherwise visible one."""
    empty = ~masks.reshape(len(masks), -1).any(axis=1)
    if empty.all():
        return [f"empty_mask: object {k}"]
    return [f"empty_mask: object {k} frame {f}" for f, e in zip(frames, empty) if e]
