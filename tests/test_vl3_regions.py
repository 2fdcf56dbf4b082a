"""VRVL3 region path (reference §8) vs PyTorch references written here from the document: the
official crop-and-zoom (`resize_image_mask`), its uint8 / float mask resize and token count,
`MaskPooling` (feature resize + masking), `kmeans_fast` with an injected init, `feat_linear`.

OpenCV is not installed here: the crop's INTER_LINEAR resize is checked bit-exactly against a golden
file written by opencv-python-headless 4.6.0.66 (the official pin) — tests/data/vl3_cv2_resize.npz,
`cv2.resize(in{k}, (W, H))` for the (H, W) of `out{k}` — against cv2 itself when it is importable,
and always within 1 grey level of torch's float bilinear.
"""

import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipeline.vl3 import regions as rg
from vrefer_jax.models.vl3 import region as dev

torch = pytest.importorskip("torch")
F_t = torch.nn.functional

pytestmark = pytest.mark.torch

TOL = 1e-4
DATA = pathlib.Path(__file__).resolve().parent / "data"


# ----------------------------------------------------------------------------- torch references


def ref_resize_image_mask(frame, mask_t, patch=14):
    """The official per-mask crop and zoom (§8.2) with torch tensors; the image resize, which the
    official does with OpenCV, is torch's float bilinear here (compared within 1 grey level)."""
    h, w = frame.shape[:2]
    if mask_t.sum() == 0:
        mask_t = torch.ones((h, w))
    rows, cols = np.where(mask_t.numpy() == 1)
    r0, c0 = max(0, rows.min() - 2 * patch), max(0, cols.min() - 2 * patch)
    r1, c1 = min(h - 1, rows.max() + 2 * patch), min(w - 1, cols.max() + 2 * patch)
    area = mask_t.sum()
    scale = math.ceil(math.sqrt(1960 / area))
    if scale == 1 and area / 196 > 100:
        scale = 1 / math.sqrt((area / 196) / 100)
    out_h = math.ceil((r1 - r0) * scale / patch) * patch
    out_w = math.ceil((c1 - c0) * scale / patch) * patch
    crop = torch.from_numpy(frame[r0:r1, c0:c1]).permute(2, 0, 1)[None].double()
    image = F_t.interpolate(crop, size=(out_h, out_w), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    grid = F_t.interpolate(mask_t[r0:r1, c0:c1][None, None], size=(out_h // patch, out_w // patch),
                           mode="bilinear", align_corners=False)[0, 0]
    return dict(box=(int(r0), int(c0), int(r1), int(c1)), scale=float(scale), image=image.numpy(),
                grid=grid.numpy(), count=min(10, int(grid.sum())))


def ref_kmeans(tokens, init, num_clusters=10, num_iterations=20):
    """kmeans_fast (§8.5 step 3) with the initial draw injected; returns (centroids, rounds run)."""
    centroids = tokens[init[:num_clusters]]
    for it in range(num_iterations):
        d = torch.sum((tokens[:, None] - centroids[None]) ** 2, dim=2)
        labels = torch.argmin(d, dim=1)
        new = torch.stack([tokens[labels == i].mean(0) if (labels == i).sum() > 0 else centroids[i]
                           for i in range(num_clusters)])
        if torch.allclose(centroids, new, atol=1e-6):
            return centroids, it + 1
        centroids = new
    return centroids, num_iterations


def ref_mask_pooling(feat, mask, init, q=10, iters=20):
    """MaskPooling (§8.5 steps 1-3): feat [E, gh, gw] fp32, mask [gm, wm] -> [m, E]."""
    x = feat[None]
    if x.shape[-2:] != mask.shape[-2:]:
        x = F_t.interpolate(x, size=mask.shape[-2:], mode="bilinear", align_corners=False)
    m = (mask > 0).to(x.dtype)
    emb = x * m
    keep = torch.any(emb != 0, dim=(0, 1))
    emb = emb[:, :, keep][0].permute(1, 0)  # [cells, E] in raster order
    if len(emb) > q:
        emb = ref_kmeans(emb, init, q, iters)[0]
    return emb


# ----------------------------------------------------------------------------- crop and zoom


def _frame(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _mask(h, w, kind):
    m = np.zeros((h, w), np.uint8)
    if kind == "pixel":
        m[h // 2, w // 3] = 1
    elif kind == "corner":
        m[0, 0] = 1
    elif kind == "last_row":
        m[h - 1, w // 2] = 1
    elif kind == "last_col":
        m[h // 3, w - 1] = 1
    elif kind == "last_row_col":
        m[h - 5:, w - 7:] = 1
    elif kind == "medium":  # > 10 patches: zoom 1
        m[40:110, 50:130] = 1
    elif kind == "blob":
        yy, xx = np.mgrid[:h, :w]
        m = (((yy - 60) ** 2 + (xx - 70) ** 2) < 23 ** 2).astype(np.uint8)
    elif kind == "huge":  # > 100 patches: shrink
        m[5:, 3:w - 10] = 1
    elif kind == "scattered":
        m = (np.random.default_rng(3).random((h, w)) < 0.01).astype(np.uint8)
    return m  # "empty": all zero


KINDS = ("pixel", "corner", "last_row", "last_col", "last_row_col", "medium", "blob", "huge", "scattered", "empty")


@pytest.mark.parametrize("kind", KINDS)
def test_crop_and_zoom_matches_official(kind):
    h, w = 171, 233
    frame, m = _frame(h, w), _mask(h, w, kind)
    ref = ref_resize_image_mask(frame, torch.from_numpy(m))
    cz = rg.crop_and_zoom(frame, m, name="obj0")
    assert cz.box == ref["box"]
    assert cz.scale == pytest.approx(ref["scale"], rel=0, abs=0)
    assert cz.image.shape == ref["image"].shape and cz.image.shape[0] % 14 == 0 and cz.image.shape[1] % 14 == 0
    diff = np.abs(cz.image.astype(np.float64) - ref["image"])
    assert diff.max() <= 1.0 + 1e-9 and diff.mean() < 0.5, (diff.max(), diff.mean())  # OpenCV's fixed point
    want_grid = ref["grid"] if kind != "empty" else ref["grid"] >= 0.5  # the empty case is float32 ones
    np.testing.assert_array_equal(cz.mask_grid, want_grid.astype(np.uint8))
    assert set(np.unique(cz.mask_grid)) <= {0, 1}
    rt = rg.region_tokens(cz, name="obj0")
    r0, c0, r1, c1 = cz.box
    crop = m[r0:r1, c0:c1] if kind != "empty" else np.ones((r1 - r0, c1 - c0), np.float32)
    assert rt.count == ref["count"] == rg.official_token_count(crop, cz.grid)
    assert rt.num_cells == int(cz.mask_grid.sum())
    assert (cz.warnings != ()) == (kind == "empty")
    if kind == "empty":
        assert "obj0" in cz.warnings[0] and "empty" in cz.warnings[0]
    if kind in ("last_row", "last_col"):  # the exclusive end drops the only mask pixel
        assert rt.count == 0 and rt.num_cells == 0
    if kind == "huge":
        assert cz.scale < 1
    if kind == "pixel":
        assert cz.scale == 45.0


def test_mask_dtypes_agree_and_bad_masks_are_named():
    frame, m = _frame(90, 120), _mask(90, 120, "blob")
    base = rg.crop_and_zoom(frame, m)
    for dt in (bool, np.int32):
        cz = rg.crop_and_zoom(frame, m.astype(dt))
        assert cz.box == base.box and np.array_equal(cz.mask_grid, base.mask_grid) and cz.kind == "uint8"
    with pytest.raises(ValueError, match="obj3: mask values must be 0/1"):
        rg.crop_and_zoom(frame, m * 255, name="obj3")
    with pytest.raises(ValueError, match="obj3: mask shape"):
        rg.crop_and_zoom(frame, m[:-1], name="obj3")
    with pytest.raises(ValueError, match="frame must be uint8"):
        rg.crop_and_zoom(frame.astype(np.float32), m)
    with pytest.raises(ValueError, match="empty crop box"):
        rg.crop_and_zoom(_frame(1, 50), np.ones((1, 50), np.uint8))


# ----------------------------------------------------------------------------- exact resizes


def test_resize_linear_u8_matches_opencv_golden():
    data = np.load(DATA / "vl3_cv2_resize.npz")
    n = len(data.files) // 2
    assert n >= 7
    for k in range(n):
        src, want = data[f"in{k}"], data[f"out{k}"]
        got = rg.resize_linear_u8(src, *want.shape[:2])
        np.testing.assert_array_equal(got, want, err_msg=f"case {k}: {src.shape} -> {want.shape}")


def test_resize_linear_u8_matches_cv2_when_available():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(7)
    for _ in range(60):
        h, w = rng.integers(1, 90, 2)
        oh, ow = rng.integers(1, 200, 2)
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        np.testing.assert_array_equal(rg.resize_linear_u8(img, oh, ow), cv2.resize(img, (int(ow), int(oh))))


def test_resize_linear_u8_close_to_bilinear():
    rng = np.random.default_rng(8)
    for (h, w, oh, ow) in [(13, 17, 40, 56), (50, 37, 14, 28), (30, 30, 15, 15), (9, 40, 42, 14)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref = F_t.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None].double(), size=(oh, ow),
                              mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
        d = np.abs(rg.resize_linear_u8(img, oh, ow) - ref)
        assert d.max() <= 1.0 + 1e-9, (h, w, oh, ow, d.max())


def test_resize_mask_u8_matches_torch():
    rng = np.random.default_rng(9)
    # includes sizes where torch's tap count rounds to 3 and is clamped (3 -> 47, 15 -> 11, 31 -> 29)
    shapes = [((3, 15), (47, 11)), ((31, 9), (29, 33)), ((1, 1), (4, 3)), ((57, 200), (4, 14))]
    shapes += [((int(a), int(b)), (int(c), int(d))) for a, b, c, d in rng.integers(1, 120, (40, 4))]
    for (h, w), (oh, ow) in shapes:
        for m in ((rng.random((h, w)) < rng.random()).astype(np.uint8), rng.integers(0, 256, (h, w), dtype=np.uint8)):
            want = F_t.interpolate(torch.from_numpy(m)[None, None], size=(oh, ow), mode="bilinear",
                                   align_corners=False)[0, 0].numpy()
            np.testing.assert_array_equal(rg.resize_mask_u8(m, oh, ow), want, err_msg=f"{(h, w)} -> {(oh, ow)}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_official_token_count_float_masks(dtype):
    """The soft count of float masks vs torch: int(sum(F.interpolate(mask))) on random boxes."""
    rng = np.random.default_rng(10)
    checked = 0
    for _ in range(120):
        h, w = rng.integers(3, 80, 2)
        oh, ow = rng.integers(1, 30, 2)
        m = np.zeros((h, w), dtype)
        r, c = rng.integers(0, h), rng.integers(0, w)
        m[r:r + rng.integers(1, 30), c:c + rng.integers(1, 30)] = 1
        soft = F_t.interpolate(torch.from_numpy(m)[None, None], size=(int(oh), int(ow)), mode="bilinear",
                               align_corners=False)[0, 0]
        ours = rg.resize_mask_float(m, oh, ow, dtype)
        np.testing.assert_allclose(ours, soft.numpy(), rtol=0, atol=1e-12)
        total = float(soft.sum())
        assert abs(math.fsum(ours.astype(np.float64).ravel()) - total) < 1e-4
        if abs(total - round(total)) < 1e-4:  # the summation order decides int(); not emulated (documented)
            continue
        assert rg.official_token_count(m, (oh, ow), Q=1000) == int(total)
        checked += 1
    assert checked > 50


def test_float_mask_count_mismatch_strict_and_parity():
    """A float64 box mask: the official's soft count disagrees with ours -> a named error; parity
    reproduces the official count (and, here, its own inconsistency) with warnings."""
    frame = _frame(120, 100)
    m = np.zeros((120, 100))
    m[40:42, 40:42] = 1  # official: int(10.7) -> 10 tokens pooled from 25 soft cells; ours: 9 cells
    cz = rg.crop_and_zoom(frame, m)
    ref = ref_resize_image_mask(frame, torch.from_numpy(m))
    assert cz.kind == "float64" and ref["count"] == 10 and int(cz.mask_grid.sum()) == 9
    with pytest.raises(rg.RegionCountMismatch, match="sample 7 object 1"):
        rg.region_tokens(cz, name="sample 7 object 1")
    rt = rg.region_tokens(cz, parity=True, name="sample 7 object 1")
    assert rt.count == ref["count"] and rt.num_cells == int((ref["grid"] > 0).sum()) == 25
    np.testing.assert_array_equal(rt.grid, (ref["grid"] > 0).astype(np.uint8))
    assert len(rt.warnings) == 1 and "sample 7 object 1" in rt.warnings[0]

    frame, m = _frame(64, 67), np.zeros((64, 67))
    m[53:57, 64:67] = 1  # at the border: the official counts 7 but pools 10 vectors (its splice fails)
    cz = rg.crop_and_zoom(frame, m)
    ref = ref_resize_image_mask(frame, torch.from_numpy(m))
    rt = rg.region_tokens(cz, parity=True, name="o")
    assert rt.count == ref["count"] < min(10, int((ref["grid"] > 0).sum())) == min(10, rt.num_cells)
    assert any("splice fails" in s for s in rt.warnings)
    # the same mask as uint8 never disagrees
    rt8 = rg.region_tokens(rg.crop_and_zoom(frame, m.astype(np.uint8)))
    assert rt8.count == rt8.official_count


# ----------------------------------------------------------------------------- cells and pooling


@pytest.mark.parametrize("crop_grid,mask_grid",
                         [((5, 7), (5, 7)), ((8, 6), (5, 7)), ((3, 4), (6, 9)), ((4, 9), (4, 5))])
def test_region_cells_equal_torch_feature_resize(crop_grid, mask_grid):
    rng = np.random.default_rng(11)
    e, off = 6, 17
    feat = rng.standard_normal((e,) + crop_grid).astype(np.float32)
    mask = (rng.random(mask_grid) < 0.5).astype(np.uint8)
    cells, weights = rg.region_cells(mask, crop_grid, off)
    assert cells.shape == (int(mask.sum()), 4) and cells.dtype == np.int32 and weights.dtype == np.float32
    if crop_grid == mask_grid:
        assert (cells[:, 1:] == -1).all() and (weights[:, 0] == 1).all()
    packed = np.concatenate([rng.standard_normal((off, e)), feat.reshape(e, -1).T]).astype(np.float32)  # [N, E]
    got = dev.gather_cells(jnp.asarray(packed)[None], jnp.asarray(cells)[None, None],
                           jnp.asarray(weights)[None, None])[0, 0]
    x = torch.from_numpy(feat)[None]
    if crop_grid != mask_grid:
        x = F_t.interpolate(x, size=mask_grid, mode="bilinear", align_corners=False)
    want = (x * torch.from_numpy(mask > 0))[0][:, torch.from_numpy(mask > 0)].T.numpy()  # raster order
    err = np.abs(np.asarray(got) - want).max()
    assert err <= TOL, err


def test_kmeans_matches_torch():
    """Several regions in one call: k-means with injected inits (normal, an empty cluster, early
    stop), a region with <= Q cells, an empty slot; vs the torch kmeans_fast."""
    rng = np.random.default_rng(12)
    q, e, c = 4, 5, 30
    x = np.zeros((1, 6, c, e), np.float32)
    n = np.array([[30, 22, 16, 3, 0, 12]])
    init = np.zeros((1, 6, q), np.int32)
    x[0, 0] = rng.standard_normal((c, e))
    init[0, 0] = rg.kmeans_init(30, q, rg.seeded_rng("s", 0))
    # ties: cell 2 (and cells 5.. in their first dim) lie halfway between the centroids started at
    # cells 0 and 1 and go to the first; an outlier twice (cells 3, 4): the cluster started at the
    # second copy never wins a point and stays empty
    x[0, 1, 0, 0], x[0, 1, 1, 0], x[0, 1, 3:5] = -1.0, 1.0, 30.0
    x[0, 1, 5:22, 1] = 10.0
    x[0, 1, 5:22, 2:] = 0.1 * rng.standard_normal((17, e - 2))
    init[0, 1] = [0, 1, 3, 4]
    centers = rng.standard_normal((4, e)) * 20  # well separated: converges (early stop)
    x[0, 2, :16] = (centers[np.arange(16) % 4] + 0.01 * rng.standard_normal((16, e)))
    init[0, 2] = [0, 1, 2, 7]
    x[0, 3, :3] = rng.standard_normal((3, e))
    # far from the origin, rtol 1e-5 makes every move "close": the official stops in the first round
    # and returns the initial draw unchanged
    x[0, 5, :12] = 1e6 + rng.standard_normal((12, e))
    init[0, 5] = [4, 0, 11, 7]
    x[0, 3, 3:] = 99  # padding cells must not leak
    x[0, 1, 22:] = -50
    got = np.asarray(dev.kmeans(jnp.asarray(x), jnp.asarray(n), jnp.asarray(init), iters=20))
    rounds = {}
    for r in (0, 1, 2, 5):
        want, rounds[r] = ref_kmeans(torch.from_numpy(x[0, r, :n[0, r]]), torch.from_numpy(init[0, r]).long(), q, 20)
        err = np.abs(got[0, r] - want.numpy()).max()
        assert err <= TOL, (r, err)
    assert rounds[2] < 20 and rounds[0] > 2 and rounds[5] == 1, rounds  # early stops; region 0 ran longer
    np.testing.assert_array_equal(got[0, 5], x[0, 5, init[0, 5]])
    # the empty cluster (started at the duplicate) kept its initial centroid
    np.testing.assert_array_equal(got[0, 1, 3], x[0, 1, 4])
    np.testing.assert_array_equal(got[0, 1, 2], x[0, 1, 3])
    np.testing.assert_array_equal(got[0, 3, :3], x[0, 3, :3])
    assert (got[0, 3, 3:] == 0).all() and (got[0, 4] == 0).all()
    # a 1-round budget returns the first update unconverged, as the official's loop
    got2 = np.asarray(dev.kmeans(jnp.asarray(x), jnp.asarray(n), jnp.asarray(init), iters=1))
    want2, _ = ref_kmeans(torch.from_numpy(x[0, 0]), torch.from_numpy(init[0, 0]).long(), q, 1)
    assert np.abs(got2[0, 0] - want2.numpy()).max() <= TOL
    assert np.abs(got2[0, 0] - got[0, 0]).max() > 1e-3  # and differs from the converged result


def test_kmeans_init_and_pack():
    a = rg.kmeans_init(40, 10, rg.seeded_rng("sample-1", 2))
    b = rg.kmeans_init(40, 10, rg.seeded_rng("sample-1", 2))
    c = rg.kmeans_init(40, 10, rg.seeded_rng("sample-1", 3))
    assert a.dtype == np.int32 and len(set(a.tolist())) == 10 and (a < 40).all()
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0)).numpy()
    np.testing.assert_array_equal(rg.kmeans_init(40, 10, permutation=perm), perm[:10])
    assert (rg.kmeans_init(7, 10, rg.seeded_rng("x", 0)) == 0).all()
    with pytest.raises(ValueError, match="distinct"):
        rg.kmeans_init(40, 10, permutation=np.zeros(40, int))
    cl, wt = rg.region_cells(np.ones((2, 3)), (2, 3), 5)
    packed = rg.pack_regions([(cl, wt, np.zeros(10, np.int32)), (cl[:2], wt[:2], np.arange(10, dtype=np.int32))])
    assert packed["region_cells"].shape == (2, 6, 4) and packed["region_num_cells"].tolist() == [6, 2]
    assert (packed["region_cells"][1, 2:] == -1).all() and (packed["region_weights"][1, 2:] == 0).all()
    np.testing.assert_array_equal(packed["region_cells"][0, :, 0], np.arange(5, 11))


# ----------------------------------------------------------------------------- the region encoder


def test_region_encoder_matches_torch():
    """Crops through the whole device path (gather, k-means, feat_linear) vs MaskPooling + torch
    nn.Sequential(Linear, GELU, Linear), with the crop grid != mask grid on one region."""
    rng = np.random.default_rng(13)
    e, hdim, q = 16, 24, 10
    crops = [((6, 7), (6, 7), 0.9), ((5, 4), (8, 6), 0.6), ((3, 3), (3, 3), 0.3)]  # (crop grid, mask grid, density)
    feats, masks, regions, off = [], [], [], 0
    for k, (cg, mg, p) in enumerate(crops):
        f = rng.standard_normal((cg[0] * cg[1], e)).astype(np.float32)
        m = (rng.random(mg) < p).astype(np.uint8)
        cells, weights = rg.region_cells(m, cg, off)
        init = rg.kmeans_init(len(cells), q, rg.seeded_rng("enc", k))
        feats.append(f), masks.append(m), regions.append((cells, weights, init))
        off += len(f)
    packed = rg.pack_regions(regions + [(np.zeros((0, 4), np.int32), np.zeros((0, 4), np.float32),
                                          np.zeros(q, np.int32))], q)  # + an empty slot
    n_cells = packed["region_num_cells"]
    assert n_cells[0] > q and n_cells[1] > q and 0 < n_cells[2] <= q and n_cells[3] == 0
    features = np.concatenate(feats + [np.zeros((5, e), np.float32)])[None]  # padded patches
    args = [jnp.asarray(features)] + [jnp.asarray(packed[k])[None] for k in
                                      ("region_cells", "region_weights", "region_num_cells", "region_init")]
    enc = dev.RegionEncoder(hidden_size=hdim, num_tokens=q)
    params = enc.init(jax.random.PRNGKey(0), *args)
    tokens, counts = jax.jit(enc.apply)(params, *args)
    assert tokens.shape == (1, 4, q, hdim) and counts.tolist() == [[q, q, int(n_cells[2]), 0]]

    p = jax.tree.map(np.asarray, nn.meta.unbox(params))["params"]
    mlp = torch.nn.Sequential(torch.nn.Linear(e, hdim), torch.nn.GELU(), torch.nn.Linear(hdim, hdim))
    with torch.no_grad():
        for i in (0, 2):
            mlp[i].weight.copy_(torch.tensor(p[f"feat_linear_{i}"]["kernel"].T))
            mlp[i].bias.copy_(torch.tensor(p[f"feat_linear_{i}"]["bias"]))
    err = 0.0
    for k, (cg, mg, _) in enumerate(crops):
        x = torch.from_numpy(feats[k]).reshape(cg[0], cg[1], e).permute(2, 0, 1)
        pooled = ref_mask_pooling(x, torch.from_numpy(masks[k]), torch.from_numpy(regions[k][2]).long(), q)
        with torch.no_grad():
            want = mlp(pooled).numpy()
        m = min(q, int(n_cells[k]))
        err = max(err, np.abs(np.asarray(tokens[0, k, :m]) - want).max())
        assert (np.asarray(tokens[0, k, m:]) == 0).all()
    assert err <= TOL, err
    assert (np.asarray(tokens[0, 3]) == 0).all()
    assert sorted(p) == ["feat_linear_0", "feat_linear_2"]
