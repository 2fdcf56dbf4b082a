"""Qwen2 decoder (the VideoRefer LLM): GQA attention with RoPE, SwiGLU MLP, RMSNorm, KV cache.

Parameter tree of `Qwen2Model` (shapes, logical names); L = num_hidden_layers, E = hidden_size,
N / K = query / KV heads, H = head_dim, M = intermediate_size, V = vocab_size:

  embed_tokens/embedding                     [V, E]        (vocab, embed)
  layers/input_layernorm/scale               [L, E]        (layers, norm)
  layers/self_attn/q_proj/kernel, bias       [L, E, N, H], [L, N, H]   (layers, embed, heads, head_dim)
  layers/self_attn/{k,v}_proj/kernel, bias   [L, E, K, H], [L, K, H]   (layers, embed, kv_heads, head_dim)
  layers/self_attn/o_proj/kernel             [L, N, H, E]  (layers, heads, head_dim, embed)
  layers/post_attention_layernorm/scale      [L, E]
  layers/mlp/{gate,up}_proj/kernel           [L, E, M]     (layers, embed, mlp)
  layers/mlp/down_proj/kernel                [L, M, E]     (layers, mlp, embed)
  norm/scale                                 [E]           (norm)

`Qwen2ForCausalLM` adds `model/…` (the above) and, unless `cfg.tie_word_embeddings`, `lm_head/kernel
[E, V]` (embed, vocab). Tied (Qwen2.5-1.5B, the VRVL3-2B decoder): no `lm_head` parameter; the logits
are `hidden @ embed_tokens/embedding^T` (`tied_logits`, `Qwen2Model.attend`), as HF ties `lm_head.weight`
to `model.embed_tokens.weight`.

`cfg.rope_theta` sets the RoPE base. `cfg.max_position_embeddings` changes no value: with Qwen2's
default RoPE, HF uses it only to size a cached table, and positions past it are computed the same way.

Attention masks (boolean, True = may attend):
  * without a cache: key s is visible to query t iff s <= t (index order within the T tokens),
    both carry the same segment id and the key is not padding (segment 0). Packed sequences
    therefore never see each other.
  * with a cache: the T new real tokens are written into the cache at slots = their positions
    (which must be < S_max; padding tokens are not written at all, so pads may carry any position,
    e.g. left padding); query at position p sees slot j iff slot j holds a real token and j <= p.
    One rule serves prefill (T = prompt length), chunked prefill and decode (T = 1).
  A padding query (segment 0) would see nothing; it is given one harmless key (itself, or slot 0 with
  a cache) so that every attention kernel returns finite values. Its output is meaningless.

Without a cache, `TextConfig.attention_impl` other than 'dense' never builds the [B, 1, T, T] mask:
the layers get the segment ids and a blockwise / cuDNN / splash kernel applies the same rule
(`vrefer_jax.models.attention`). With a cache the dense cache mask is used whatever the setting.
"""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from vrefer_jax.config import TextConfig
from vrefer_jax.models import attention as attention_lib
from vrefer_jax.models import layers, precision
from vrefer_jax.models.layers import Dtype, dense
from vrefer_jax.sharding import constrain

_ACT = ("activation_batch", "activation_length", "activation_embed")
_Q_ACT = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
_KV_ACT = ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim")
_LOGITS = ("activation_batch", "activation_length", "activation_vocab")


# ----------------------------------------------------------------------------- KV cache


@flax.struct.dataclass
class KVCache:
    """Decoder KV cache.

    k, v:  [layers, B, S_max, kv_heads, head_dim] in the compute dtype (rotary already applied to k).
    valid: [B, S_max] bool, True where a slot holds a real (non-padding) token.
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]


def init_cache(cfg: TextConfig, batch: int, max_len: int, dtype: Dtype = jnp.float32) -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` positions."""
    shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   valid=jnp.zeros((batch, max_len), bool))


def _init(cfg: TextConfig):
    """HF's init of the decoder's weights: N(0, initializer_range)."""
    return nn.initializers.normal(stddev=cfg.initializer_range)


# ----------------------------------------------------------------------------- rotary


def rotary_tables(positions: jax.Array, head_dim: int, theta: float, dtype: Dtype):
    """positions [B, T] int -> (cos, sin) [B, T, head_dim] in `dtype`.

    Angles are computed in fp32 (`pos * inv_freq`, inv_freq[j] = theta^(-2j/head_dim)) and the
    tables cast to the activation dtype afterwards, as the official code does.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, heads, H]; cos/sin [B, T, H]. Rotate-half convention (halves, not pairs)."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin


# ----------------------------------------------------------------------------- masks


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """Mask without a cache. segment_ids [B, T] -> [B, 1, T, T] bool."""
    T = segment_ids.shape[1]
    idx = jnp.arange(T)
    causal = idx[None, :] <= idx[:, None]  # [T(query), T(key)]
    q_seg, k_seg = segment_ids[:, :, None], segment_ids[:, None, :]
    # Padding keys are hidden; a padding query keeps only itself (finite output under any kernel).
    mask = causal[None] & (q_seg == k_seg) & ((k_seg != 0) | (idx[:, None] == idx[None, :])[None])
    return mask[:, None]


def cache_mask(valid: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Mask over cache slots. valid [B, S] (after writing), positions/segment_ids [B, T] -> [B, 1, T, S]."""
    slots = jnp.arange(valid.shape[1])
    mask = valid[:, None, :] & (slots[None, None, :] <= positions[:, :, None])
    mask = mask | ((segment_ids[:, :, None] == 0) & (slots == 0)[None, None, :])
    return mask[:, None]


def write_slots(positions: jax.Array, segment_ids: jax.Array, max_len: int) -> jax.Array:
    """Cache slots the new tokens are written to: their positions; padding goes out of range (dropped)."""
    return jnp.where(segment_ids != 0, positions, max_len)


# ----------------------------------------------------------------------------- modules


class Qwen2Attention(nn.Module):
    """GQA self-attention with q/k/v biases and RoPE.

    x [B, T, E] -> [B, T, E]. With `kv` = (k_cache, v_cache) [B, S, K, H] the new keys/values are
    scattered into the cache at `slots` [B, T] (out-of-range slots are dropped) and the queries
    attend over the whole cache; the updated (k_cache, v_cache) is returned. `mask` is the boolean
    [B, 1, T, S] mask (dense attention, and always with a cache) or, for the segment kernels of
    `cfg.attention_impl`, the segment ids [B, T].
    """

    cfg: TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, mask, cos, sin, slots, kv):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_init(c), lora=c.lora)
        H = c.head_dim
        q = dense((c.num_attention_heads, H), ("embed", "heads", "head_dim"), name="q_proj", **kw)(x)
        k = dense((c.num_key_value_heads, H), ("embed", "kv_heads", "head_dim"), name="k_proj", **kw)(x)
        v = dense((c.num_key_value_heads, H), ("embed", "kv_heads", "head_dim"), name="v_proj", **kw)(x)
        q = constrain(apply_rotary(q, cos, sin), _Q_ACT)
        k = constrain(apply_rotary(k, cos, sin), _KV_ACT)
        v = constrain(v, _KV_ACT)
        if kv is not None:
            k_cache, v_cache = kv
            rows = jnp.arange(x.shape[0])[:, None]
            k = k_cache.at[rows, slots].set(k.astype(k_cache.dtype), mode="drop")
            v = v_cache.at[rows, slots].set(v.astype(v_cache.dtype), mode="drop")
            kv = (k, v)
            k, v = k.astype(self.dtype), v.astype(self.dtype)
        if mask.ndim == 2:  # segment ids: no materialised mask (module docstring)
            out = attention_lib.segment_attention(q, k, v, mask, impl=c.attention_impl, block=c.attention_block,
                                                  max_segments=c.attention_max_segments)
        else:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=self.attention_impl)
        out = constrain(out, _Q_ACT)
        out = dense(c.hidden_size, ("heads", "head_dim", "embed"), axis=(-2, -1), use_bias=False,
                    name="o_proj", **kw)(out)
        return out, kv


class Qwen2MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases. [B, T, E] -> [B, T, E]."""

    cfg: TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False, kernel_init=_init(self.cfg),
                  lora=self.cfg.lora)
        m = self.cfg.intermediate_size
        gate = dense(m, ("embed", "mlp"), name="gate_proj", **kw)(x)
        up = dense(m, ("embed", "mlp"), name="up_proj", **kw)(x)
        h = precision.f32_math(lambda g, u: nn.silu(g) * u, gate, up)  # one rounding, as PyTorch's kernels
        h = constrain(h, ("activation_batch", "activation_length", "activation_mlp"))
        return dense(self.cfg.hidden_size, ("mlp", "embed"), name="down_proj", **kw)(h)


class Qwen2DecoderLayer(nn.Module):
    """Pre-norm block; the scan body. Returns (x [B, T, E], kv or None)."""

    cfg: TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, mask, cos, sin, slots, kv):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.RMSNorm(c.rms_norm_eps, name="input_layernorm", **kw)(x)
        h, kv = Qwen2Attention(c, attention_impl=self.attention_impl, name="self_attn", **kw)(
            h, mask, cos, sin, slots, kv)
        x = constrain(x + h, _ACT)
        h = layers.RMSNorm(c.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
        x = constrain(x + Qwen2MLP(c, name="mlp", **kw)(h), _ACT)
        return x, kv


class Qwen2Model(nn.Module):
    """Embedding, scanned decoder layers and final norm (HF `Qwen2Model`)."""

    cfg: TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    attention_impl: str | None = None
    scan_unroll: int = 1  # layers per scan iteration (`ModelConfig.scan_unroll`)

    def setup(self):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_tokens = nn.Embed(
            c.vocab_size, c.hidden_size,
            embedding_init=nn.with_logical_partitioning(_init(c), ("vocab", "embed")), **kw)
        body = layers.maybe_remat(Qwen2DecoderLayer, self.remat_policy)
        self.layers = nn.scan(
            body,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},  # dropout: LoRA's, per layer
            # carry x; mask, cos, sin, slots shared by all layers; the cache's (k, v) scanned.
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
            out_axes=0,
            length=c.num_hidden_layers,
            unroll=min(self.scan_unroll, c.num_hidden_layers),
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(c, attention_impl=self.attention_impl, **kw)
        self.norm = layers.RMSNorm(c.rms_norm_eps, **kw)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """input_ids [B, L] int -> [B, L, E] in dtype. Out-of-range ids (negative placeholders) are
        clipped; the caller overwrites those rows."""
        ids = jnp.clip(input_ids, 0, self.cfg.vocab_size - 1)
        return constrain(self.embed_tokens(ids).astype(self.dtype), _ACT)

    def attend(self, hidden: jax.Array) -> jax.Array:
        """Tied output projection: hidden [B, T, E] -> fp32 logits [B, T, V] against this model's
        embedding table (`tied_logits`). For `cfg.tie_word_embeddings` models."""
        return tied_logits(self.embed_tokens.embedding, hidden, self.dtype)

    def __call__(
        self,
        inputs_embeds: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """inputs_embeds [B, T, E], positions [B, T] int, segment_ids [B, T] int (0 = padding)
        -> (hidden [B, T, E] after the final norm, updated cache or None). See the module docstring
        for the masks."""
        c = self.cfg
        x = constrain(inputs_embeds.astype(self.dtype), _ACT)
        positions = positions.astype(jnp.int32)
        cos, sin = rotary_tables(positions, c.head_dim, c.rope_theta, self.dtype)
        if cache is None:
            # the segment kernels take the ids themselves: no [B, 1, T, T] mask at long lengths
            mask = segment_mask(segment_ids) if c.attention_impl == "dense" else segment_ids.astype(jnp.int32)
            slots, kv, valid = None, None, None
        else:
            slots = write_slots(positions, segment_ids, cache.max_len)
            rows = jnp.arange(x.shape[0])[:, None]
            valid = cache.valid.at[rows, slots].set(True, mode="drop")
            mask, kv = cache_mask(valid, positions, segment_ids), (cache.k, cache.v)
        x, kv = self.layers(x, mask, cos, sin, slots, kv)
        x = constrain(self.norm(x), _ACT)
        if cache is not None:
            cache = KVCache(k=kv[0], v=kv[1], valid=valid)
        return x, cache


def tied_logits(embedding: jax.Array, hidden: jax.Array, dtype: Dtype = jnp.float32) -> jax.Array:
    """Logits of a tied head: hidden [B, T, E] (activation_batch, activation_length, activation_embed)
    and the embedding table [V, E] (vocab, embed) -> fp32 logits [B, T, V] (activation_batch,
    activation_length, activation_vocab).

    `hidden @ embedding^T` runs in `dtype`; the logits are upcast afterwards, like `LMHead`.
    """
    logits = jnp.einsum("bte,ve->btv", hidden.astype(dtype), embedding.astype(dtype)).astype(jnp.float32)
    return constrain(logits, _LOGITS)


class LMHead(nn.Module):
    """Untied output projection: [B, T, E] -> fp32 logits [B, T, V]; kernel [E, V] (embed, vocab).

    The matmul runs in `dtype`; the logits are upcast afterwards (as HF does for the loss).
    """

    cfg: TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(_init(self.cfg), ("embed", "vocab")),
            (self.cfg.hidden_size, self.cfg.vocab_size), self.param_dtype)
        logits = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype)).astype(jnp.float32)
        return constrain(logits, _LOGITS)


class Qwen2ForCausalLM(nn.Module):
    """HF `Qwen2ForCausalLM`: `model` (Qwen2Model) + `lm_head` (LMHead), or, with
    `cfg.tie_word_embeddings`, no `lm_head` and logits from `model.attend` (the embedding table)."""

    cfg: TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    attention_impl: str | None = None

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.model = Qwen2Model(self.cfg, remat_policy=self.remat_policy,
                                attention_impl=self.attention_impl, **kw)
        # Tied: the head is the embedding table itself, so there is no parameter to declare.
        self.lm_head = self.model.attend if self.cfg.tie_word_embeddings else LMHead(self.cfg, **kw)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [B, T, E] (after the final norm) -> fp32 logits [B, T, V], tied or not."""
        return self.lm_head(hidden)

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        inputs_embeds: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Exactly one of input_ids [B, T] / inputs_embeds [B, T, E]. positions default to
        arange(T), segment_ids to ones. -> (fp32 logits [B, T, V], cache)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.model.embed(input_ids)
        B, T = inputs_embeds.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if segment_ids is None:
            segment_ids = jnp.ones((B, T), jnp.int32)
        hidden, cache = self.model(inputs_embeds, positions, segment_ids, cache)
        return self.logits(hidden), cache


__all__ = [
    "KVCache", "init_cache", "Qwen2Model", "LMHead", "Qwen2ForCausalLM", "tied_logits",
    "rotary_tables", "apply_rotary",
]
