"""AdamW with linear warmup + cosine decay, gradient clipping, per-part learning rates and freezing.

Two ways to say what trains (`OptimizerConfig`):

* `trainable` + `learning_rate` (VideoRefer-7B's stage gins): the listed top-level groups train at
  one rate, the rest are frozen.
* per-part rates, as the official VRVL3 `train.py` arguments (reference_vl3 §15): `llm_lr`,
  `mm_projector_lr`, `vision_encoder_lr`, `region_encoder_lr`. Setting any of them switches to this
  mode; a part whose rate is None (unset) or 0 is frozen, as the official `None` LR. `trainable`
  then follows from the rates (binding a different non-default one is refused).

Parts -> top-level parameter names (`PART_NAMES`; each family's names are a subset):
  llm: llm, lm_head   mm_projector: mm_projector   region_encoder: region_encoder
  vision_encoder: vision_tower (VideoRefer-7B) / vision_encoder (VRVL3)

LoRA (`TextConfig.lora`): when the tree holds adapters (`lora_a` / `lora_b` leaves), an adapter
trains when its group does, and the base weights of every part that holds adapters are frozen
(for the LLM: `llm` and `lm_head`; `leaf_trainable`). Other parts train as configured (e.g. the
projector and region encoder in full beside the LLM's adapters, as the official LoRA scripts do).

Freezing goes through `optax.multi_transform`: the frozen group gets `optax.set_to_zero()`, which
keeps no state, so frozen parameters cost no optimizer memory and stay bit-identical.
Weight decay skips biases and norm scales (leaves named `bias` / `scale`), as the official AdamW
decay / no-decay groups (LayerNorm weights and biases); embeddings and kernels decay.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import optax

from vrefer_jax import families
from vrefer_jax.models.lora import ADAPTER_LEAVES

# Every top-level parameter name of every registered family, in registry order.
GROUPS = tuple(dict.fromkeys(n for f in families.REGISTRY.values() for names in f.param_groups.values()
                             for n in names))
# Per-part learning rates (the official `*_lr` arguments) -> the top-level names they cover.
PART_NAMES: dict[str, tuple[str, ...]] = {
    "llm": ("llm", "lm_head"),
    "mm_projector": ("mm_projector",),
    "vision_encoder": ("vision_tower", "vision_encoder"),
    "region_encoder": ("region_encoder",),
}
DEFAULT_TRAINABLE = ("mm_projector", "region_encoder", "llm", "lm_head")
NO_DECAY_LEAVES = ("bias", "scale")  # biases and norm scales (LayerNorm / RMSNorm / BatchNorm)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Official defaults (HF `adamw_torch`, scripts/train/*.sh): betas (0.9, 0.999), eps 1e-8,
    weight decay 0, cosine schedule with 3% warmup, max grad norm 1.0 (HF Trainer default).

    llm_lr / mm_projector_lr / vision_encoder_lr / region_encoder_lr: per-part peak rates (see the
    module docstring); all None = one `learning_rate` for the `trainable` groups."""

    learning_rate: float = 1e-5
    warmup_ratio: float = 0.03
    schedule: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    trainable: tuple[str, ...] = DEFAULT_TRAINABLE
    llm_lr: float | None = None
    mm_projector_lr: float | None = None
    vision_encoder_lr: float | None = None
    region_encoder_lr: float | None = None

    def __post_init__(self):
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        for part, lr in self.raw_part_lrs().items():
            if lr is not None and lr < 0:
                raise ValueError(f"OptimizerConfig.{part}_lr must be >= 0 or None, got {lr}")
        if self.per_part:
            derived = tuple(n for part, lr in self.part_lrs().items() if lr for n in PART_NAMES[part])
            if not derived:
                raise ValueError("per-part learning rates are all None / 0: nothing would train")
            if tuple(self.trainable) != DEFAULT_TRAINABLE and set(self.trainable) != set(derived):
                raise ValueError(f"OptimizerConfig.trainable {tuple(self.trainable)} disagrees with the per-part "
                                 f"rates {self.part_lrs()} (they train {derived}); bind one or the other")
            object.__setattr__(self, "trainable", derived)
        unknown = set(self.trainable) - set(GROUPS)
        if unknown or not self.trainable:
            raise ValueError(f"trainable must be a non-empty subset of {GROUPS}, got {self.trainable}")

    def raw_part_lrs(self) -> dict[str, float | None]:
        return {p: getattr(self, f"{p}_lr") for p in PART_NAMES}

    @property
    def per_part(self) -> bool:
        """Whether any per-part rate is bound (else `trainable` + `learning_rate`)."""
        return any(lr is not None for lr in self.raw_part_lrs().values())

    def part_lrs(self) -> dict[str, float]:
        """Peak rate of every part (0 = frozen), in either mode."""
        if self.per_part:
            return {p: float(lr or 0.0) for p, lr in self.raw_part_lrs().items()}
        return {p: (self.learning_rate if any(n in self.trainable for n in names) else 0.0)
                for p, names in PART_NAMES.items()}

    @property
    def peak_learning_rate(self) -> float:
        """The rate the logged schedule follows: `learning_rate`, or the largest per-part rate."""
        return max(self.part_lrs().values()) if self.per_part else self.learning_rate


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int, peak: float | None = None) -> optax.Schedule:
    """HF `get_cosine_schedule_with_warmup`: warmup = ceil(ratio * total) steps from 0, then a
    half cosine to `min_lr_ratio * peak` at `total_steps`. peak: default `cfg.learning_rate`."""
    lr = cfg.learning_rate if peak is None else peak
    warmup = int(-(-cfg.warmup_ratio * total_steps // 1))
    if cfg.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)],
            [warmup]) if warmup else optax.constant_schedule(lr)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=cfg.min_lr_ratio * lr)


def _tree_map_boxed(fn, params):
    return jax.tree_util.tree_map_with_path(fn, params, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _group_of(path) -> str:
    group = path[0].key
    if group not in GROUPS:
        raise ValueError(f"unknown top-level parameter group {group!r}; expected {GROUPS}")
    return group


def _key(p) -> str:
    return str(getattr(p, "key", p))


def adapter_parts(params) -> frozenset[str]:
    """Parts (`PART_NAMES` keys) whose groups hold LoRA adapters in `params` (boxed or not)."""
    part_of = {n: part for part, names in PART_NAMES.items() for n in names}
    found = set()
    jax.tree_util.tree_map_with_path(
        lambda path, _: found.add(part_of[_group_of(path)]) if _key(path[-1]) in ADAPTER_LEAVES else None,
        params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return frozenset(found)


def leaf_trainable(path, trainable: Sequence[str], lora_parts: frozenset[str] = frozenset()) -> bool:
    """Whether the leaf at `path` (tree path or tuple of names) trains: its group is in `trainable`,
    and, in a part that holds adapters (`lora_parts`), it is an adapter leaf (the base is frozen)."""
    group, leaf = _key(path[0]), _key(path[-1])
    if group not in trainable:
        return False
    if leaf in ADAPTER_LEAVES:
        return True
    return not any(group in PART_NAMES[part] for part in lora_parts)


def trainable_mask(params, trainable: Sequence[str]):
    """Same-structure tree of bools: which leaves train (`leaf_trainable`; boxed trees too)."""
    lora = adapter_parts(params)
    return _tree_map_boxed(lambda path, _: leaf_trainable(path, trainable, lora), params)


def decays(path) -> bool:
    """Whether a parameter (by its tree path) gets weight decay: not a bias or a norm scale."""
    return str(getattr(path[-1], "key", path[-1])) not in NO_DECAY_LEAVES


def decay_mask(params):
    """Same-structure tree of bools: True where weight decay applies (works on boxed trees)."""
    return _tree_map_boxed(lambda path, _: decays(path), params)


def param_labels(trainable: Sequence[str]):
    """params -> same-structure tree of 'train' / 'freeze' (works on boxed `nn.Partitioned` trees)."""

    def labels(params):
        lora = adapter_parts(params)
        return _tree_map_boxed(lambda path, _: "train" if (_group_of(path) in trainable
                                                           and leaf_trainable(path, trainable, lora)) else "freeze",
                               params)

    return labels


def part_labels(part_lrs: Mapping[str, float]):
    """params -> tree of '<part>/decay', '<part>/no_decay' or 'freeze' (a part at rate 0 is frozen)."""
    part_of = {n: p for p, names in PART_NAMES.items() for n in names}

    trainable = tuple(n for part, lr in part_lrs.items() if lr for n in PART_NAMES[part])

    def labels(params):
        lora = adapter_parts(params)

        def label(path, _):
            part = part_of[_group_of(path)]
            if not part_lrs[part] or not leaf_trainable(path, trainable, lora):
                return "freeze"
            return f"{part}/{'decay' if decays(path) else 'no_decay'}"

        return _tree_map_boxed(label, params)

    return labels


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """PyTorch's `clip_grad_norm_` (what the official HF Trainer runs): every gradient times
    min(1, max_norm / (norm + 1e-6)). One scalar factor, where optax's version selects between the
    gradient and a rescaled copy: XLA then writes that copy and reads both in the moment updates (two
    of AdamW's ~fifteen passes over each tensor on CPU). `update(..., grad_norm=n)` takes a norm the
    caller already has (the train step computes it for its non-finite guard, outside the `lax.cond`
    that holds the update, where XLA cannot share it): one read of every gradient fewer. State:
    `optax.EmptyState`, as optax's (the optimizer state tree, and so checkpoints, are unchanged)."""

    def update(updates, state, params=None, *, grad_norm=None, **extra_args):
        del params, extra_args
        norm = optax.global_norm(updates) if grad_norm is None else grad_norm
        factor = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        return jax.tree.map(lambda g: g * factor.astype(g.dtype), updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(transform, schedule of the logged rate). Clipping uses the norm of the trainable gradients
    only (frozen gradients are zero). With `trainable` + `learning_rate` (and weight decay 0) the
    transform and its state are those of earlier versions, so their checkpoints restore."""
    if not cfg.per_part:
        schedule = learning_rate_schedule(cfg, total_steps)
        chain = [clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm else []
        mask = decay_mask if cfg.weight_decay else None
        chain.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                 mask=mask))
        train = optax.chain(*chain)
        tx = optax.multi_transform({"train": train, "freeze": optax.set_to_zero()}, param_labels(cfg.trainable))
        return tx, schedule
    lrs = cfg.part_lrs()
    transforms: dict[str, optax.GradientTransformation] = {"freeze": optax.set_to_zero()}
    for part, lr in lrs.items():
        if not lr:
            continue
        sched = learning_rate_schedule(cfg, total_steps, peak=lr)
        for kind, wd in (("decay", cfg.weight_decay), ("no_decay", 0.0)):
            transforms[f"{part}/{kind}"] = optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd)
    multi = optax.multi_transform(transforms, part_labels(lrs))
    tx = optax.chain(clip_by_global_norm(cfg.max_grad_norm), multi) if cfg.max_grad_norm else multi
    return tx, learning_rate_schedule(cfg, total_steps, peak=cfg.peak_learning_rate)
