"""Decoder attention implementations (`vrefer_jax.models.attention`, `TextConfig.attention_impl`).

What must hold on CPU: the blockwise flash attention equals the dense masked one on every real query,
forward and gradients, in fp32 to a tight tolerance (GQA, packed rows with padding, T not a multiple
of the block, a block larger than T); whole decoders agree; generation with a KV cache is unchanged
(it is dense over the cache whatever the setting); the splash kernel (Pallas, run by the interpreter
here) builds a causal multi-head mask and agrees with dense; the cuDNN packed layout (offsets and
lengths) is right and the kernel refuses a non-GPU backend in one clear line."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vrefer_jax.config import TextConfig
from vrefer_jax.models import attention, qwen2


def _segments(B, T, layouts):
    seg = np.zeros((B, T), np.int32)
    for b, lens in enumerate(layouts):
        pos = 0
        for s, n in enumerate(lens, start=1):
            seg[b, pos:pos + n] = s
            pos += n
    return jnp.asarray(seg)


def _qkv(rng, B, T, N, K, H, dtype=jnp.float32):
    f = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)  # noqa: E731
    return f(B, T, N, H), f(B, T, K, H), f(B, T, K, H)


def _dense(q, k, v, seg):
    return jax.nn.dot_product_attention(q, k, v, mask=qwen2.segment_mask(seg))


CASES = [  # (T, block, N, K, per-row segment lengths)
    (200, 64, 4, 2, [(50, 80, 60), (170,)]),  # packed + padding, T % block != 0
    (96, 32, 2, 2, [(96,), (10, 10, 10, 66)]),  # MHA, full rows, short segments
    (40, 64, 6, 3, [(13, 27), (1, 39)]),  # block > T: one block
]


@pytest.mark.parametrize("T,block,N,K,layout", CASES)
def test_blockwise_equals_dense_forward_and_grads(T, block, N, K, layout):
    rng = np.random.default_rng(T)
    B, H = len(layout), 16
    q, k, v = _qkv(rng, B, T, N, K, H)
    seg = _segments(B, T, layout)
    real = (seg > 0)[..., None, None]
    blockwise = lambda q, k, v: attention.blockwise_attention(q, k, v, seg, block=block)  # noqa: E731
    dense = lambda q, k, v: _dense(q, k, v, seg)  # noqa: E731
    out_b, out_d = jax.jit(blockwise)(q, k, v), jax.jit(dense)(q, k, v)
    assert np.isfinite(np.asarray(out_b)).all()  # padding queries too
    np.testing.assert_allclose(np.where(real, out_b, 0), np.where(real, out_d, 0), atol=2e-6, rtol=1e-5)
    w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32) * real  # loss on real queries only
    grad = lambda fn: jax.jit(jax.grad(lambda q, k, v: (fn(q, k, v) * w).sum(), (0, 1, 2)))(q, k, v)  # noqa: E731
    for gb, gd, name in zip(grad(blockwise), grad(dense), "qkv"):
        scale = float(jnp.abs(gd).max())
        np.testing.assert_allclose(gb, gd, atol=1e-5 * scale, rtol=1e-5, err_msg=f"d{name}")


def test_blockwise_bf16_close_to_dense():
    rng = np.random.default_rng(0)
    q, k, v = _qkv(rng, 1, 128, 4, 2, 32, jnp.bfloat16)
    seg = _segments(1, 128, [(60, 60)])
    out_b = attention.blockwise_attention(q, k, v, seg, block=32)
    assert out_b.dtype == jnp.bfloat16
    real = (seg > 0)[..., None, None]
    diff = np.abs(np.where(real, np.asarray(out_b, np.float32) - np.asarray(_dense(q, k, v, seg), np.float32), 0))
    assert diff.max() < 3e-2


def _cfg(impl, **kw):
    return TextConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, attention_impl=impl, attention_block=16, **kw)


def test_decoder_blockwise_equals_dense_and_cache_path_unchanged():
    rng = np.random.default_rng(1)
    B, T = 2, 40
    ids = jnp.asarray(rng.integers(0, 97, size=(B, T)), jnp.int32)
    seg = _segments(B, T, [(15, 20), (33,)])
    pos = jnp.where(seg > 0, jnp.arange(T)[None] - attention.segment_starts(seg), 0)
    dense_m = qwen2.Qwen2ForCausalLM(_cfg("dense"))
    block_m = qwen2.Qwen2ForCausalLM(_cfg("xla_blockwise"))
    params = dense_m.init(jax.random.key(0), ids)["params"]
    fwd = lambda m: jax.jit(lambda p: m.apply({"params": p}, ids, positions=pos, segment_ids=seg)[0])(params)  # noqa: E731
    real = np.asarray(seg > 0)
    np.testing.assert_allclose(np.asarray(fwd(block_m))[real], np.asarray(fwd(dense_m))[real], atol=2e-5, rtol=1e-5)
    # With a cache (prefill in generation) the blockwise setting takes the dense cache path: one row,
    # prefill = the no-cache logits.
    one = ids[1:, :33]
    cache = qwen2.init_cache(block_m.cfg, 1, 48)
    with_cache, _ = jax.jit(lambda p: block_m.apply({"params": p}, one, cache=cache))(params)
    no_cache, _ = jax.jit(lambda p: block_m.apply({"params": p}, one))(params)
    np.testing.assert_allclose(np.asarray(with_cache), np.asarray(no_cache), atol=2e-5, rtol=1e-5)


def test_text_config_refuses_unknown_impl():
    with pytest.raises(ValueError, match="attention_impl 'flash': choose from dense, xla_blockwise, cudnn, splash"):
        TextConfig(attention_impl="flash")
    assert dataclasses.replace(TextConfig(), attention_impl="splash").attention_impl == "splash"


def test_cudnn_packed_layout_and_backend_guard():
    seg = _segments(3, 12, [(3, 4, 2), (12,), ()])
    lengths, offsets = attention.segment_offsets(seg, 4)
    assert np.asarray(lengths).tolist() == [[3, 4, 2, -1], [12, -1, -1, -1], [-1, -1, -1, -1]]
    assert np.asarray(offsets).tolist() == [[0, 3, 7, -1, -1], [0, -1, -1, -1, -1], [-1] * 5]
    lengths, offsets = attention.segment_offsets(seg, 2)  # more segments than M: the rest is dropped
    assert np.asarray(offsets[0]).tolist() == [0, 3, -1]
    if jax.default_backend() != "gpu":
        q, k, v = _qkv(np.random.default_rng(0), 1, 8, 2, 2, 8, jnp.bfloat16)
        with pytest.raises(ValueError, match="'cudnn' needs a GPU backend"):
            attention.cudnn_attention(q, k, v, seg[:1, :8], max_segments=4)


def test_splash_mask_objects_and_interpreted_kernel_equals_dense():
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    kernel = attention.make_splash_kernel(4, 256, block=128, interpret=True)
    assert isinstance(kernel, sa.splash_attention_kernel.SplashAttentionKernel)
    assert kernel.kwargs["block_sizes"].block_q == 128 and kernel.kwargs["is_mqa"] is False
    with pytest.raises(ValueError, match="not a multiple of the block"):
        attention.make_splash_kernel(4, 200, block=128)
    if jax.default_backend() != "tpu":
        with pytest.raises(ValueError, match="'splash' needs a TPU backend"):
            attention.splash_attention(*_qkv(np.random.default_rng(0), 1, 128, 2, 2, 8),
                                       _segments(1, 128, [(128,)]), block=128)
    rng = np.random.default_rng(3)
    q, k, v = _qkv(rng, 1, 256, 4, 2, 128)  # GQA, lane-sized head dim
    seg = _segments(1, 256, [(100, 100)])
    out_s = attention.splash_attention(q, k, v, seg, block=128, interpret=True)
    real = (seg > 0)[..., None, None]
    np.testing.assert_allclose(np.where(real, out_s, 0), np.where(real, _dense(q, k, v, seg), 0), atol=2e-5, rtol=1e-5)
