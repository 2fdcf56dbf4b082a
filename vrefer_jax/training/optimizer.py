"""AdamW with linear warmup + cosine decay, gradient clipping, and per-stage freezing.

Freezing goes through `optax.multi_transform`: the frozen group gets `optax.set_to_zero()`, which
keeps no state, so frozen parameters cost no optimizer memory and stay bit-identical.
Groups are the top-level parameter trees of the model families (`Family.param_groups`):
  VideoRefer-7B: vision_tower, mm_projector, region_encoder, llm, lm_head
  VRVL3:         vision_encoder, mm_projector, region_encoder, llm, lm_head (untied 7B only)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import gin
import jax
import optax

from vrefer_jax import families

# Every top-level parameter name of every registered family, in registry order.
GROUPS = tuple(dict.fromkeys(n for f in families.REGISTRY.values() for names in f.param_groups.values()
                             for n in names))


@gin.configurable
@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Official defaults (HF `adamw_torch`, scripts/train/*.sh): betas (0.9, 0.999), eps 1e-8,
    weight decay 0, cosine schedule with 3% warmup, max grad norm 1.0 (HF Trainer default)."""

    learning_rate: float = 1e-5
    warmup_ratio: float = 0.03
    schedule: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    trainable: tuple[str, ...] = ("mm_projector", "region_encoder", "llm", "lm_head")

    def __post_init__(self):
        unknown = set(self.trainable) - set(GROUPS)
        if unknown or not self.trainable:
            raise ValueError(f"trainable must be a non-empty subset of {GROUPS}, got {self.trainable}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """HF `get_cosine_schedule_with_warmup`: warmup = ceil(ratio * total) steps from 0, then a
    half cosine to `min_lr_ratio * lr` at `total_steps`."""
    warmup = int(-(-cfg.warmup_ratio * total_steps // 1))
    if cfg.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.learning_rate, max(warmup, 1)), optax.constant_schedule(cfg.learning_rate)],
            [warmup]) if warmup else optax.constant_schedule(cfg.learning_rate)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=cfg.min_lr_ratio * cfg.learning_rate)


def param_labels(trainable: Sequence[str]):
    """params -> same-structure tree of 'train' / 'freeze' (works on boxed `nn.Partitioned` trees)."""

    def labels(params):
        def label(path, _):
            group = path[0].key
            if group not in GROUPS:
                raise ValueError(f"unknown top-level parameter group {group!r}; expected {GROUPS}")
            return "train" if group in trainable else "freeze"

        return jax.tree_util.tree_map_with_path(label, params, is_leaf=lambda x: isinstance(x, nn.Partitioned))

    return labels


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(transform, schedule). Clipping uses the norm of the trainable gradients only."""
    schedule = learning_rate_schedule(cfg, total_steps)
    chain = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm else []
    chain.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
    train = optax.chain(*chain)
    tx = optax.multi_transform({"train": train, "freeze": optax.set_to_zero()}, param_labels(cfg.trainable))
    return tx, schedule
