"""`models.precision`: the integer-op bf16 cast is bit-identical to `astype` (rounding ties, NaN,
infinities, overflow, subnormals); casting the weights once per step leaves a bf16 forward and its
gradients unchanged; `f32_math` rounds once."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from test_videorefer import OUT_LEN, mixed_batch, tiny_cfg
from vrefer_jax.models import precision
from vrefer_jax.models.videorefer import VideoRefer
from vrefer_jax.training.loss import cross_entropy_sum


def _bits(x):
    return np.asarray(jax.lax.bitcast_convert_type(x, jnp.uint16))


def test_bf16_cast_is_bit_identical_to_astype():
    rng = np.random.default_rng(0)
    u = rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)  # every kind of float
    ties = (rng.integers(0, 2**16, size=4096, dtype=np.uint32) << 16) | 0x8000  # exactly half way
    special = np.array([0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001, 0x7F7FFFFF,
                        0x7F7F8000, 0x00000001, 0x80000000, 0x00008000, 0x0000FFFF], np.uint32)
    x = jnp.asarray(np.concatenate([u, ties, special]).view(np.float32))
    got, want = _bits(precision._bf16_bits(x)), _bits(x.astype(jnp.bfloat16))
    nan = np.isnan(np.asarray(x))
    np.testing.assert_array_equal(got[~nan], want[~nan])
    assert np.isnan(np.asarray(precision._bf16_bits(x)[nan], np.float32)).all()  # NaN stays NaN, never inf
    np.testing.assert_array_equal(got[nan] & 0x8000, want[nan] & 0x8000)  # sign kept


def test_cast_gradient_is_the_fp32_cotangent():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((5, 7)), jnp.float32)
    probe = jnp.asarray(np.random.default_rng(2).standard_normal((5, 7)), jnp.bfloat16)

    def loss(cast, x):
        return jnp.sum((cast(x) * probe).astype(jnp.float32))

    g = jax.grad(functools.partial(loss, precision._cast_bf16))(x)
    g_ref = jax.grad(functools.partial(loss, lambda v: v.astype(jnp.bfloat16)))(x)
    assert g.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(g), np.asarray(g_ref))


def test_cast_weights_touches_only_fp32_matmul_weights():
    params = {"a": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones((3,)), "scale": jnp.ones((4, 3))},
              "embed": {"embedding": jnp.ones((5, 2))}, "q": {"kernel": jnp.ones((2, 3), jnp.int8)}}
    out = traverse_util.flatten_dict(precision.cast_weights(params, jnp.bfloat16))
    assert {"/".join(k): str(v.dtype) for k, v in out.items()} == {
        "a/kernel": "bfloat16", "a/bias": "float32", "a/scale": "float32", "embed/embedding": "bfloat16",
        "q/kernel": "int8"}
    assert precision.cast_weights(params, jnp.float32) is params


def test_step_cast_leaves_bf16_loss_and_gradients_unchanged():
    """What the train step does (cast once, then the model) equals the model casting its fp32
    weights itself: same loss, same gradients (the layers' casts are the same rounding)."""
    cfg = tiny_cfg(dtype="bfloat16")
    model = VideoRefer(cfg)
    batch = {k: jnp.asarray(v) for k, v in mixed_batch(cfg, np.random.default_rng(0)).items()}
    params = nn.meta.unbox(model.init(jax.random.key(0), batch, out_len=OUT_LEN)["params"])

    def loss(p, cast):
        p = precision.cast_weights(p, cfg.compute_dtype) if cast else p
        hidden, inp = model.apply({"params": p}, batch, out_len=OUT_LEN, return_hidden=True)
        s, c = cross_entropy_sum(hidden, p["lm_head"]["kernel"], inp["labels"], compute_dtype=cfg.compute_dtype)
        return s / c

    (l0, g0), (l1, g1) = (jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, c) for c in (False, True))
    assert float(l0) == float(l1)
    for (k, a), b in zip(traverse_util.flatten_dict(g0).items(), traverse_util.flatten_dict(g1).values()):
        assert a.dtype == b.dtype == jnp.float32, k
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9, err_msg=str(k))


@pytest.mark.parametrize("fn", [jax.nn.silu, functools.partial(jax.nn.gelu, approximate=True)])
def test_f32_math_rounds_once(fn):
    x = jnp.asarray(np.random.default_rng(3).standard_normal(4096) * 4, jnp.bfloat16)
    y = precision.f32_math(fn, x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(_bits(y), _bits(fn(x.astype(jnp.float32)).astype(jnp.bfloat16)))
    exact = np.asarray(fn(x.astype(jnp.float32)))
    # never worse than rounding after every primitive, and better somewhere
    err_once = np.abs(np.asarray(y, np.float32) - exact)
    err_ops = np.abs(np.asarray(fn(x), np.float32) - exact)
    assert err_once.sum() < err_ops.sum()
    g = jax.grad(lambda v: jnp.sum(precision.f32_math(fn, v).astype(jnp.float32)))(x)
    assert g.dtype == jnp.bfloat16 and np.isfinite(np.asarray(g, np.float32)).all()
    assert precision.f32_math(fn, x.astype(jnp.float32)).dtype == jnp.float32
