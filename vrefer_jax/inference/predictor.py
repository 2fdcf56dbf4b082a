"""`Predictor`: validated samples -> answers, the official `mm_infer` path with static shapes.

Per sample (host), in memory: `convert.decode_sample` decodes and checks the media exactly as the
converter does (official 'v1' frame sampling, SigLIP resize, masks at full resolution), and the
loader's own per-sample transform (`loader.to_example`: normalisation, masks to the vision grid after
`pad_mask_to_square` in 'pad' mode) turns it into model arrays, so the model sees what training
with lossless records shows it. The question is the sample's first human turn without its
`<video>`/`<image>` tag, and the prompt is `build_inference_prompt` (the official chat prompt ending
in `<|im_start|>assistant\\n`). Batches are padded and stacked by `vrefer_jax.batch`.

Batches: samples are grouped by frame count (videos: `num_frames`; images: the model's
`num_frames`, as officially) and cut into `batch_size` rows in input order; the last batch is
filled with copies of its first row. Every dynamic size is rounded up to a bucket (powers of two:
text ids >= 32, region frames / objects / frames per object >= 1, the expanded prompt = video
tokens + a power of two >= 64 for the rest; floors configurable), so a benchmark compiles a handful of programs, not
one per sample.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from data_pipeline import convert as convert_lib
from data_pipeline import loader as loader_lib
from data_pipeline import schema
from vrefer_jax import batch as batch_lib
from vrefer_jax.config import ModelConfig
from vrefer_jax.inference.generate import generate_videorefer
from vrefer_jax.inference.sampling import GenerationConfig
from vrefer_jax.sharding import logical_axis_rules
from vrefer_jax.text.multimodal import build_inference_prompt
from vrefer_jax.text.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

_TAGS = {"video": "<video>", "image": "<image>"}
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")
# Smallest bucket per dynamic size: text ids, region frames, objects, frames per object, and the
# expanded prompt beyond the video tokens.
BUCKET_FLOORS = {"input_ids": 32, "region_frames": 1, "objects": 1, "object_frames": 1, "expanded": 64}


def next_pow2(n: int, minimum: int = 1) -> int:
    n = max(int(n), minimum)
    return 1 << (n - 1).bit_length()


def question_of(sample: schema.Sample) -> str:
    """The first human turn's text without the modal tag (a leading `<video>\\n` is the usual form;
    a tag elsewhere is removed as the official `preprocess_multimodal` would move it)."""
    turn = next((t for t in sample.conversations if schema.ROLES.get(t.get("from")) == "human"), None)
    if turn is None:
        raise schema.SampleError("bad_conversations", sample.sample_id, "conversations", "no human turn")
    text = turn["value"]
    tag = _TAGS.get(sample.modality)
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


class Predictor:
    """A VideoRefer model, its tokenizer and the batching / bucketing around `generate_videorefer`.

    Construct from memory (`Predictor(cfg, params, tokenizer)`) or a folder (`Predictor.load`).
    num_frames: frames sampled per video (the released Bench scripts use 8, training 16; default
      the model config's). aspect: 'square' or 'pad' (frames on a mean-colour square canvas, masks
      zero padded alike); default the model config's `image_aspect_ratio` (the checkpoint's).
    generation: the default `GenerationConfig` (default: `default_generation(...)`).
    bucket_floors: smallest bucket per size (see `BUCKET_FLOORS`); raise them to share one program
      between e.g. single- and multi-frame samples.
    mesh: a `(data, fsdp, tensor)` mesh (`sharding.make_mesh`) to serve on: the parameters are
      placed by the logical-axis rules (`rules`, default the table in force), generation runs under
      the mesh, so the KV cache and activations follow the same rules (heads / MLP over `tensor`,
      rows over data x fsdp). None: one device.
    """

    def __init__(self, cfg: ModelConfig, params: Mapping, tokenizer: Tokenizer, *, num_frames: int | None = None,
                 aspect: str | None = None, generation: GenerationConfig | None = None,
                 generation_config_dict: Mapping | None = None, bucket_floors: Mapping[str, int] | None = None,
                 allow_absolute_media: bool = False, mesh: jax.sharding.Mesh | None = None, rules=None):
        self.cfg, self.tokenizer = cfg, tokenizer
        unknown = set(bucket_floors or {}) - set(BUCKET_FLOORS)
        if unknown:
            raise ValueError(f"unknown bucket_floors keys {sorted(unknown)}; expected {sorted(BUCKET_FLOORS)}")
        self.bucket_floors = {**BUCKET_FLOORS, **(bucket_floors or {})}
        self.mesh, self.rules = mesh, (rules or logical_axis_rules()) if mesh is not None else None
        if mesh is None:
            self.params = jax.tree.map(jax.numpy.asarray, params)
        else:  # a no-op for leaves already restored into these shardings (`Predictor.load`)
            from vrefer_jax.checkpoints import store

            self.params = jax.device_put(params, store.param_shardings(cfg, mesh, self.rules))
        self.num_frames = int(num_frames or cfg.num_frames)
        self.aspect = aspect = aspect or cfg.image_aspect_ratio
        self.generation = generation or default_generation(tokenizer, generation_config_dict)
        if tokenizer.token_to_id("<region>") not in (None, cfg.region_token_id):
            raise ValueError(f"tokenizer's <region> id {tokenizer.region_id} != model region_token_id "
                             f"{cfg.region_token_id}")
        self._convert = convert_lib.ConvertConfig(num_frames=self.num_frames, image_size=cfg.vision.image_size,
                                                  aspect=aspect, image_format="png",
                                                  allow_absolute_media=allow_absolute_media)

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, checkpoint: str, tokenizer: str | None = None, *, vision_tower: str | None = None,
             use_stored_vision_tower: bool = False, dtype: str | None = None, mesh=None, rules=None,
             **kw) -> Predictor:
        """From an Orbax folder written by `vrefer-convert import` / `from-parts` (`params/` +
        `model_config.json`) or an official HF folder (imported on the fly; `vision_tower` /
        `use_stored_vision_tower` as in `vrefer-convert import`). `tokenizer` defaults to the
        checkpoint's (`<ckpt>/hf` for Orbax folders). `dtype` sets the compute dtype.
        `generation_config.json` is looked up in the checkpoint folder, then `<ckpt>/hf`. With a
        `mesh`, an Orbax folder is restored straight into the parameter shardings."""
        from vrefer_jax.checkpoints import hf_config, store

        if store.is_imported(checkpoint):
            cfg, params = store.load_imported(checkpoint, mesh=mesh, rules=rules)
            side = os.path.join(checkpoint, store.HF)
        elif os.path.isfile(os.path.join(checkpoint, "config.json")):
            from vrefer_jax.checkpoints.hf_import import import_videorefer

            cfg, params = import_videorefer(checkpoint, vision_tower_folder=vision_tower,
                                            use_stored_vision_tower=use_stored_vision_tower)
            side = checkpoint
        else:
            raise FileNotFoundError(f"{checkpoint}: neither {store.MODEL_CONFIG} (Orbax import) nor config.json")
        if dtype is not None:
            cfg = cfg.replace(dtype=dtype)
        if tokenizer is None:
            tokenizer = next((d for d in (side, checkpoint) if any(
                os.path.isfile(os.path.join(d, f)) for f in _TOKENIZER_FILES)), None)
            if tokenizer is None:
                raise FileNotFoundError(f"no tokenizer files in {checkpoint} or {side}: pass tokenizer=")
        tok = load_tokenizer(tokenizer)
        gen_dict = None
        for d in (checkpoint, side):
            p = os.path.join(d, "generation_config.json")
            if os.path.isfile(p):
                gen_dict = hf_config.read_json(p)
                break
        return cls(cfg, params, tok, generation_config_dict=gen_dict, mesh=mesh, rules=rules, **kw)

    # ------------------------------------------------------------------ host side

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

    def make_batch(self, prepared: Sequence[Prepared], batch_size: int | None = None) -> tuple[dict, int]:
        """Bucketed contract batch (no labels) and its static expanded length `out_len`.

        Rows past `len(prepared)` (up to `batch_size`, rounded up to a multiple of the mesh's row
        shards) repeat the first row."""
        rows = list(prepared) + [prepared[0]] * max(0, self._rows(batch_size or len(prepared)) - len(prepared))
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

    # ------------------------------------------------------------------ device side

    def generate_batch(self, batch: Mapping[str, Any], out_len: int, gen: GenerationConfig | None = None,
                       sample_ids: Sequence[str] | None = None, return_output: bool = False):
        """A prebuilt contract batch -> decoded answers (one per row), checked first with
        `batch.validate` (a `batch.BatchError` names the sample). With `return_output`, also
        the raw `GenerationOutput` (host numpy arrays)."""
        gen = gen or self.generation
        batch_lib.validate(self.cfg, batch, out_len, sample_ids=sample_ids)
        if self.mesh is None:
            out = generate_videorefer(self.cfg, self.params, batch, out_len, gen)
        else:
            with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
                out = generate_videorefer(self.cfg, self.params, batch, out_len, gen)
        out = jax.tree.map(np.asarray, out)
        texts = [self.decode(out.tokens[b, : out.lengths[b]]) for b in range(out.tokens.shape[0])]
        return (texts, out) if return_output else texts

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True).strip()

    def answer(self, samples: Sequence[schema.Sample], media_root: str, gen: GenerationConfig | None = None,
               batch_size: int = 1) -> list[str]:
        """Answers to the samples' first questions, in input order (raises `schema.SampleError` /
        `batch.BatchError` naming the sample)."""
        return self.answer_prepared([self.prepare(s, media_root) for s in samples], gen, batch_size)

    def answer_prepared(self, prepared: Sequence[Prepared], gen: GenerationConfig | None = None,
                        batch_size: int = 1) -> list[str]:
        """`answer` after `prepare` (grouped by frame count, bucketed, in input order)."""
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(prepared):
            groups.setdefault(p.frames.shape[0], []).append(i)
        answers: list[str] = [""] * len(prepared)
        for idx in groups.values():
            for start in range(0, len(idx), batch_size):
                chunk = idx[start:start + batch_size]
                batch, out_len = self.make_batch([prepared[i] for i in chunk], batch_size)
                ids = [prepared[i].sample_id for i in chunk]
                ids += [ids[0]] * (batch["input_ids"].shape[0] - len(ids))
                texts = self.generate_batch(batch, out_len, gen, sample_ids=ids)
                for i, t in zip(chunk, texts):
                    answers[i] = t
        return answers

    def _rows(self, n: int) -> int:
        """`n` rounded up to a multiple of data x fsdp, so rows split evenly over the mesh (one row
        over 4 row shards crashed XLA's CPU compiler, jax 0.10.2; `test_cli_mesh` runs that case)."""
        if self.mesh is None:
            return n
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        return -(-n // shards) * shards

    def configure(self, num_frames: int | None = None, aspect: str | None = None) -> Predictor:
        """Change the frame count / aspect mode in place (the parameters stay where they are)."""
        self.num_frames = int(num_frames or self.num_frames)
        self.aspect = aspect or self.aspect
        self._convert = dataclasses.replace(self._convert, num_frames=self.num_frames, aspect=self.aspect)
        return self


def _empty_mask_warnings(k: int, frames: Sequence[int], masks: np.ndarray) -> list[str]:
    """`empty_mask: object k` when none of object k's masks [M, H, W] has a pixel (the model then
    pools nothing for it), `empty_mask: object k frame f` for each empty mask of an otherwise visible one."""
    empty = ~masks.reshape(len(masks), -1).any(axis=1)
    if empty.all():
        return [f"empty_mask: object {k}"]
    return [f"empty_mask: object {k} frame {f}" for f, e in zip(frames, empty) if e]


def default_generation(tokenizer: Tokenizer, hf_generation_config: Mapping | None = None,
                       **overrides) -> GenerationConfig:
    """Official `mm_infer` decoding: the checkpoint's `generation_config.json` merged with
    `do_sample=False, max_new_tokens=2048` (so its repetition_penalty, 1.05 for VideoRefer-7B, stays
    active), stopping on its eos ids plus the tokenizer's eos (`<|im_end|>`, the official keyword
    criterion). Without a file: Qwen2-Instruct's values (what VideoRefer-7B ships), eos from the
    tokenizer."""
    from vrefer_jax.checkpoints import hf_config

    ids = hf_config.special_token_ids(tokenizer)
    if hf_generation_config is None:
        log.warning("no generation_config.json: using Qwen2-Instruct's (repetition_penalty %s)",
                    hf_config.QWEN2_SAMPLING["repetition_penalty"])
        hf_generation_config = hf_config.generation_config(eos_token_id=ids["eos_token_id"],
                                                           pad_token_id=ids["pad_token_id"])
    kw = dict(do_sample=False, max_new_tokens=2048)
    kw.update(overrides)
    gen = GenerationConfig.from_hf_dict(dict(hf_generation_config), **kw)
    eos = tuple(dict.fromkeys(gen.eos_token_ids + (tokenizer.eos_id,)))
    return gen.replace(eos_token_ids=eos)


__all__ = ["Predictor", "Prepared", "default_generation", "question_of", "next_pow2"]
