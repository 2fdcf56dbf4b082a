"""Parity of the connectors with the PyTorch references of `tests/torch_reference.py`, built from
timm 1.0.3 `RegStage`.

The references follow the official `STCConnector` / `STCConnectorV35` / `STPConnector` and the
`linear` / `mlp2x_gelu` projectors (videorefer/model/projector.py, `temporal_aggregator`).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
regnet = pytest.importorskip("timm.models.regnet")
timm_layers = pytest.importorskip("timm.layers")

from vrefer_jax.batch import num_video_tokens  # noqa: E402
from vrefer_jax.checkpoints import key_map  # noqa: E402
from vrefer_jax.checkpoints import videorefer_keys as keys  # noqa: E402
from vrefer_jax.config import ConnectorConfig  # noqa: E402
from vrefer_jax.models import connector, regstage  # noqa: E402

import torch_reference as tref  # noqa: E402  (tests/: torch, timm, transformers only)

TOL = 1e-4


# ----------------------------------------------------------------------------- torch references

torch_regstage, torch_mlp, TorchSTC, TorchMean = tref.regstage, tref.mlp, tref.STC, tref.MeanProjector


def randomise_norms(module, seed):
    """LayerNorm weights/biases away from 1/0 so that a swapped or missing one shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
    return module


# ----------------------------------------------------------------------------- helpers


def load(model, x, sd, rules):
    """torch state dict -> Flax params via the key map (the importer's path) + round-trip check."""
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), x))["params"]
    hf = key_map.torch_state_to_numpy(sd)
    params = key_map.hf_to_flax(hf, rules, shapes, available=list(hf))
    back = key_map.flax_to_hf(params, rules)
    assert set(back) == set(hf)
    for k in hf:
        np.testing.assert_array_equal(back[k], hf[k], err_msg=k)
    return params


def compare(name, ref, model, x_np, rules, hf_prefix=""):
    torch.manual_seed(0)
    sd = {k[len(hf_prefix):]: v for k, v in ref.state_dict().items()}
    x = jnp.asarray(x_np)
    params = load(model, x, sd, rules)
    with torch.no_grad():
        want = ref(torch.from_numpy(x_np)).numpy()
    got = np.asarray(jax.jit(model.apply)({"params": params}, x))
    assert got.shape == want.shape, (got.shape, want.shape)
    err = float(np.max(np.abs(got - want)))
    print(f"{name}: out {got.shape} max|ref|={np.abs(want).max():.3f} max abs err={err:.2e}")
    assert err <= TOL, err
    return got


def frames(b, t, g, c, seed=0):
    return np.random.default_rng(seed).standard_normal((b, t, g * g, c)).astype(np.float32)


# ----------------------------------------------------------------------------- tests


class _StageWrap(nn.Module):
    """RegStage on NCHW input, so the test feeds the torch layout to both sides."""

    depth: int
    features: int

    @nn.compact
    def __call__(self, x):
        y = regstage.RegStage(self.depth, self.features, name="stage")(jnp.transpose(x, (0, 2, 3, 1)))
        return jnp.transpose(y, (0, 3, 1, 2))


@pytest.mark.parametrize("depth,in_chs,out_chs,hw", [(2, 16, 32, 7), (1, 18, 48, 6)])
def test_regstage_parity(depth, in_chs, out_chs, hw):
    torch.manual_seed(depth)
    ref = randomise_norms(torch_regstage(depth, in_chs, out_chs), seed=depth).eval()
    x = np.random.default_rng(1).standard_normal((3, in_chs, hw, hw)).astype(np.float32)
    rules = key_map.prefixed(keys.regstage_rules(depth, in_chs, out_chs), "", ("stage",))
    compare(f"RegStage(d={depth}, {in_chs}->{out_chs}, {hw}x{hw})", ref, _StageWrap(depth, out_chs), x, rules)
    # SE width comes from the block input: round(18 * 0.25) = round(4.5) = 4 (half to even).
    if in_chs == 18:
        assert ref.b1.se.fc1.out_channels == regstage.se_channels(18) == 4


STC_CASES = [
    # kind, B, T, g, C_vis, C, depth
    ("stc_connector_v35", 1, 16, 27, 16, 32, 4),  # the real token layout: 1352 tokens
    ("stc_connector_v35", 2, 3, 9, 16, 48, 2),  # odd T and odd grid: trailing frame/row dropped
    ("stc_connector", 1, 4, 9, 16, 32, 2),  # padding 1: T' = 3, h' = w' = 5
    ("stp_connector", 2, 5, 7, 16, 32, 2),
]


@pytest.mark.parametrize("kind,b,t,g,c_vis,c,depth", STC_CASES)
def test_stc_parity(kind, b, t, g, c_vis, c, depth):
    cfg = ConnectorConfig(projector_type=kind, depth=depth, mlp_depth=2, downsample=(2, 2, 2))
    torch.manual_seed(t)
    ref = randomise_norms(TorchSTC(kind, c_vis, c, depth, 2, (2, 2, 2)), seed=t).eval()
    model = connector.Connector(cfg, in_features=c_vis, out_features=c)
    got = compare(f"{kind}(B={b}, T={t}, g={g}, {c_vis}->{c}, d={depth})", ref, model,
                  frames(b, t, g, c_vis), keys.connector_rules(cfg, c_vis, c))
    assert got.shape == (b, num_video_tokens(cfg, t, g), c)


@pytest.mark.parametrize("kind", ["linear", "mlp2x_gelu", "mlp3x_gelu"])
def test_mean_projector_parity(kind):
    cfg = ConnectorConfig(projector_type=kind)
    c_vis, c, t, g = 16, 32, 3, 5
    torch.manual_seed(0)
    proj = torch.nn.Linear(c_vis, c) if kind == "linear" else torch_mlp(int(kind[3]), c_vis, c)
    ref = TorchMean(proj).eval()
    model = connector.Connector(cfg, in_features=c_vis, out_features=c)
    got = compare(f"{kind}(T={t}, g={g})", ref, model, frames(2, t, g, c_vis), keys.connector_rules(cfg, c_vis, c),
                  hf_prefix="proj.")
    assert got.shape == (2, g * g, c) and num_video_tokens(cfg, t, g) == g * g


def test_token_counts():
    v35 = ConnectorConfig(projector_type="stc_connector_v35")
    for t, n in [(16, 1352), (8, 676), (4, 338), (3, 169)]:
        assert num_video_tokens(v35, t, 27) == n
        model = connector.Connector(v35, in_features=8, out_features=8)
        x = jax.ShapeDtypeStruct((1, t, 729, 8), jnp.float32)
        out = jax.eval_shape(lambda x: model.init_with_output(jax.random.PRNGKey(0), x)[0], x)
        assert out.shape == (1, n, 8)
    assert num_video_tokens(ConnectorConfig(projector_type="stc_connector"), 16, 27) == 9 * 14 * 14
    assert num_video_tokens(ConnectorConfig(projector_type="stp_connector"), 16, 27) == 1352
    assert num_video_tokens(ConnectorConfig(projector_type="mlp2x_gelu"), 16, 27) == 729


def test_official_shapes_and_names():
    """Full-size v35 (1152 -> 3584): every checkpoint tensor name/shape and the parameter count."""
    cfg = ConnectorConfig()
    model = connector.Connector(cfg, in_features=1152, out_features=3584)
    x = jax.ShapeDtypeStruct((1, 16, 729, 1152), jnp.float32)
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
    shapes = nn.meta.unbox(boxed)
    rules = keys.connector_rules(cfg, 1152, 3584)
    key_map.check_rules_cover(rules, shapes)
    hf = {r.hf: key_map.hf_shape(r, key_map.get_path(shapes, r.flax).shape) for r in rules}
    assert len(hf) == 113
    assert sum(math.prod(s) for s in hf.values()) == 376_889_248
    assert hf["s1.b1.conv1.conv.weight"] == (3584, 1152, 1, 1)
    assert hf["s1.b1.conv2.conv.weight"] == (3584, 1, 3, 3)
    assert hf["s1.b1.se.fc1.weight"] == (288, 3584, 1, 1)
    assert hf["s1.b2.se.fc1.weight"] == (896, 3584, 1, 1)
    assert hf["s1.b1.downsample.conv.weight"] == (3584, 1152, 1, 1)
    assert "s2.b1.downsample.conv.weight" not in hf
    assert hf["sampler.0.weight"] == (3584, 3584, 2, 2, 2)
    assert hf["readout.2.weight"] == (3584, 3584)
    # Logical names: one per dim; None only on size-1 dims (the depthwise kernel's group dim).
    for path, leaf in jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned)):
        assert isinstance(leaf, nn.Partitioned), path
        assert len(leaf.names) == leaf.value.ndim, (path, leaf.names)
        named = [n for n in leaf.names if n is not None]
        assert len(set(named)) == len(named), (path, leaf.names)  # Flax refuses repeated names
        for name, size in zip(leaf.names, leaf.value.shape):
            assert name is not None or size == 1, (path, leaf.names, leaf.value.shape)


def test_other_projector_names():
    assert [r.hf for r in keys.connector_rules(ConnectorConfig(projector_type="linear"), 8, 16)] == ["weight", "bias"]
    assert [r.hf for r in keys.connector_rules(ConnectorConfig(projector_type="mlp2x_gelu"), 8, 16)] == [
        "0.weight", "0.bias", "2.weight", "2.bias"]
    stp = [r.hf for r in keys.connector_rules(ConnectorConfig(projector_type="stp_connector", depth=1), 8, 16)]
    assert not any(n.startswith("sampler") for n in stp)


def test_errors():
    x = jnp.zeros((1, 4, 49, 8))
    for bad in ("spatial_conv", "spatial_pool"):
        with pytest.raises(ValueError, match="broken"):
            connector.Connector(ConnectorConfig(projector_type=bad), 8, 16).init(jax.random.PRNGKey(0), x)
        with pytest.raises(ValueError, match="broken"):
            num_video_tokens(ConnectorConfig(projector_type=bad), 16, 27)
    with pytest.raises(ValueError, match="unknown projector_type"):
        keys.connector_rules(ConnectorConfig(projector_type="qformer"), 8, 16)
    v35 = connector.Connector(ConnectorConfig(depth=1), 8, 16)
    with pytest.raises(ValueError, match="square"):
        v35.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 48, 8)))
    with pytest.raises(ValueError, match="at least"):
        v35.init(jax.random.PRNGKey(0), jnp.zeros((1, 1, 49, 8)))  # one frame, temporal kernel 2


@pytest.mark.parametrize("kind", ["stc_connector_v35", "stc_connector", "stp_connector", "linear", "mlp2x_gelu"])
def test_traces_under_mesh_and_rules(kind):
    """Params and activation constraints resolve under the default rules (Flax refuses a logical
    name repeated within one array, e.g. a kernel's spatial dims)."""
    from jax.sharding import Mesh, PartitionSpec

    from vrefer_jax import sharding

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    model = connector.Connector(ConnectorConfig(projector_type=kind, depth=1), 8, 16)
    x = jax.ShapeDtypeStruct((2, 4, 25, 8), jnp.float32)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.logical_axis_rules()):
        boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
        specs = nn.logical_to_mesh(nn.get_partition_spec(boxed))["params"]
        out = jax.eval_shape(model.apply, boxed, x)
    assert out.shape == (2, num_video_tokens(model.cfg, 4, 5), 16)
    if kind == "stc_connector_v35":
        assert specs["s1"]["b1"]["conv1"]["conv"]["kernel"] == PartitionSpec(None, None, None, "tensor")  # conv_in replicated (sharding.py)
        assert specs["readout_0"]["kernel"] == PartitionSpec(None, "tensor")


def test_bf16_compute_keeps_fp32_params():
    cfg = ConnectorConfig(depth=1)
    model = connector.Connector(cfg, 8, 16, dtype=jnp.bfloat16)
    x = jnp.asarray(frames(1, 4, 5, 8))
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), x))["params"]
    assert all(s.dtype == jnp.float32 for s in jax.tree_util.tree_leaves(shapes))
    rng = np.random.default_rng(0)  # random fp32 params without compiling the RNG-heavy init
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), jnp.float32), shapes)
    out = jax.jit(model.apply)({"params": params}, x)
    assert out.dtype == jnp.bfloat16 and out.shape == (1, 8, 16)
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
