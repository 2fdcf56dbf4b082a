"""Causal self-attention over packed rows without a dense [B, 1, T, T] mask.

The decoder's mask without a KV cache (`qwen2.segment_mask`): query t sees key s iff s <= t, both
carry the same segment id and the key is not padding (segment 0); a padding query sees only itself.
`TextConfig.attention_impl` picks how it is computed:

  'dense'          the boolean mask materialised, `jax.nn.dot_product_attention` (any backend;
                   `ModelConfig.attention_impl` is its `implementation=` hint). O(T^2) memory.
  'xla_blockwise'  `blockwise_attention`: flash-style in pure JAX (online softmax over key blocks,
                   custom VJP that recomputes the scores block by block), O(T * block) memory,
                   any backend. Blocks that no query of a query block can see are skipped: those
                   above the diagonal, and those before the start of the block's first segment
                   (segments are contiguous runs, as the batch contract guarantees), so a packed
                   row costs about the sum of its segments' squares, not T^2.
  'cudnn'          cuDNN flash attention on GPU with the packed ("ragged") layout: per-row segment
                   offsets and lengths (`segment_offsets`) and a causal padding mask, through
                   `jax._src.cudnn.fused_attention_stablehlo.dot_product_attention` (the public
                   `jax.nn.dot_product_attention` of jax 0.10 only takes one length per row).
                   fp16 / bf16 only; at most `TextConfig.attention_max_segments` segments a row.
  'splash'         the Pallas TPU splash-attention kernel with `SegmentIds` and a `CausalMask`
                   (`make_splash_kernel`), under `shard_map` over the batch (and the heads where
                   the mesh's tensor axis divides them). Compiles on TPU only; `interpret=True`
                   runs it through the Pallas interpreter anywhere (tests).

All of them take q [B, T, N, H], k/v [B, T, K, H] (N a multiple of K: GQA) and segment_ids [B, T]
and return [B, T, N, H]; on real (non-padding) queries they agree (tests: dense vs blockwise in
fp32, forward and gradients; splash in interpret mode). Padding queries' outputs are finite but
meaningless. With a KV cache (prefill and decode in generation) the decoder always uses the dense
mask over the cache slots (`qwen2.cache_mask`): it is [B, 1, T, S_max], decoding has T = 1, and
prefill runs once per request.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vrefer_jax.config import ATTENTION_IMPLS as IMPLEMENTATIONS

_NEG = -1e30  # a finite "minus infinity": exp(_NEG - m) is 0 and never NaN


# ----------------------------------------------------------------------------- shared helpers


def segment_starts(segment_ids: jax.Array) -> jax.Array:
    """[B, T] -> the index where each position's segment run begins (contiguous segments)."""
    T = segment_ids.shape[1]
    idx = jnp.arange(T, dtype=jnp.int32)
    new = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    return jax.lax.cummax(jnp.where(new, idx[None], 0), axis=1)


def _block_mask(q0, k0, seg_q, seg_k):
    """The decoder mask of one (query block, key block) pair: [B, bq, bk] bool."""
    qpos = q0 + jnp.arange(seg_q.shape[1])
    kpos = k0 + jnp.arange(seg_k.shape[1])
    causal = kpos[None, :] <= qpos[:, None]
    diag = kpos[None, :] == qpos[:, None]
    same = seg_q[:, :, None] == seg_k[:, None, :]
    return causal[None] & same & ((seg_k[:, None, :] != 0) | diag[None])


# ----------------------------------------------------------------------------- blockwise (pure JAX)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, block: int = 512,
                        scale: float | None = None) -> jax.Array:
    """Flash-style causal segment attention in pure JAX (module docstring, 'xla_blockwise').

    q [B, T, N, H], k/v [B, T, K, H], segment_ids [B, T] int (0 = padding, contiguous segments)
    -> [B, T, N, H] in q's dtype. Scores and softmax statistics in fp32; peak memory O(B N T block)
    forward and backward. T is padded up to a multiple of `block` (padding = segment 0)."""
    B, T, N, H = q.shape
    scale = float(H ** -0.5 if scale is None else scale)
    bs = min(block, T)
    pad = (-T) % bs
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)))
    out = _flash(q, k, v, segment_ids.astype(jnp.int32), bs, scale)
    return out[:, :T]


def _split(q, k, v):
    B, T, N, H = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    return qg, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]


def _first_block(starts, q0, bs):
    """The first key block any query of the block at q0 can see (min over the batch)."""
    return jnp.min(jax.lax.dynamic_slice_in_dim(starts, q0, 1, axis=1)) // bs


def _scores(qi, kj, scale):
    return jnp.einsum("bkgqh,bksh->bkgqs", qi, kj, preferred_element_type=jnp.float32) * scale


def _flash_forward(q, k, v, seg, bs, scale):
    B, T, N, H = q.shape
    qg, kk, vv = _split(q, k, v)
    K, G = qg.shape[1], qg.shape[2]
    starts = segment_starts(seg)
    nb = T // bs

    def q_block(i):
        q0 = i * bs
        qi = jax.lax.dynamic_slice_in_dim(qg, q0, bs, axis=3)
        seg_q = jax.lax.dynamic_slice_in_dim(seg, q0, bs, axis=1)

        def body(j, carry):
            m, l, acc = carry
            k0 = j * bs
            kj = jax.lax.dynamic_slice_in_dim(kk, k0, bs, axis=2)
            vj = jax.lax.dynamic_slice_in_dim(vv, k0, bs, axis=2)
            mask = _block_mask(q0, k0, seg_q, jax.lax.dynamic_slice_in_dim(seg, k0, bs, axis=1))[:, None, None]
            s = jnp.where(mask, _scores(qi, kj, scale), _NEG)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            corr = jnp.exp(m - m_new)
            acc = acc * corr[..., None] + jnp.einsum("bkgqs,bksh->bkgqh", p.astype(vv.dtype), vj,
                                                     preferred_element_type=jnp.float32)
            return m_new, l * corr + p.sum(-1), acc

        init = (jnp.full((B, K, G, bs), _NEG, jnp.float32), jnp.zeros((B, K, G, bs), jnp.float32),
                jnp.zeros((B, K, G, bs, H), jnp.float32))
        m, l, acc = jax.lax.fori_loop(_first_block(starts, q0, bs), i + 1, body, init)
        return (acc / l[..., None]).astype(q.dtype), m + jnp.log(l)  # every query sees itself: l > 0

    outs, lses = jax.lax.map(q_block, jnp.arange(nb))  # [nb, B, K, G, bs, H], [nb, B, K, G, bs]
    out = outs.transpose(1, 0, 4, 2, 3, 5).reshape(B, T, N, H)
    lse = lses.transpose(1, 2, 3, 0, 4).reshape(B, K, G, T)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q, k, v, seg, bs, scale):
    return _flash_forward(q, k, v, seg, bs, scale)[0]


def _flash_fwd(q, k, v, seg, bs, scale):
    out, lse = _flash_forward(q, k, v, seg, bs, scale)
    return out, (q, k, v, seg, out, lse)


def _flash_bwd(bs, scale, res, dout):
    q, k, v, seg, out, lse = res
    B, T, N, H = q.shape
    qg, kk, vv = _split(q, k, v)
    K, G = qg.shape[1], qg.shape[2]
    dog = dout.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4)
    og = out.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4)
    delta = jnp.sum(dog.astype(jnp.float32) * og.astype(jnp.float32), -1)  # [B, K, G, T]
    starts = segment_starts(seg)
    nb = T // bs

    def q_body(i, carry):
        dq, dk, dv = carry
        q0 = i * bs
        qi = jax.lax.dynamic_slice_in_dim(qg, q0, bs, axis=3)
        doi = jax.lax.dynamic_slice_in_dim(dog, q0, bs, axis=3)
        lse_i = jax.lax.dynamic_slice_in_dim(lse, q0, bs, axis=3)
        d_i = jax.lax.dynamic_slice_in_dim(delta, q0, bs, axis=3)
        seg_q = jax.lax.dynamic_slice_in_dim(seg, q0, bs, axis=1)

        def k_body(j, c):
            dqi, dk, dv = c
            k0 = j * bs
            kj = jax.lax.dynamic_slice_in_dim(kk, k0, bs, axis=2)
            vj = jax.lax.dynamic_slice_in_dim(vv, k0, bs, axis=2)
            mask = _block_mask(q0, k0, seg_q, jax.lax.dynamic_slice_in_dim(seg, k0, bs, axis=1))[:, None, None]
            p = jnp.where(mask, jnp.exp(_scores(qi, kj, scale) - lse_i[..., None]), 0.0)  # [B, K, G, bq, bk]
            dv_j = jnp.einsum("bkgqs,bkgqh->bksh", p.astype(doi.dtype), doi, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bkgqh,bksh->bkgqs", doi, vj, preferred_element_type=jnp.float32)
            ds = p * (dp - d_i[..., None])
            dqi = dqi + jnp.einsum("bkgqs,bksh->bkgqh", ds.astype(kj.dtype), kj,
                                   preferred_element_type=jnp.float32) * scale
            dk_j = jnp.einsum("bkgqs,bkgqh->bksh", ds.astype(qi.dtype), qi, preferred_element_type=jnp.float32) * scale
            dk = jax.lax.dynamic_update_slice_in_dim(dk, jax.lax.dynamic_slice_in_dim(dk, k0, bs, axis=2) + dk_j, k0, 2)
            dv = jax.lax.dynamic_update_slice_in_dim(dv, jax.lax.dynamic_slice_in_dim(dv, k0, bs, axis=2) + dv_j, k0, 2)
            return dqi, dk, dv

        dqi, dk, dv = jax.lax.fori_loop(_first_block(starts, q0, bs), i + 1, k_body,
                                        (jnp.zeros((B, K, G, bs, H), jnp.float32), dk, dv))
        return jax.lax.dynamic_update_slice_in_dim(dq, dqi, q0, 3), dk, dv

    zeros_kv = jnp.zeros((B, K, T, H), jnp.float32)
    dq, dk, dv = jax.lax.fori_loop(0, nb, q_body, (jnp.zeros((B, K, G, T, H), jnp.float32), zeros_kv, zeros_kv))
    dq = dq.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q.dtype)
    return dq, dk.transpose(0, 2, 1, 3).astype(k.dtype), dv.transpose(0, 2, 1, 3).astype(v.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- cuDNN (GPU)


def segment_offsets(segment_ids: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array]:
    """cuDNN's packed layout of a batch of rows: (lengths [B, M], offsets [B, M + 1]) int32 for at
    most M = `max_segments` real segments per row (contiguous runs of nonzero ids, in row order),
    unused entries -1 (as `fused_attention_stablehlo.dot_product_attention` wants). A row with more
    than M segments would lose the rest: the loader's row budgets bound the samples per row, and
    `max_segments` must cover them."""
    B, T = segment_ids.shape
    starts = segment_starts(segment_ids)
    real = segment_ids > 0
    is_start = real & (starts == jnp.arange(T)[None])
    rank = jnp.cumsum(is_start, axis=1) - 1  # segment index of each start
    slot = jnp.where(is_start & (rank < max_segments), rank, max_segments + 1)  # others: out of range, dropped
    rows = jnp.arange(B)[:, None]
    offsets = jnp.full((B, max_segments + 1), -1, jnp.int32).at[rows, slot].set(
        jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)), mode="drop")
    seg_index = jnp.where(real, jnp.cumsum(is_start, axis=1) - 1, max_segments)
    lengths = jnp.zeros((B, max_segments + 1), jnp.int32).at[rows, seg_index].add(1, mode="drop")[:, :max_segments]
    lengths = jnp.where(offsets[:, :max_segments] >= 0, lengths, -1)
    return lengths, offsets


def cudnn_attention(q, k, v, segment_ids, *, max_segments: int, scale: float | None = None):
    """Causal segment attention with cuDNN's packed layout (GPU, fp16/bf16); see the module docstring."""
    if jax.default_backend() != "gpu":
        raise ValueError("TextConfig.attention_impl 'cudnn' needs a GPU backend (use 'xla_blockwise' elsewhere)")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"TextConfig.attention_impl 'cudnn' needs bf16/fp16 compute (ModelConfig.dtype), got {q.dtype}")
    from jax._src.cudnn import fused_attention_stablehlo as fa

    lengths, offsets = segment_offsets(segment_ids, max_segments)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    return fa.dot_product_attention(q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets,
                                    kv_offsets=offsets, scale=scale, mask_type=fa.MaskType.PADDING_CAUSAL,
                                    qkv_layout="BTNH")


# ----------------------------------------------------------------------------- splash (TPU)


def make_splash_kernel(num_heads: int, seq_len: int, *, block: int = 512, interpret: bool = False):
    """The splash-attention kernel for one row: a causal mask for every head, blocks of
    min(block, T) (T must be a multiple of it). Called as kernel(q [N, T, H], k/v [K, T, H],
    segment_ids=SegmentIds(q=[T], kv=[T])); the scale is applied to q beforehand."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    bs = min(block, seq_len)
    if seq_len % bs:
        raise ValueError(f"splash attention: T = {seq_len} is not a multiple of the block {bs}")
    mask = sa.MultiHeadMask([sa.CausalMask((seq_len, seq_len)) for _ in range(num_heads)])
    sizes = sa.BlockSizes(block_q=bs, block_kv=bs, block_kv_compute=bs, block_q_dkv=bs, block_kv_dkv=bs,
                          block_kv_dkv_compute=bs, block_q_dq=bs, block_kv_dq=bs)
    return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q, k, v, segment_ids, *, block: int = 512, scale: float | None = None,
                     interpret: bool = False, batch_axes=("data", "fsdp"), head_axis: str = "tensor"):
    """Causal segment attention with the Pallas TPU splash kernel (module docstring)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    from jax.sharding import PartitionSpec as P

    if not interpret and jax.default_backend() != "tpu":
        raise ValueError("TextConfig.attention_impl 'splash' needs a TPU backend (use 'xla_blockwise' elsewhere)")
    B, T, N, H = q.shape
    K = k.shape[2]
    scale = float(H ** -0.5 if scale is None else scale)
    seg = segment_ids.astype(jnp.int32)

    def local(q, k, v, seg):
        kernel = make_splash_kernel(q.shape[2], T, block=block, interpret=interpret)
        row = lambda q, k, v, s: kernel(q, k, v, segment_ids=sa.SegmentIds(q=s, kv=s))  # noqa: E731
        out = jax.vmap(row)((q * scale).transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), seg)
        return out.transpose(0, 2, 1, 3)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q, k, v, seg)
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    heads = head_axis if head_axis in mesh.axis_names and N % mesh.shape[head_axis] == 0 \
        and K % mesh.shape[head_axis] == 0 else None
    qs = P(axes, None, heads, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(qs, qs, qs, P(axes, None)), out_specs=qs,
                         check_vma=False)(q, k, v, seg)


# ----------------------------------------------------------------------------- dispatch


def segment_attention(q, k, v, segment_ids, *, impl: str, block: int = 512, max_segments: int = 16,
                      interpret: bool = False) -> jax.Array:
    """Causal segment attention without a materialised mask, by `impl` (not 'dense')."""
    if impl == "xla_blockwise":
        return blockwise_attention(q, k, v, segment_ids, block=block)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, segment_ids, max_segments=max_segments)
    if impl == "splash":
        return splash_attention(q, k, v, segment_ids, block=block, interpret=interpret)
    raise ValueError(f"segment_attention: no kernel {impl!r}")


__all__ = ["IMPLEMENTATIONS", "blockwise_attention", "cudnn_attention", "splash_attention", "segment_attention",
           "segment_offsets", "make_splash_kernel", "segment_starts"]
