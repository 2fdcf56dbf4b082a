"""`Predictor`: validated samples -> answers, the official `mm_infer` path with static shapes.

The model family (`vrefer_jax.families`, chosen by the config's class) supplies the host side: how a
sample is decoded, prompted and padded into bucketed batches (`family.host`: VideoRefer-7B's in
`videorefer_host.py`, VRVL3's in `vl3_host.py`) and how a batch is checked. The predictor owns what
is common: parameters (on one device or a mesh), the generation config, grouping samples into
batches in input order (the last batch filled with copies of its first row, rows rounded up to the
mesh's row shards) and decoding the answers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from data_pipeline import schema
from vrefer_jax import families
from vrefer_jax.inference import generate as gen_lib
from vrefer_jax.inference.generate import generate_multimodal
from vrefer_jax.inference.sampling import GenerationConfig
from vrefer_jax.sharding import logical_axis_rules
from vrefer_jax.text.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


@dataclasses.dataclass(frozen=True)
class StreamStep:
    """Progress of a streamed batch: `steps` decode steps ran; tokens [B, N] (pad_token_id past
    each row's end and for steps not run yet), lengths [B] new tokens per row (EOS included), done
    [B] rows that emitted EOS. Host numpy arrays."""

    steps: int
    tokens: np.ndarray
    lengths: np.ndarray
    done: np.ndarray


class Predictor:
    """A model of any registered family, its tokenizer and the batching around `generate_multimodal`.

    Construct from memory (`Predictor(cfg, params, tokenizer)`) or a folder (`Predictor.load`).
    host_options: the family host's options (VideoRefer: `num_frames`, `aspect`; see its host class).
    generation: the default `GenerationConfig` (default: `default_generation(...)`).
    bucket_floors: smallest bucket per size (the host's `BUCKET_FLOORS`); raise them to share one
      program between e.g. single- and multi-frame samples.
    mesh: a `(data, fsdp, tensor)` mesh (`sharding.make_mesh`) to serve on: the parameters are
      placed by the logical-axis rules (`rules`, default the table in force), generation runs under
      the mesh, so the KV cache and activations follow the same rules (heads / MLP over `tensor`,
      rows over data x fsdp). None: one device.
    """

    def __init__(self, cfg, params: Mapping, tokenizer: Tokenizer, *, generation: GenerationConfig | None = None,
                 generation_config_dict: Mapping | None = None, bucket_floors: Mapping[str, int] | None = None,
                 allow_absolute_media: bool = False, mesh: jax.sharding.Mesh | None = None, rules=None,
                 **host_options):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.family = families.for_config(cfg)
        self.mesh, self.rules = mesh, (rules or logical_axis_rules()) if mesh is not None else None
        if mesh is None:
            self.params = jax.tree.map(jax.numpy.asarray, params)
        else:  # a no-op for leaves already restored into these shardings (`Predictor.load`)
            from vrefer_jax.checkpoints import store

            self.params = jax.device_put(params, store.param_shardings(cfg, mesh, self.rules))
        self.generation = generation or default_generation(tokenizer, generation_config_dict)
        self.host = self.family.host(cfg, tokenizer, bucket_floors=bucket_floors,
                                     allow_absolute_media=allow_absolute_media, **host_options)

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
            # an official folder, imported in memory by the family its `model_type` names
            family = families.for_model_type(hf_config.find_config(checkpoint).get("model_type"))
            opts = {k: v for k, v in (("vision_tower_folder", vision_tower),
                                      ("use_stored_vision_tower", use_stored_vision_tower)) if v}
            cfg, params = family.load_hf(checkpoint, **opts)
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
        tok = families.for_config(cfg).load_tokenizer(tokenizer)
        gen_dict = None
        for d in (checkpoint, side):
            p = os.path.join(d, "generation_config.json")
            if os.path.isfile(p):
                gen_dict = hf_config.read_json(p)
                break
        return cls(cfg, params, tok, generation_config_dict=gen_dict, mesh=mesh, rules=rules, **kw)

    # ------------------------------------------------------------------ host side (the family's)

    def prepare(self, sample: schema.Sample, media_root: str, allow_absolute: bool = False):
        """Decode the media and tokenise the prompt of one sample in memory (raises
        `schema.SampleError` naming the sample); the media path must stay inside `media_root` unless
        `allow_absolute` or the predictor's `allow_absolute_media`."""
        return self.host.prepare(sample, media_root, allow_absolute)

    def make_batch(self, prepared: Sequence[Any], batch_size: int | None = None) -> tuple[dict, int]:
        """Bucketed contract batch (no labels) and its static LLM input length `out_len`. Rows past
        `len(prepared)` (up to `batch_size`, rounded up to a multiple of the mesh's row shards)
        repeat the first row."""
        rows = list(prepared) + [prepared[0]] * max(0, self._rows(batch_size or len(prepared)) - len(prepared))
        return self.host.make_batch(rows)

    @property
    def num_frames(self) -> int:
        return self.host.num_frames

    @property
    def aspect(self) -> str | None:
        return getattr(self.host, "aspect", None)

    # ------------------------------------------------------------------ device side

    def generate_batch(self, batch: Mapping[str, Any], out_len: int, gen: GenerationConfig | None = None,
                       sample_ids: Sequence[str] | None = None, return_output: bool = False):
        """A prebuilt contract batch -> decoded answers (one per row), checked first with
        `batch.validate` (a `batch.BatchError` names the sample). With `return_output`, also
        the raw `GenerationOutput` (host numpy arrays)."""
        gen = gen or self.generation
        self.family.validate(self.cfg, batch, out_len, sample_ids=sample_ids)
        with self._on_mesh():
            out = generate_multimodal(self.cfg, self.params, batch, out_len, gen)
        out = jax.tree.map(np.asarray, out)
        texts = [self.decode(out.tokens[b, : out.lengths[b]]) for b in range(out.tokens.shape[0])]
        return (texts, out) if return_output else texts

    def stream_batch(self, batch: Mapping[str, Any], out_len: int, gen: GenerationConfig | None = None,
                     chunk: int = 8, sample_ids: Sequence[str] | None = None) -> Iterator[StreamStep]:
        """`generate_batch` read every `chunk` decode steps: yields a `StreamStep` (host arrays)
        after the first token, then after each chunk, until every row is done or N steps ran. The
        tokens equal `generate_batch`'s (same steps, same programs per step). Closing the generator
        early (all rows past their own limits, a shutdown) stops decoding after the current chunk."""
        gen = gen or self.generation
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.family.validate(self.cfg, batch, out_len, sample_ids=sample_ids)
        with self._on_mesh():
            ds = gen_lib.start_multimodal(self.cfg, self.params, batch, out_len, gen)
        while True:
            b = jax.device_get({k: ds.buffers[k] for k in ("tokens", "lengths", "done")})
            step = StreamStep(steps=int(ds.t), tokens=b["tokens"], lengths=b["lengths"], done=b["done"])
            yield step
            if step.steps >= gen.max_new_tokens or step.done.all():
                return
            with self._on_mesh():
                ds = gen_lib.continue_decode(self.cfg, self.params, ds, gen, chunk)

    def _on_mesh(self):
        """The mesh and logical-axis rules in force for one device call (nothing without a mesh)."""
        if self.mesh is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True).strip()

    def answer(self, samples: Sequence[schema.Sample], media_root: str, gen: GenerationConfig | None = None,
               batch_size: int = 1) -> list[str]:
        """Answers to the samples' first questions, in input order (raises `schema.SampleError` /
        `batch.BatchError` naming the sample)."""
        return self.answer_prepared([self.prepare(s, media_root) for s in samples], gen, batch_size)

    def answer_prepared(self, prepared: Sequence[Any], gen: GenerationConfig | None = None,
                        batch_size: int = 1) -> list[str]:
        """`answer` after `prepare` (grouped by frame count, bucketed, in input order)."""
        groups: dict[Any, list[int]] = {}
        for i, p in enumerate(prepared):
            groups.setdefault(self.host.group_key(p), []).append(i)
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

    def configure(self, **options) -> Predictor:
        """Change host options in place (VideoRefer: `num_frames`, `aspect`; VRVL3: `fps`,
        `max_frames`); the parameters stay where they are."""
        self.host.configure(**{k: v for k, v in options.items() if v is not None})
        return self


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


__all__ = ["Predictor", "StreamStep", "default_generation"]
