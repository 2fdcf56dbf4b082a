"""The whole train step against the official one in PyTorch (`tests/torch_reference.py`): the same
weights (our official-layout export read by the reference), the same batch, one step of each.

The reference is transformers' SigLIP (frozen, no grad, hidden_states[-2]) and Qwen2ForCausalLM,
timm's RegStage connector, the looped region encoder and splice, HF's mean CE, clip_grad_norm_ and
torch.optim.AdamW over the stage's trainable set. Loss, gradient norm and the updated parameters
must agree at fp32.
"""

import pathlib

import jax
import numpy as np
import pytest

from vrefer_jax import batch as batch_lib
from vrefer_jax.checkpoints import hf_config, key_map
from vrefer_jax.checkpoints import videorefer_keys as keys
from vrefer_jax.config import VIDEO_TOKEN_INDEX, model_config_from_gin
from vrefer_jax.sharding import MeshConfig, logical_axis_rules, make_mesh
from vrefer_jax.training import train_state
from vrefer_jax.training.optimizer import OptimizerConfig, make_optimizer
from vrefer_jax.training.stages import stage_trainable
from vrefer_jax.training.step import StepConfig, make_train_step

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("timm.models.regnet")

import torch_reference as tref  # noqa: E402  (tests/: torch, timm, transformers only)

pytestmark = pytest.mark.torch

TINY = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny.gin")
LR = 1e-3


def step_batch(cfg, rng):
    """2 rows: a video with two objects (one on 5 frames, one on 1) and supervised text, and a video
    with one 3-frame object and a shorter (padded) text."""
    B, L, T, S, g = 2, 20, cfg.num_frames, cfg.vision.image_size, cfg.vision.grid
    K, M, F = 2, 5, 6
    reg = cfg.region_token_id
    ids = rng.integers(1, reg, size=(B, L)).astype(np.int32)
    segs = np.ones((B, L), np.int32)
    segs[1, 15:] = 0
    ids[1, 15:] = 0
    ids[0, [1, 4, 7]] = [VIDEO_TOKEN_INDEX, reg, reg]
    ids[1, [0, 3]] = [VIDEO_TOKEN_INDEX, reg]
    labels = np.where(np.arange(L) >= 9, ids, -100).astype(np.int32)
    labels[1, 15:] = -100
    frames = np.full((B, K, M), -1, np.int32)
    frames[0, 0] = [0, 1, 2, 3, 5]
    frames[0, 1, 0] = 4
    frames[1, 0, :3] = [2, 0, 1]
    valid = np.array([[True, True], [True, False]])
    masks = rng.random((B, K, M, 2 * g + 3, 3 * g)) < 0.4  # full-size masks: resized on both sides
    masks &= (frames >= 0)[..., None, None]
    return dict(input_ids=ids, labels=labels, segment_ids=segs,
                frames=rng.standard_normal((B, T, S, S, 3)).astype(np.float32),
                region_frames=rng.standard_normal((B, F, S, S, 3)).astype(np.float32),
                object_frames=frames, object_masks=masks, object_valid=valid)


def test_one_step_matches_pytorch():
    cfg = model_config_from_gin([TINY])
    trainable = stage_trainable("stage3")
    b = step_batch(cfg, np.random.default_rng(0))
    out_len = 20 + batch_lib.model_video_tokens(cfg) + 3 * cfg.object_encoder.region_token_num
    batch_lib.validate(cfg, b, out_len)
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), jax.devices()[:1])
    rules = logical_axis_rules()
    tx, schedule = make_optimizer(OptimizerConfig(trainable=trainable, learning_rate=LR, schedule="constant",
                                                  warmup_ratio=0.0, max_grad_norm=1.0), total_steps=10)
    shardings = train_state.state_shardings(cfg, tx, mesh, rules)
    state = train_state.create_state(cfg, tx, shardings, seed=0)
    before = key_map.flax_to_hf(state.params, keys.videorefer_rules(cfg))

    ref = tref.VideoReferReference.from_official_config(hf_config.model_config_to_hf(cfg, torch_dtype="float32"))
    missing = ref.load_official(before)
    assert missing and all("layers.2." in k or "post_layernorm" in k or "head" in k for k in missing), missing
    params = ref.trainable_parameters(trainable)
    assert not any(p.requires_grad for p in ref.vision_tower.parameters())
    torch_step = tref.ReferenceTrainStep(ref, params, lr=LR, max_grad_norm=1.0)
    t_loss, t_norm = torch_step(tref.official_inputs(b))

    step = make_train_step(cfg, StepConfig(out_len=out_len), tx, schedule, trainable, mesh, rules, shardings,
                           {k: v.ndim for k, v in b.items()})
    state, m = step(state, b)
    j_loss, j_norm = float(m["loss"]), float(m["grad_norm"])
    print(f"\nloss JAX {j_loss:.6f} PyTorch {t_loss:.6f}; grad norm JAX {j_norm:.6f} PyTorch {t_norm:.6f}")
    assert int(m["supervised_tokens"]) == int((b["labels"][:, 1:] != -100).sum())
    np.testing.assert_allclose(j_loss, t_loss, rtol=2e-5)
    np.testing.assert_allclose(j_norm, t_norm, rtol=1e-4)
    assert t_norm > 1.0  # clipping is exercised

    after = key_map.flax_to_hf(state.params, keys.videorefer_rules(cfg))
    torch_after = {**{tref.TOWER_PREFIX + "vision_model." + k: v for k, v in ref.vision_tower.state_dict().items()},
                   **{tref.PROJECTOR_PREFIX + k: v for k, v in ref.mm_projector.state_dict().items()},
                   **{tref.REGION_PREFIX + k: v for k, v in ref.region_encoder.state_dict().items()},
                   **ref.lm.state_dict()}
    worst, moved, off, total = 0.0, 0, 0, 0
    for name, new in after.items():
        old, want = before[name], torch_after[name].detach().numpy()
        if name.startswith(tref.TOWER_PREFIX):  # frozen on both sides: bit-identical
            np.testing.assert_array_equal(new, old, err_msg=name)
            np.testing.assert_array_equal(want, old, err_msg=name)
            continue
        diff = np.abs(new - want)
        worst = max(worst, float(diff.max()))
        moved += int((np.abs(new - old) > 0.5 * LR).sum())
        off += int((diff > 0.02 * LR).sum())
        total += new.size
    # Adam's first update is lr * g / (|g| + eps): where |g| is down at rounding level its size and
    # sign are noise on either side, so a few entries may differ by up to 2 lr; the rest agree.
    print(f"updated parameters: max |JAX - PyTorch| {worst:.2e} (lr {LR}); {off} of {total} entries off by "
          f"> lr/50; {moved} moved by > lr/2")
    assert worst <= 2 * LR * 1.01 and off <= 1e-4 * total
    assert moved > 0.5 * total
