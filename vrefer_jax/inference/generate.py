"""Jit-compiled autoregressive generation over a static KV cache.

One program per (model config, generation config without seed, input shapes):

  1. prefill: the prompt embeddings [B, P, E] (right padding, segment_ids 0 on pads) go through the
     decoder once; the cache (`qwen2.KVCache`, P + N slots, slots = positions) keeps only real
     tokens; each row's next-token logits come from its last real position (lengths - 1).
  2. decode: a `lax.while_loop` emits one token per row per step until every row has produced an
     EOS or N = max_new_tokens tokens; row b's t-th new token sits at position lengths[b] + t.
     Finished rows emit `pad_token_id`.

Entry points sharing the loop (`prefill` + `decode_steps`):
  * `generate_text`: a `qwen2.Qwen2ForCausalLM` parameter tree and token ids (the parity path).
  * `generate_multimodal`: a parameter tree of any registered family (`vrefer_jax.families`) and its
    contract batch (no labels needed); the family module's `embed_inputs` runs the encoders once,
    then the same loop.
  * `start_multimodal` + `continue_decode`: the multimodal path in pieces (prefill and step 0, then
    chunks of up to k steps over a donated `DecodeState`), so the host can read tokens as they come
    (streaming) and stop early; same tokens as `generate_multimodal`.

The prompt is fed as embeddings, as the official `mm_infer` does, so the repetition penalty sees
only the generated tokens. Compute runs in the model config's dtype; logits are fp32.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp

from vrefer_jax import families
from vrefer_jax.config import TextConfig
from vrefer_jax.inference.sampling import GenerationConfig, choose_tokens, process_logits
from vrefer_jax.models import qwen2
from vrefer_jax.sharding import constrain

_CACHE_AXES = (None, "activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim")


@flax.struct.dataclass
class GenerationOutput:
    """tokens [B, N] int32: new tokens, EOS included, `pad_token_id` after it.
    lengths [B] int32: new tokens per row, EOS included (so tokens[b, :lengths[b]] is the output).
    logprobs [B, N] fp32: log-softmax of the processed scores at the chosen token (0 after the end).
    scores [B, N, V] fp32 or None: the processed logits of every step (HF `output_scores`: after the
      repetition penalty and, when sampling, temperature / top-k / top-p; -inf where filtered);
      rows past their end hold the scores of their pad steps, steps never run hold zeros.
    """

    tokens: jax.Array
    lengths: jax.Array
    logprobs: jax.Array
    scores: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class DecoderFns:
    """How the loop talks to a model (all pure, `params` first).

    embed(params, ids [B, T]) -> [B, T, E];  decode(params, emb, positions, segment_ids, cache) ->
    (hidden [B, T, E], cache);  logits(params, hidden [B, T, E]) -> fp32 [B, T, V].
    """

    embed: Callable
    decode: Callable
    logits: Callable


def _constrain_cache(cache: qwen2.KVCache) -> qwen2.KVCache:
    return qwen2.KVCache(k=constrain(cache.k, _CACHE_AXES), v=constrain(cache.v, _CACHE_AXES),
                         valid=constrain(cache.valid, ("activation_batch", "activation_length")))


@flax.struct.dataclass
class DecodeState:
    """Everything the decode loop carries between steps, so it can stop after any step and resume.

    t: int32 scalar, the next step to run (1 after prefill: step 0 is chosen from the prefill logits).
    cache: the `qwen2.KVCache` of P + N slots. lengths [B] int32: real prompt tokens per row.
    rng: the sampling key (step t draws with `fold_in(rng, t)`). buffers: `tokens` [B, N], `logprobs`
    [B, N], `seen` [B, V] (ids generated so far, for the repetition penalty), `lengths` [B] (new
    tokens, EOS included), `done` [B], `last` [B] (the token fed to the next step), `scores`
    [B, N, V] with `return_scores`.
    """

    t: jax.Array
    cache: qwen2.KVCache
    lengths: jax.Array
    rng: jax.Array
    buffers: dict


def _select(t, logits, state, gen: GenerationConfig, rng):
    """Choose token t of every row from `logits` [B, V]; update the buffers."""
    rows = jnp.arange(logits.shape[0])
    eos = jnp.asarray(gen.eos_token_ids, jnp.int32)
    s = process_logits(logits, state["seen"], gen)
    tok = choose_tokens(s, gen, jax.random.fold_in(rng, t))
    active = ~state["done"]
    tok = jnp.where(active, tok, gen.pad_token_id)
    logp = jnp.take_along_axis(jax.nn.log_softmax(s, axis=-1), tok[:, None], axis=-1)[:, 0]
    out = dict(state)
    out["tokens"] = state["tokens"].at[:, t].set(tok)
    out["logprobs"] = state["logprobs"].at[:, t].set(jnp.where(active, logp, 0.0))
    out["seen"] = state["seen"].at[rows, tok].set(True)
    out["lengths"] = state["lengths"] + active.astype(jnp.int32)
    out["done"] = state["done"] | jnp.isin(tok, eos)
    out["last"] = tok
    if gen.return_scores:
        out["scores"] = state["scores"].at[:, t].set(s)
    return out


def prefill(
    fns: DecoderFns,
    params: Any,
    inputs_embeds: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array,
    lengths: jax.Array,
    text_cfg: TextConfig,
    gen: GenerationConfig,
    rng: jax.Array,
    cache_dtype: Any,
) -> DecodeState:
    """The prompt through the decoder once and step 0 chosen (traced inside a jitted caller).

    inputs_embeds [B, P, E] (activation_batch, activation_length, activation_embed); positions,
    segment_ids [B, P] (0 = padding, after the real tokens); lengths [B] >= 1 real tokens per row.
    """
    B, P = inputs_embeds.shape[:2]
    N = gen.max_new_tokens
    lengths = lengths.astype(jnp.int32)
    cache = _constrain_cache(qwen2.init_cache(text_cfg, B, P + N, cache_dtype))
    hidden, cache = fns.decode(params, inputs_embeds, positions, segment_ids, cache)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)  # [B, 1, E]
    logits = fns.logits(params, last)[:, 0]
    V = logits.shape[-1]
    state = dict(
        tokens=jnp.full((B, N), gen.pad_token_id, jnp.int32),
        logprobs=jnp.zeros((B, N), jnp.float32),
        seen=jnp.zeros((B, V), bool),
        lengths=jnp.zeros((B,), jnp.int32),
        done=jnp.zeros((B,), bool),
        last=jnp.zeros((B,), jnp.int32),
    )
    if gen.return_scores:
        state["scores"] = jnp.zeros((B, N, V), jnp.float32)
    return DecodeState(t=jnp.int32(1), cache=cache, lengths=lengths, rng=rng,
                       buffers=_select(0, logits, state, gen, rng))


def decode_steps(fns: DecoderFns, params: Any, ds: DecodeState, gen: GenerationConfig, stop) -> DecodeState:
    """Steps `ds.t` .. `stop - 1` (a traced int32; capped at N), or fewer when every row is done.
    Row b's t-th new token sits at position lengths[b] + t; finished rows emit `pad_token_id`."""
    B = ds.lengths.shape[0]
    stop = jnp.minimum(stop, gen.max_new_tokens)

    def cond(carry):
        t, _, state = carry
        return (t < stop) & ~jnp.all(state["done"])

    def body(carry):
        t, cache, state = carry
        emb = fns.embed(params, state["last"][:, None])
        pos = (ds.lengths + t - 1)[:, None]  # token t-1 sits at lengths + t - 1
        hidden, cache = fns.decode(params, emb, pos, jnp.ones((B, 1), jnp.int32), cache)
        logits = fns.logits(params, hidden)[:, 0]
        return t + 1, _constrain_cache(cache), _select(t, logits, state, gen, ds.rng)

    t, cache, state = jax.lax.while_loop(cond, body, (ds.t, ds.cache, ds.buffers))
    return ds.replace(t=t, cache=cache, buffers=state)


def _output(ds: DecodeState) -> GenerationOutput:
    b = ds.buffers
    return GenerationOutput(tokens=b["tokens"], lengths=b["lengths"], logprobs=b["logprobs"], scores=b.get("scores"))


def decode_loop(
    fns: DecoderFns,
    params: Any,
    inputs_embeds: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array,
    lengths: jax.Array,
    text_cfg: TextConfig,
    gen: GenerationConfig,
    rng: jax.Array,
    cache_dtype: Any,
) -> GenerationOutput:
    """Prefill + while-loop decode to the end (traced inside a jitted caller); arguments as `prefill`."""
    ds = prefill(fns, params, inputs_embeds, positions, segment_ids, lengths, text_cfg, gen, rng, cache_dtype)
    return _output(decode_steps(fns, params, ds, gen, jnp.int32(gen.max_new_tokens)))


# ----------------------------------------------------------------------------- text path


def _text_fns(cfg: TextConfig, dtype) -> DecoderFns:
    model = qwen2.Qwen2ForCausalLM(cfg, dtype=dtype)

    def apply(fn):
        return lambda params, *a: model.apply({"params": params}, *a, method=fn)

    return DecoderFns(embed=apply(lambda m, ids: m.model.embed(ids)),
                      decode=apply(lambda m, *a: m.model(*a)),
                      logits=apply(lambda m, h: m.lm_head(h)))


@functools.partial(jax.jit, static_argnames=("cfg", "gen", "dtype"))
def _generate_text(params, input_ids, lengths, rng, *, cfg: TextConfig, gen: GenerationConfig, dtype: str):
    fns = _text_fns(cfg, jnp.dtype(dtype))
    B, P = input_ids.shape
    segs = (jnp.arange(P)[None, :] < lengths[:, None]).astype(jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    emb = fns.embed(params, input_ids)
    return decode_loop(fns, params, emb, positions, segs, lengths, cfg, gen, rng, jnp.dtype(dtype))


def generate_text(
    cfg: TextConfig,
    params: Mapping,
    input_ids,
    lengths,
    gen: GenerationConfig,
    rng: jax.Array | None = None,
    dtype: str = "float32",
) -> GenerationOutput:
    """Generation with a `qwen2.Qwen2ForCausalLM` tree (`{model: ..., lm_head: ...}`).

    input_ids [B, P] int (right padded), lengths [B] real prompt tokens per row (>= 1).
    `rng` defaults to `jax.random.key(gen.seed)`.
    """
    rng = jax.random.key(gen.seed) if rng is None else rng
    return _generate_text(params, jnp.asarray(input_ids, jnp.int32), jnp.asarray(lengths, jnp.int32), rng,
                          cfg=cfg, gen=gen.static, dtype=str(jnp.dtype(dtype)))


# ----------------------------------------------------------------------------- multimodal path


def _model_fns(cfg) -> tuple[Any, DecoderFns]:
    model = families.for_config(cfg).module(cfg)
    cls = type(model)

    def apply(method):
        return lambda params, *a: model.apply({"params": params}, *a, method=method)

    return model, DecoderFns(embed=apply(cls.embed_tokens), decode=apply(cls.decode), logits=apply(cls.logits))


@functools.partial(jax.jit, static_argnames=("cfg", "gen", "out_len"))
def _generate_multimodal(params, batch, rng, *, cfg, gen: GenerationConfig, out_len: int):
    model, fns = _model_fns(cfg)
    inputs = model.apply({"params": params}, batch, out_len, method=type(model).embed_inputs)
    lengths = jnp.minimum(inputs["lengths"], out_len)  # `validate` guarantees no clipping
    return decode_loop(fns, params, inputs["inputs_embeds"], inputs["positions"], inputs["segment_ids"],
                       lengths, cfg.text, gen, rng, cfg.compute_dtype)


def generate_multimodal(
    cfg,
    params: Mapping,
    batch: Mapping[str, Any],
    out_len: int,
    gen: GenerationConfig,
    rng: jax.Array | None = None,
) -> GenerationOutput:
    """Generation from a contract batch of any registered family (`labels` not needed).

    cfg: a family config (`ModelConfig` for VideoRefer, `VL3Config` for VRVL3). `out_len`: static
    length of the LLM input after expansion (VRVL3 batches are expanded on the host: their L);
    check the batch with the family's `validate(cfg, batch, out_len)` first (the predictor does).
    """
    rng = jax.random.key(gen.seed) if rng is None else rng
    inputs = {k: batch[k] for k in input_keys(cfg)}
    return _generate_multimodal(params, inputs, rng, cfg=cfg, gen=gen.static, out_len=int(out_len))


# ----------------------------------------------------------------------------- chunked (streaming) path
#
# The same prefill and steps as `generate_multimodal`, split into jitted pieces so the host can read
# the tokens every `steps` steps (streaming) and stop a batch early: `start_multimodal` = encoders +
# prefill + step 0, `continue_decode` = up to `steps` more steps from a `DecodeState` (the KV cache
# and buffers are donated, so a chunk updates them in place). Chunk boundaries do not change the
# result: every step is the same computation as in the one-loop program.


@functools.partial(jax.jit, static_argnames=("cfg", "gen", "out_len"))
def _start_multimodal(params, batch, rng, *, cfg, gen: GenerationConfig, out_len: int) -> DecodeState:
    model, fns = _model_fns(cfg)
    inputs = model.apply({"params": params}, batch, out_len, method=type(model).embed_inputs)
    lengths = jnp.minimum(inputs["lengths"], out_len)
    return prefill(fns, params, inputs["inputs_embeds"], inputs["positions"], inputs["segment_ids"], lengths,
                   cfg.text, gen, rng, cfg.compute_dtype)


@functools.partial(jax.jit, static_argnames=("cfg", "gen", "steps"), donate_argnames=("ds",))
def _continue_decode(params, ds: DecodeState, *, cfg, gen: GenerationConfig, steps: int) -> DecodeState:
    _, fns = _model_fns(cfg)
    return decode_steps(fns, params, ds, gen, ds.t + steps)


def start_multimodal(cfg, params: Mapping, batch: Mapping[str, Any], out_len: int, gen: GenerationConfig,
                     rng: jax.Array | None = None) -> DecodeState:
    """Encoders + prefill + the first new token of a contract batch (arguments as
    `generate_multimodal`); continue with `continue_decode`."""
    rng = jax.random.key(gen.seed) if rng is None else rng
    inputs = {k: batch[k] for k in input_keys(cfg)}
    return _start_multimodal(params, inputs, rng, cfg=cfg, gen=gen.static, out_len=int(out_len))


def continue_decode(cfg, params: Mapping, ds: DecodeState, gen: GenerationConfig, steps: int) -> DecodeState:
    """Up to `steps` more decode steps (fewer at N or when every row is done). `ds` is donated: use
    only the returned state. One compiled program per `steps` value, whatever the step reached."""
    return _continue_decode(params, ds, cfg=cfg, gen=gen.static, steps=int(steps))


def decode_output(ds: DecodeState) -> GenerationOutput:
    """The `GenerationOutput` so far: tokens of steps >= `ds.t` are still `pad_token_id`."""
    return _output(ds)


def input_keys(cfg) -> tuple[str, ...]:
    """The batch fields generation reads for this config's family."""
    return families.for_config(cfg).input_keys


__all__ = ["GenerationOutput", "DecoderFns", "DecodeState", "prefill", "decode_steps", "decode_loop",
           "start_multimodal", "continue_decode", "decode_output", "generate_text", "generate_multimodal", "input_keys"]
