"""Generation settings and the per-step logits processing (Hugging Face semantics).

Order of one step, as HF `generate` applies its processors and warpers:
  repetition penalty -> (sampling only) temperature -> top-k -> top-p -> argmax / categorical draw.

Every function works on fp32 logits [B, V] (axes: activation_batch, activation_vocab) and is pure,
so it runs inside the jitted decode loop.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf
# Official Qwen2 ids: <|im_end|> (the tokenizer's eos) and <|endoftext|> (also the pad id).
QWEN2_EOS_IDS = (151645, 151643)
QWEN2_PAD_ID = 151643


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings (the fields of HF `GenerationConfig` that `mm_infer` uses).

    max_new_tokens: static length of the output buffer / the decode loop bound.
    do_sample: False = greedy (temperature / top_k / top_p are then ignored, as in HF).
    temperature, top_k (0 = off), top_p (1.0 = off): HF warpers, applied only when sampling.
    repetition_penalty: HF `RepetitionPenaltyLogitsProcessor` over the *generated* tokens (the prompt
      is passed as embeddings, exactly as the official `mm_infer` does; 1.0 = off).
    eos_token_ids: any of these ends a row (the EOS itself is emitted, then `pad_token_id`).
    seed: PRNG seed for sampling (not part of the compiled program).
    return_scores: also return the processed logits of every step ([B, N, V], large).
    """

    max_new_tokens: int = 2048
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_ids: tuple[int, ...] = QWEN2_EOS_IDS
    pad_token_id: int = QWEN2_PAD_ID
    seed: int = 0
    return_scores: bool = False

    def __post_init__(self):
        if isinstance(self.eos_token_ids, int):
            object.__setattr__(self, "eos_token_ids", (self.eos_token_ids,))
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.do_sample:
            if self.temperature <= 0:
                raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
            if not 0.0 < self.top_p <= 1.0:
                raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
            if self.top_k < 0:
                raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    def replace(self, **kw) -> GenerationConfig:
        return dataclasses.replace(self, **kw)

    @property
    def static(self) -> GenerationConfig:
        """This config without the seed: the part that shapes the compiled program."""
        return self.replace(seed=0)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides) -> GenerationConfig:
        """Fields of a HF `generation_config.json` dict (unknown keys ignored), then `overrides`."""
        kw: dict[str, Any] = {}
        for key in ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
                    "pad_token_id"):
            if d.get(key) is not None:
                kw[key] = d[key]
        eos = d.get("eos_token_id")
        if eos is not None:
            kw["eos_token_ids"] = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
            kw.setdefault("pad_token_id", kw["eos_token_ids"][0])
        kw.setdefault("top_k", 50)  # HF's default when the file has none (used only when sampling)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_hf_file(cls, path: str, **overrides) -> GenerationConfig:
        """Read a HF `generation_config.json` (a file or a folder holding one)."""
        if os.path.isdir(path):
            path = os.path.join(path, "generation_config.json")
        with open(path, encoding="utf-8") as f:
            return cls.from_hf_dict(json.load(f), **overrides)


# ----------------------------------------------------------------------------- processors


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """HF semantics: for every id already generated (once, whatever its multiplicity) a negative
    logit is multiplied by `penalty` and a positive one divided by it.

    logits [B, V] fp32; seen [B, V] bool (True where the id occurs among the generated tokens).
    """
    if penalty == 1.0:
        return logits
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def apply_temperature(logits: jax.Array, temperature: float) -> jax.Array:
    return logits if temperature == 1.0 else logits / temperature


def apply_top_k(logits: jax.Array, top_k: int) -> jax.Array:
    """Keep logits >= the k-th largest (ties at the threshold survive, as in HF); others -inf."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    return jnp.where(logits < kth, NEG_INF, logits)


def apply_top_p(logits: jax.Array, top_p: float) -> jax.Array:
    """HF nucleus filter: sort ascending, drop tokens whose cumulative probability is <= 1 - top_p,
    always keep the most likely one."""
    if top_p >= 1.0:
        return logits
    order = jnp.argsort(logits, axis=-1)  # ascending
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove = (cum <= 1.0 - top_p).at[..., -1].set(False)
    # Back to vocabulary order: position order[j] gets remove[j].
    rows = jnp.arange(logits.shape[0])[:, None]
    remove = jnp.zeros_like(remove).at[rows, order].set(remove)
    return jnp.where(remove, NEG_INF, logits)


def process_logits(logits: jax.Array, seen: jax.Array, gen: GenerationConfig) -> jax.Array:
    """The scores HF would report (`output_scores`): penalty, then the sampling warpers."""
    logits = apply_repetition_penalty(logits.astype(jnp.float32), seen, gen.repetition_penalty)
    if gen.do_sample:
        logits = apply_top_p(apply_top_k(apply_temperature(logits, gen.temperature), gen.top_k), gen.top_p)
    return logits


def choose_tokens(scores: jax.Array, gen: GenerationConfig, key: jax.Array | None) -> jax.Array:
    """Processed scores [B, V] -> token ids [B] int32: argmax (first max on ties, like torch) or a
    categorical draw with `key`."""
    if gen.do_sample:
        return jax.random.categorical(key, scores, axis=-1).astype(jnp.int32)
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)


__all__ = [
    "GenerationConfig", "QWEN2_EOS_IDS", "QWEN2_PAD_ID", "apply_repetition_penalty", "apply_temperature",
    "apply_top_k", "apply_top_p", "process_logits", "choose_tokens",
]
