"""Pooled packed batches (VideoRefer-7B): videos in per-group pools instead of per-row slots.

What must hold (tiny config, fp32): every segment of a pooled batch computes what its sample
computes alone (logits, positions, loss sum / count, gradients), whichever pool entry holds its
video; `validate` refuses an index that would give a row another row's video or none; the packer
keeps every group within its pool (a sample never loses its video: it moves to a later group),
fills groups without empty rows and moves whole groups when it shuffles; the loader's pooled
stream has every sample once, each placeholder reading its own frames, and resumes exactly; the
train step gives the same update on one device, with grouped micro-batches, and on 8 devices."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipeline import loader
from data_pipeline import packing as packing_lib
from test_packing import _alone, _example, _loss_and_grad, _pcfg, records, tok, vr  # noqa: F401 (fixtures)
from vrefer_jax import batch as batch_lib
from vrefer_jax import packed_batch
from vrefer_jax.models.videorefer import VideoRefer

POOL_KW = dict(seq_len=96, videos=3, region_frames=8, objects=8, object_frames=2, pad_token_id=0)


def _pool_batch(cfg, rows, pool_rows, V):
    b = packed_batch.pack_batch(rows, pool_rows=pool_rows, pool_videos=V, mask_size=cfg.vision.grid, **POOL_KW)
    return b, [str(s) for s in b.pop("sample_ids")]


@pytest.fixture(scope="module")
def five(vr):
    cfg, params, exs = vr
    e = _example(np.random.default_rng(7), cfg, "e", 12, 1)
    return cfg, params, exs + [e]  # a (video), b (text), c (image), d (video), e (video)


def test_pooled_batch_equals_samples_alone(five):
    """Rows [a+b], [c] share pool 0, rows [d], [e] pool 1 (V = 3: one entry of each pool unused).
    Each segment's logits, positions, the loss and the gradients equal the samples alone; so does a
    batch whose pool 1 is filled in the other order (the index, not the position, binds)."""
    cfg, params, exs = five
    a, b, c, d, e = exs
    batch, names = _pool_batch(cfg, [[a, b], [c], [d], [e]], pool_rows=2, V=3)
    assert names == ["a+b", "c", "d", "e"]
    assert batch["frames"].shape[:2] == (2, 3) and batch["video_index"].tolist() == [[0, -1, -1], [1, -1, -1],
                                                                                      [0, -1, -1], [1, -1, -1]]
    batch_lib.validate(cfg, batch, 256, names)
    swapped = {k: v.copy() for k, v in batch.items()}
    swapped["frames"][1, [0, 2]] = batch["frames"][1, [2, 0]]  # d's video to entry 2
    swapped["video_index"][2, 0] = 2
    batch_lib.validate(cfg, swapped, 256, names)

    alone, n_alone = _alone(cfg, exs)
    run = _loss_and_grad(VideoRefer(cfg), lambda p: p["lm_head"]["kernel"])
    (t_a, (c_a, lg_a, seg_a, _)), g_a = run(params, alone, n_alone)
    where = [(0, 1), (0, 2), (1, 1), (2, 1), (3, 1)]  # sample -> (row, segment) in the pooled batch
    for pooled in (batch, swapped):
        (t_p, (c_p, lg_p, seg_p, pos_p)), g_p = run(params, pooled, 256)
        for s, (r, seg) in enumerate(where):
            mine, theirs = np.asarray(seg_a[s]) == 1, np.asarray(seg_p[r]) == seg
            assert theirs.sum() == mine.sum() > 0
            np.testing.assert_array_equal(np.asarray(pos_p[r])[theirs], np.arange(mine.sum()))
            np.testing.assert_allclose(np.asarray(lg_p[r])[theirs], np.asarray(lg_a[s])[mine], atol=2e-5, rtol=1e-5)
        assert int(c_p) == int(c_a) > 0
        np.testing.assert_allclose(float(t_p), float(t_a), rtol=1e-5)
        for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(g_p), jax.tree_util.tree_leaves(g_a)):
            assert float(jnp.abs(x - y).max()) <= 1e-4 * (float(jnp.abs(y).max()) + 1e-6), jax.tree_util.keystr(path)
    # an index pointing at the unused (zero) entry changes d's logits: the gather really reads the pool
    wrong = {k: v.copy() for k, v in batch.items()}
    wrong["video_index"][2, 0] = 2
    (_, (_, lg_w, seg_w, _)), _ = run(params, wrong, 256)
    assert np.abs(np.asarray(lg_w[2]) - np.asarray(run(params, batch, 256)[0][1][1][2])).max() > 1e-3


def test_validate_refuses_bad_pool_indices(five):
    cfg, _, exs = five
    a, b, c, d, e = exs
    batch, names = _pool_batch(cfg, [[a, b], [c], [d], [e]], pool_rows=2, V=3)
    cases = [((1, 0, 0), r"sample c: .*video_index \[0, -1, -1\] .*|video pool 0 \(rows a\+b, c\)"),
             ((0, 0, -1), r"sample a\+b: 1 <video>/<image> placeholders but video_index \[-1, -1, -1\]"),
             ((3, 0, 3), r"sample e: video_index \[3, -1, -1\] outside the pool of 3 videos"),
             ((0, 1, 2), r"sample a\+b: 1 <video>/<image> placeholders but video_index \[0, 2, -1\]")]
    for (row, p, value), msg in cases:
        bad = {k: v.copy() for k, v in batch.items()}
        bad["video_index"][row, p] = value
        with pytest.raises(batch_lib.BatchError, match=msg):
            batch_lib.validate(cfg, bad, 256, names)
    with pytest.raises(ValueError, match=r"video pool of rows a\+b, c: 2 videos but the pool holds 1"):
        _pool_batch(cfg, [[a, b], [c]], pool_rows=2, V=1)
    # the last group of a short batch is completed with empty rows (no video, no tokens)
    short, names = _pool_batch(cfg, [[a], [c], [d]], pool_rows=2, V=2)
    assert names == ["a", "c", "d", ""] and short["frames"].shape[0] == 2
    assert short["video_index"][3].tolist() == [-1, -1, -1] and not short["segment_ids"][3].any()
    batch_lib.validate(cfg, short, 256, names)


def test_first_fit_decreasing_with_group_budget():
    """Every item once, row and group budgets hold, groups of exactly R rows (the last one may be
    short), no empty row; a tighter pool means more rows, never a lost item."""
    rng = np.random.default_rng(3)
    sizes = [dict(L=int(rng.integers(5, 60)), videos=int(rng.random() < 0.9)) for _ in range(60)]
    budget, R = dict(L=100, videos=4), 3
    n_rows = {}
    for V in (3, 5, 8, 12):
        rows, used = packing_lib.first_fit_decreasing(sizes, budget, "L", group_rows=R, group_budget=dict(videos=V))
        assert sorted(i for r in rows for i in r) == list(range(60))
        assert all(r for r in rows)
        for g in range(0, len(rows), R):
            assert sum(sizes[i]["videos"] for r in rows[g:g + R] for i in r) <= V
        for r, u in zip(rows, used):
            assert sum(sizes[i]["L"] for i in r) == u["L"] <= 100
            assert sum(sizes[i]["videos"] for i in r) == u["videos"] <= 4
        n_rows[V] = len(rows)
    assert n_rows[3] > n_rows[5] >= n_rows[8] >= n_rows[12]
    assert n_rows[12] == len(packing_lib.first_fit_decreasing(sizes, budget, "L")[0])  # never binding at R * 4
    with pytest.raises(ValueError, match="below one per row"):
        packing_lib.first_fit_decreasing(sizes, budget, "L", group_rows=3, group_budget=dict(videos=2))


def _pool_loader_cfg(tok, **kw):
    base = dict(batch_size=4, pack_pool_rows=2, pack_pool_videos=3, pack_window=7)
    base.update(kw)
    return _pcfg(tok, **base)


def test_loader_pools_every_sample_once_with_its_own_video(records, tok):
    mcfg, cfg = _pool_loader_cfg(tok)
    reader = loader.open_source(records)
    frames_of = {}
    for i in range(len(reader)):  # each sample alone through the unpacked transform: its own frames
        rec = reader[i]
        ex = loader.SampleTransform(cfg, tok)(rec)["_item"]
        frames_of[ex.sample_id] = ex.frames
    it = loader.make_loader(records, cfg, tok)
    seen = []
    for b in it:
        ids = [str(s) for s in b["sample_ids"]]
        G = b["frames"].shape[0]
        assert b["frames"].shape[1:] == (3, 4, 8, 8, 3) and len(ids) == 2 * G
        batch_lib.validate(mcfg, {k: v for k, v in b.items() if k != "sample_ids"}, 360, ids)
        for r, name in enumerate(ids):
            parts = [p for p in name.split(packed_batch.PACK_SEPARATOR) if p]
            for p_i, sid in enumerate(parts):  # every sample here has a video: placeholder p -> entry
                entry = b["video_index"][r, p_i]
                np.testing.assert_array_equal(b["frames"][r // 2, entry], frames_of[sid])
            seen += parts
    assert sorted(seen) == sorted(f"s{i}" for i in range(30))
    assert sum(it.skipped.values()) == 0


def test_loader_pooled_resumes_exactly_and_shuffles_groups(records, tok):
    _, cfg = _pool_loader_cfg(tok, num_epochs=2, drop_remainder=True)

    def rows(it):
        return [([str(s) for s in b["sample_ids"]], b["video_index"].tolist()) for b in it]

    ref = rows(loader.make_loader(records, cfg, tok))
    assert ref == rows(loader.make_loader(records, cfg, tok))
    for k in (1, 3):
        it = loader.make_loader(records, cfg, tok)
        head = rows(next(it) for _ in range(k))
        it2 = loader.make_loader(records, cfg, tok)
        it2.set_state(json.loads(json.dumps(it.get_state())))
        assert head + rows(it2) == ref, k
    with pytest.raises(ValueError, match="pack_pool_videos 1 must be at least pack_pool_rows 2"):
        _pool_loader_cfg(tok, pack_pool_videos=1)
    with pytest.raises(ValueError, match="pack_pool_rows 3 must divide batch_size 4"):
        _pool_loader_cfg(tok, pack_pool_rows=3)


@pytest.mark.slow  # three train-step compiles
def test_pooled_train_step_one_device_micro_batches_and_8_devices(five):
    """8 rows in 4 pools of 2 rows: one device, one device with 2 micro-batches (whole groups move)
    and a (2, 2, 2) mesh (pools split over data x fsdp with their rows) give the same step."""
    from vrefer_jax.sharding import MeshConfig, logical_axis_rules, make_mesh
    from vrefer_jax.training import optimizer, step as step_lib, train_state

    cfg, _, exs = five
    a, b, c, d, e = exs
    batch, _ = _pool_batch(cfg, [[a, b], [c], [d], [e], [b, c], [e], [d, b], [a]], pool_rows=2, V=3)
    ocfg = optimizer.OptimizerConfig(learning_rate=1e-2, warmup_ratio=0.0, eps=1e-3,
                                     trainable=("mm_projector", "region_encoder", "llm", "lm_head"))

    def one(mesh_shape, accum):
        rules = logical_axis_rules()
        tx, sched = optimizer.make_optimizer(ocfg, 10)
        mesh = make_mesh(MeshConfig(*mesh_shape), jax.devices()[: int(np.prod(mesh_shape))])
        sh = train_state.state_shardings(cfg, tx, mesh, rules)
        state = train_state.create_state(cfg, tx, sh, seed=0)
        fn = step_lib.make_train_step(cfg, step_lib.StepConfig(out_len=256, accum_steps=accum, logits_chunk=64),
                                      tx, sched, ocfg.trainable, mesh, rules, sh, {k: v.ndim for k, v in batch.items()})
        state, m = fn(state, batch)
        return jax.tree.map(np.asarray, state.params), jax.device_get(m)

    p1, m1 = one((1, 1, 1), 1)
    assert int(m1["supervised_tokens"]) > 0
    for mesh_shape, accum in (((1, 1, 1), 2), ((2, 2, 2), 1)):
        p, m = one(mesh_shape, accum)
        assert int(m["supervised_tokens"]) == int(m1["supervised_tokens"])
        assert abs(m["loss"] - m1["loss"]) < 1e-5 * abs(m1["loss"]), (mesh_shape, accum)
        assert abs(m["grad_norm"] - m1["grad_norm"]) < 1e-5 * m1["grad_norm"], (mesh_shape, accum)
        diff = max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p)))
        assert diff < 1e-5, (mesh_shape, accum, diff)
