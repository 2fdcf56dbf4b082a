"""Object (region) encoder and mask ops vs the PyTorch reference in `tests/torch_reference.py`,
written from the documented algorithm (bilinear F.interpolate, MaskPooling, the looped token_merge,
Linear-GELU-Linear)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vrefer_jax.checkpoints import key_map
from vrefer_jax.config import ObjectEncoderConfig
from vrefer_jax.models import mask_ops
from vrefer_jax.checkpoints.videorefer_keys import object_encoder_rules as hf_rules
from vrefer_jax.models.object_encoder import ObjectEncoder

torch = pytest.importorskip("torch")
F_t = torch.nn.functional

import torch_reference as tref  # noqa: E402  (tests/: torch only for these pieces)

pytestmark = pytest.mark.torch

G, C_VIS, E, R = 9, 16, 24, 4
TOL = 1e-4


# ----------------------------------------------------------------------------- torch reference

ref_token_merge, ref_mask_pool, RefRegionEncoder = tref.token_merge, tref.mask_pool, tref.RegionEncoder


# ----------------------------------------------------------------------------- test data


def _blob(rng, h, w, tiny_p=0.1):
    """A random rectangle or ellipse mask [h, w] (with probability `tiny_p` a few pixels only, which
    the bilinear resize may miss: a zero vector)."""
    m = np.zeros((h, w), bool)
    tiny = rng.random() < tiny_p
    bh = 1 + int(rng.integers(0, 3 if tiny else max(2, h // 2)))
    bw = 1 + int(rng.integers(0, 3 if tiny else max(2, w // 2)))
    y, x = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
    if rng.random() < 0.5:
        m[y:y + bh, x:x + bw] = True
    else:
        yy, xx = np.mgrid[:h, :w]
        m[((yy - y - bh / 2) / (bh / 2)) ** 2 + ((xx - x - bw / 2) / (bw / 2)) ** 2 <= 1] = True
    return m


def make_batch(rng, objects_per_sample, h, w, *, B=3, K=3, M=32, F=32):
    """objects_per_sample[b] = list of (frame indices, masks [n, h, w]) per valid object.

    Returns the padded JAX inputs and the per-sample torch inputs of the same data."""
    feats = (rng.standard_normal((B, F, G * G, C_VIS)) + 0.3).astype(np.float32)
    frames = np.full((B, K, M), -1, np.int32)
    masks = np.zeros((B, K, M, h, w), bool)
    valid = np.zeros((B, K), bool)
    t_masks, t_objs = [], []
    for b, objs in enumerate(objects_per_sample):
        sample_masks = []
        for k, (idx, mk) in enumerate(objs):
            frames[b, k, :len(idx)] = idx
            masks[b, k, :len(idx)] = mk
            valid[b, k] = True
            sample_masks.append(mk)
        t_masks.append(torch.from_numpy(np.concatenate(sample_masks).astype(np.float32)))
        t_objs.append([list(map(int, idx)) for idx, _ in objs])
    jx = dict(frame_feats=feats, object_frames=frames, object_masks=masks, object_valid=valid)
    return jx, (list(torch.from_numpy(feats)), t_masks, t_objs)


def random_object(rng, n, h, w, F=32, empty=(), tiny_p=0.1):
    idx = rng.permutation(F)[:n]
    mk = np.stack([_blob(rng, h, w, tiny_p) for _ in range(n)])
    mk[list(empty)] = False
    return idx, mk


def mixed_objects(rng, h, w):
    """Single-frame, random 2..32-frame, duplicated-frame, empty-mask and padding objects."""
    dup_idx = np.full(7, 5)
    dup_mask = np.repeat(_blob(rng, h, w)[None], 7, 0)
    return [
        [random_object(rng, 1, h, w), random_object(rng, 32, h, w, tiny_p=0.0), (dup_idx, dup_mask)],
        [random_object(rng, int(rng.integers(2, 33)), h, w),
         random_object(rng, 10, h, w, empty=(1, 3, 5, 7, 9)),  # all cosines 0 -> 1 token
         ],  # third slot: padding
        [random_object(rng, int(rng.integers(2, 33)), h, w),
         random_object(rng, 3, h, w, empty=(0, 1, 2)),  # all-empty, n <= R: 3 zero vectors
         random_object(rng, 12, h, w, empty=(2, 3, 4, 8, 9))],
    ]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    ref = RefRegionEncoder(C_VIS, E, R).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.3)
    cfg = ObjectEncoderConfig(region_token_num=R)
    model = ObjectEncoder(cfg, vis_dim=C_VIS, out_dim=E, grid=G)
    sd = key_map.torch_state_to_numpy(ref.state_dict())
    rng = np.random.default_rng(0)
    jx, _ = make_batch(rng, mixed_objects(rng, 48, 80), 48, 80)
    args = [jnp.asarray(jx[k]) for k in ("frame_feats", "object_frames", "object_masks", "object_valid")]
    boxed = jax.eval_shape(model.init, jax.random.key(0), *args)["params"]
    rules = hf_rules(cfg, C_VIS, E)
    params = key_map.hf_to_flax(sd, rules, nn.meta.unbox(boxed), available=list(sd))
    return dict(ref=ref, model=model, params=params, sd=sd, rules=rules, boxed=boxed,
                apply=jax.jit(lambda p, *a: model.apply({"params": p}, *a)))


def _run(setup, jx):
    args = [jnp.asarray(jx[k]) for k in ("frame_feats", "object_frames", "object_masks", "object_valid")]
    tok, cnt = setup["apply"](setup["params"], *args)
    return np.asarray(tok), np.asarray(cnt)


# ----------------------------------------------------------------------------- tests


def test_key_map_round_trip_and_axes(setup):
    back = key_map.flax_to_hf(setup["params"], setup["rules"])
    assert set(back) == set(setup["sd"])
    for k, v in setup["sd"].items():
        np.testing.assert_array_equal(back[k], v)
    specs = nn.get_partition_spec(setup["boxed"])
    assert tuple(specs["feat_linear_0"]["kernel"]) == ("vit_embed", "mlp")
    assert tuple(specs["feat_linear_2"]["kernel"]) == ("mlp", "embed")
    assert tuple(specs["feat_linear_2"]["bias"]) == ("embed",)


@pytest.mark.parametrize("hw", [(48, 80), (37, 53), (G, G)])
def test_encoder_parity(setup, hw):
    h, w = hw
    rng = np.random.default_rng(h * 1000 + w)
    objs = mixed_objects(rng, h, w)
    jx, (t_feats, t_masks, t_objs) = make_batch(rng, objs, h, w)
    tok, cnt = _run(setup, jx)
    with torch.no_grad():
        ref_tok, ref_nums = setup["ref"](t_feats, t_masks, t_objs)
    ref_tok = ref_tok.numpy()

    got_nums = [int(cnt[b, k]) for b in range(cnt.shape[0]) for k in range(cnt.shape[1]) if jx["object_valid"][b, k]]
    assert got_nums == ref_nums
    assert cnt[1, 2] == 0  # padding object
    assert cnt[0, 0] == 1 and cnt[0, 2] == 1 and cnt[1, 1] == 1  # single frame, duplicates, empty ties
    assert cnt[0, 1] == R  # 32 distinct non-empty frames: no ties, exactly R tokens
    assert cnt[2, 1] == 3  # all-empty object with n <= R keeps its 3 (zero) vectors
    assert np.isfinite(tok).all()

    got = np.concatenate([tok[b, k, :cnt[b, k]] for b in range(cnt.shape[0])
                          for k in range(cnt.shape[1]) if jx["object_valid"][b, k]])
    err = np.abs(got - ref_tok).max()
    keep = np.arange(R) < cnt[..., None]
    print(f"\n[object encoder {h}x{w}] counts {cnt.tolist()} max|err| {err:.2e}")
    assert err <= TOL
    assert (tok[~keep] == 0).all()  # rows >= count (and padding objects) are zero


def test_empty_mask_pools_to_exact_zero():
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((3, G, G, C_VIS)).astype(np.float32)
    masks = rng.random((3, G, G)) < 0.3
    masks[1] = False
    got = np.asarray(mask_ops.mask_pool(jnp.asarray(feats), jnp.asarray(masks)))
    ref = ref_mask_pool(torch.from_numpy(feats).permute(0, 3, 1, 2),
                        torch.from_numpy(masks.astype(np.float32))[None]).numpy()
    print(f"\n[mask_pool] max|err| {np.abs(got - ref).max():.2e}")
    assert (got[1] == 0).all() and np.isfinite(got).all()
    assert np.abs(got - ref).max() <= 1e-5


def _merge_inputs(rng, n, kind, M=40, C=8):
    x = rng.standard_normal((n, C)).astype(np.float32) + 0.5
    if kind == "dup":
        x[:] = x[0]
    elif kind == "zeros":
        x[rng.random(n) < 0.5] = 0.0  # their cosines are exactly 0: ties at kth = 0
    pad = np.zeros((M, C), np.float32)
    pad[:n] = x
    return x, pad, np.arange(M) < n


def test_token_merge_vs_loop():
    """n = 1..39, random rows, all-identical rows and rows with many zero vectors, vmapped."""
    rng = np.random.default_rng(2)
    cases = [(n, kind) for kind in ("rand", "dup", "zeros") for n in range(1, 40)]
    data = [_merge_inputs(rng, n, kind) for n, kind in cases]
    xs = jnp.asarray(np.stack([d[1] for d in data]))
    vs = jnp.asarray(np.stack([d[2] for d in data]))
    tok, cnt = jax.jit(jax.vmap(lambda x, v: mask_ops.token_merge(x, v, R)))(xs, vs)
    tok, cnt = np.asarray(tok), np.asarray(cnt)
    worst, fewer = 0.0, 0
    for i, ((n, kind), (x, _, _)) in enumerate(zip(cases, data)):
        t = torch.from_numpy(x)[None]
        ref = (ref_token_merge(t, n - R) if n > R else t)[0].numpy()
        assert cnt[i] == ref.shape[0], (n, kind)
        worst = max(worst, float(np.abs(tok[i, :cnt[i]] - ref).max()))
        assert (tok[i, cnt[i]:] == 0).all()
        fewer += int(n > R and cnt[i] < R)
        if kind == "dup":
            assert cnt[i] == 1 or n <= R
    print(f"\n[token_merge] {len(cases)} cases, {fewer} with < R tokens (ties), max|err| {worst:.2e}")
    assert worst <= 1e-5
    assert fewer > 0


def _near_tie_cases(C, seed=5):
    """Duplicated frames (uniform sampling of a short video repeats frames), a static object
    (one vector plus sensor-level noise) and all-equal rows: every adjacent cosine is 1 up to the
    last bits, so the grouping is decided by fp32 rounding."""
    rng = np.random.default_rng(seed)
    cases = []
    for n in range(5, 17):
        for k in (2, 3, 5):
            base = rng.standard_normal((k, C)).astype(np.float32) + 0.5
            idx = np.round(np.linspace(0, k - 1, n) + 1e-6).astype(int)
            cases.append((f"dup n={n} k={k}", base[idx]))
        base = rng.standard_normal(C).astype(np.float32) + 0.5
        noise = rng.standard_normal((n, C)).astype(np.float32) * np.float32(3e-7)
        cases.append((f"static n={n}", (base + noise).astype(np.float32)))
        cases.append((f"equal n={n}", np.repeat(base[None], n, 0)))
    return cases


@pytest.mark.parametrize("C", [16, 1152])  # a small width and SigLIP's
def test_token_merge_near_ties_match_torch(C):
    """Same groupings (token count and members) as the torch reference where the cosines tie up to
    the last bit, and the similarities themselves equal bit for bit."""
    cases = _near_tie_cases(C)
    M = 16
    xs = np.zeros((len(cases), M, C), np.float32)
    vs = np.zeros((len(cases), M), bool)
    for i, (_, x) in enumerate(cases):
        xs[i, :len(x)], vs[i, :len(x)] = x, True
    tok, cnt = jax.jit(jax.vmap(lambda x, v: mask_ops.token_merge(x, v, R)))(jnp.asarray(xs), jnp.asarray(vs))
    tok, cnt = np.asarray(tok), np.asarray(cnt)
    wrong = []
    for i, (name, x) in enumerate(cases):
        ref = ref_token_merge(torch.from_numpy(x)[None], len(x) - R)[0].numpy()
        if cnt[i] != ref.shape[0] or np.abs(tok[i, :cnt[i]] - ref).max() > 1e-6:
            wrong.append(name)
        if name.startswith("equal"):
            assert cnt[i] == 1, name
    assert not wrong, f"{len(wrong)}/{len(cases)} groupings differ from torch: {wrong}"
    sims = np.asarray(jax.jit(jax.vmap(mask_ops.adjacent_cosine))(jnp.asarray(xs)))
    for i, (name, x) in enumerate(cases):
        t = torch.from_numpy(x)[None]
        a = F_t.normalize(t[:, :-1], p=2, dim=-1, eps=1e-12)
        b = F_t.normalize(t[:, 1:], p=2, dim=-1, eps=1e-12)
        np.testing.assert_array_equal(sims[i, :len(x) - 1], (a * b).sum(-1)[0].numpy(), err_msg=name)


def test_token_merge_fewer_slots_than_tokens():
    tok, cnt = jax.jit(mask_ops.token_merge, static_argnums=2)(jnp.ones((1, 3)), jnp.array([True]), R)
    assert tok.shape == (R, 3) and int(cnt) == 1
    np.testing.assert_array_equal(np.asarray(tok), np.array([[1, 1, 1]] + [[0, 0, 0]] * (R - 1), np.float32))


def test_bilinear_matches_torch_interpolate():
    rng = np.random.default_rng(3)
    worst, disagree = 0.0, 0
    resize_jit = jax.jit(mask_ops.resize_masks, static_argnums=(1, 2))
    for t in range(60):
        h, w = int(rng.integers(1, 300)), int(rng.integers(1, 500))
        g = int(rng.choice([27, 9, 4, 13]))
        m = (rng.random((2, h, w)) < rng.random() * 0.02).astype(np.float32)
        ref = F_t.interpolate(torch.from_numpy(m)[None], size=(g, g), mode="bilinear",
                              align_corners=False)[0].numpy()
        host = mask_ops.resize_masks_np(m, g, g)
        dev = np.asarray(resize_jit(jnp.asarray(m > 0), g, g)) if t % 6 == 0 else host
        for out in (host, dev):
            worst = max(worst, float(np.abs(out - ref).max()))
            disagree += int(((out > 0) != (ref > 0)).sum())
    # the weight matrices themselves, including upsampling and the in == out copy
    for L in (1, 2, 3, 5, 9, 27, 33, 257, 480, 854):
        for g in (1, 4, 9, 27):
            eye = torch.eye(L)[None, None]
            ref = F_t.interpolate(eye, size=(g, L), mode="bilinear", align_corners=False)[0, 0].numpy()
            wts = mask_ops.bilinear_weights(L, g)
            worst = max(worst, float(np.abs(wts - ref).max()))
            disagree += int(((wts > 0) != (ref > 0)).sum())
    print(f"\n[bilinear] max|err| {worst:.2e}, {disagree} disagreements after > 0")
    assert worst <= 1e-5 and disagree == 0


def test_no_recompile_for_different_counts(setup):
    traces = []
    model, params = setup["model"], setup["params"]

    @jax.jit
    def f(*a):
        traces.append(1)
        return model.apply({"params": params}, *a)

    rng = np.random.default_rng(4)
    counts = []
    for n in (1, 6, 17):
        objs = [[random_object(rng, n, 48, 80)]] * 3
        jx, _ = make_batch(rng, objs, 48, 80)
        _, cnt = f(*[jnp.asarray(jx[k]) for k in ("frame_feats", "object_frames", "object_masks", "object_valid")])
        counts.append(int(cnt[0, 0]))
    assert len(traces) == 1
    assert counts[0] == 1 and counts[2] <= R


def test_bf16_dtype_and_shapes():
    cfg = ObjectEncoderConfig(region_token_num=R)
    model = ObjectEncoder(cfg, vis_dim=C_VIS, out_dim=E, grid=G, dtype=jnp.bfloat16)
    rng = np.random.default_rng(5)
    jx, _ = make_batch(rng, [[random_object(rng, 5, G, G, F=8)]], G, G, B=1, K=2, M=6, F=8)
    args = [jnp.asarray(jx[k]) for k in ("frame_feats", "object_frames", "object_masks", "object_valid")]
    args[0] = args[0].astype(jnp.bfloat16)
    variables = jax.jit(model.init)(jax.random.key(0), *args)
    assert jax.tree_util.tree_leaves(nn.meta.unbox(variables))[0].dtype == jnp.float32
    tok, cnt = jax.jit(model.apply)(variables, *args)
    assert tok.shape == (1, 2, R, E) and tok.dtype == jnp.bfloat16
    assert cnt.dtype == jnp.int32 and cnt.tolist() == [[4, 0]]
    with pytest.raises(ValueError, match="grid"):
        model.apply(variables, args[0][:, :, :10], *args[1:])
