"""`fast_ops` (hand-written backward passes) equal the plain formulations they replace: values and
gradients of the 1x1 conv GEMM, the depthwise taps and LayerNorm against `nn.Conv` / a grouped
`lax.conv` / Flax `nn.LayerNorm` with autodiff; bf16 in, bf16 out with fp32 accumulation; the
parameter trees are unchanged; the depthwise gradients are right on a (2, 2, 2) mesh."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from vrefer_jax.models import fast_ops, layers, regstage
from vrefer_jax.sharding import MeshConfig, make_mesh

RNG = np.random.default_rng(0)


def _rand(*shape, scale=1.0):
    return jnp.asarray(scale * RNG.standard_normal(shape), jnp.float32)


def _grads(fn, *args):
    """Value and gradients of sum(fn(*args) * probe) w.r.t. every argument (a random probe so that
    gradients are not all-equal)."""
    out = fn(*args)
    probe = jnp.asarray(np.random.default_rng(1).standard_normal(out.shape), jnp.float32)  # same for both sides
    return jax.value_and_grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * probe),
                              argnums=tuple(range(len(args))))(*args)


def _close(a, b, tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        err = np.abs(x - y).max() / max(np.abs(y).max(), 1e-6)
        assert err < tol, (x.shape, err)


def _grouped_conv(x, w):
    """The reference depthwise conv: lax grouped convolution, kernel [k, k, 1, C]."""
    k = w.shape[0]
    return jax.lax.conv_general_dilated(x, w[:, :, None, :], (1, 1), ((k // 2, k // 2),) * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


@pytest.mark.parametrize("shape", [(3, 5, 7, 6), (2, 1, 1, 4)])
def test_depthwise_equals_grouped_conv(shape):
    x, w = _rand(*shape), _rand(3, 3, shape[-1])
    _close(_grads(fast_ops.depthwise_conv, x, w), _grads(_grouped_conv, x, w), 1e-5)


@pytest.mark.parametrize("lead", [(7,), (2, 3, 5)])
def test_matmul_last_equals_einsum(lead):
    x, w = _rand(*lead, 6), _rand(6, 4)
    _close(_grads(fast_ops.matmul_last, x, w), _grads(lambda a, b: jnp.einsum("...i,io->...o", a, b), x, w), 1e-5)


def test_matmul_last_bf16_keeps_dtype_and_accumulates_in_fp32():
    x, w = _rand(16, 64).astype(jnp.bfloat16), _rand(64, 8).astype(jnp.bfloat16)
    y, (dx, dw) = _grads(fast_ops.matmul_last, x, w)
    ref, (rdx, rdw) = _grads(lambda a, b: jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32)), x, w)
    assert dx.dtype == dw.dtype == jnp.bfloat16
    assert fast_ops.matmul_last(x, w).dtype == jnp.bfloat16
    _close((y, dx, dw), (ref, rdx, rdw), 2e-2)


def test_layer_norm_equals_flax():
    x = _rand(4, 3, 10, scale=3.0) + 2.0
    scale, bias = _rand(10) + 1.0, _rand(10)
    ref_mod = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False)
    ref = lambda a, s, b: ref_mod.apply({"params": {"scale": s, "bias": b}}, a)  # noqa: E731
    _close(_grads(lambda a, s, b: fast_ops.layer_norm(a, s, b, 1e-5), x, scale, bias), _grads(ref, x, scale, bias), 1e-5)
    # bf16 input, fp32 output: statistics from the bf16 values in fp32, as Flax with dtype=float32
    xb = x.astype(jnp.bfloat16)
    got = fast_ops.layer_norm(xb, scale, bias, 1e-5, jnp.dtype(jnp.float32))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref(xb, scale, bias), rtol=1e-5, atol=1e-5)


def test_layer_norm_module_keeps_flax_params():
    x = _rand(2, 5)
    ours = layers.layer_norm(1e-6, "norm").init(jax.random.PRNGKey(0), x)
    flax_ = nn.LayerNorm().init(jax.random.PRNGKey(0), x)
    assert jax.tree.map(jnp.shape, nn.meta.unbox(ours)) == jax.tree.map(jnp.shape, flax_)
    assert nn.get_partition_spec(ours)["params"]["scale"] == PartitionSpec("norm")


class _OldBottleneckConvs(nn.Module):
    """The replaced forms: `nn.Conv` 1x1 and a grouped-conv depthwise, same parameter names."""

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        y = nn.Conv(c, (1, 1), use_bias=False, name="pw")(x)
        w = self.param("dw", nn.initializers.normal(1.0), (3, 3, 1, c))
        return _grouped_conv(y, w[:, :, 0, :])


class _NewBottleneckConvs(nn.Module):
    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        y = regstage.Conv1x1(c, regstage.kernel_axes(2, "conv_in", "conv_out"), name="pw")(x)
        w = self.param("dw", nn.initializers.normal(1.0), (3, 3, 1, c))
        return fast_ops.depthwise_conv(y, w[:, :, 0, :])


def test_regstage_convs_keep_conv_params_and_values():
    x = _rand(2, 4, 4, 6)
    old = _OldBottleneckConvs().init(jax.random.PRNGKey(0), x)["params"]
    new = nn.meta.unbox(_NewBottleneckConvs().init(jax.random.PRNGKey(0), x))["params"]
    assert jax.tree.map(jnp.shape, new) == jax.tree.map(jnp.shape, old)  # pw/kernel [1, 1, I, O]
    old_fn = lambda p, a: _OldBottleneckConvs().apply({"params": p}, a)  # noqa: E731
    new_fn = lambda p, a: _NewBottleneckConvs().apply({"params": p}, a)  # noqa: E731
    _close(_grads(new_fn, old, x), _grads(old_fn, old, x), 1e-5)


@pytest.mark.parametrize("shape, k", [((2, 4, 6, 6, 5), (2, 2, 2)), ((1, 5, 7, 3, 4), (2, 3, 1))])
def test_patch_conv_equals_strided_conv(shape, k):
    """PatchConv (kernel = stride, VALID; odd sizes drop their trailing rows) equals nn.Conv with the
    same parameters: same tree and init, values and gradients."""
    x = _rand(*shape)
    ref = regstage.conv(7, k, regstage.kernel_axes(3, "conv_in", "conv_out"), bias_axis="conv_out", strides=k)
    new = regstage.PatchConv(7, k, regstage.kernel_axes(3, "conv_in", "conv_out"), bias_axis="conv_out")
    p_ref = nn.meta.unbox(ref.init(jax.random.PRNGKey(0), x))["params"]
    p_new = nn.meta.unbox(new.init(jax.random.PRNGKey(0), x))["params"]
    jax.tree.map(np.testing.assert_array_equal, p_new, p_ref)  # same names, shapes and init
    p = {"kernel": _rand(*k, shape[-1], 7), "bias": _rand(7)}
    out_ref, out_new = ref.apply({"params": p}, x), new.apply({"params": p}, x)
    assert out_new.shape == out_ref.shape == (shape[0],) + tuple(s // kk for s, kk in zip(shape[1:4], k)) + (7,)
    _close(_grads(lambda q, a: new.apply({"params": q}, a), p, x),
           _grads(lambda q, a: ref.apply({"params": q}, a), p, x), 1e-5)


def test_depthwise_kernel_gradient_on_a_2x2x2_mesh():
    """Batch over (data, fsdp), channels over tensor: the taps' gradients equal the single-device
    ones. (A bare grouped conv passes this too; the SPMD bug shows inside the whole sharded step,
    which tests/test_train.py::test_sharded_step_matches_single_device guards.)"""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    mesh = make_mesh(MeshConfig(2, 2, 2), jax.devices()[:8])
    x, w = _rand(8, 5, 5, 4), _rand(3, 3, 4)
    probe = _rand(8, 5, 5, 4)

    def loss(x, w):
        return jnp.sum(fast_ops.depthwise_conv(x, w) * probe)

    want = jax.grad(loss, argnums=(0, 1))(x, w)
    xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, None, "tensor")))
    ws = jax.device_put(w, NamedSharding(mesh, PartitionSpec(None, None, "tensor")))
    got = jax.jit(jax.grad(loss, argnums=(0, 1)))(xs, ws)
    _close(got, want, 1e-5)
