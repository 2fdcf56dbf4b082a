"""The jitted, sharded train step: gradient accumulation, global-token CE mean, clipping, AdamW,
frozen groups, non-finite guard.

    step(state, batch) -> (state, metrics)

`batch` is a global batch in the model's contract (leading dim = global batch B, sharded over the
data axes). It is split into `accum_steps` micro-batches of B / accum_steps rows that run one after
another (`lax.scan`); the loss is the sum of next-token CE over every supervised token of the
global batch divided by their count (the official per-token mean), so results do not depend on the
split or on the number of devices.

Gradients are taken only with respect to the leaves that train (`optimizer.leaf_trainable`: whole
groups, or with LoRA only the adapters of the LLM), so a LoRA step holds no gradient for the frozen
base; with `LoraConfig.dropout` the model gets a "dropout" rng per step and micro-batch. LoRA is
per token, so packed rows (segment ids) need nothing of their own.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from vrefer_jax import batch as batch_lib
from vrefer_jax import families
from vrefer_jax.models import precision
from vrefer_jax.training.loss import cross_entropy_sum
from vrefer_jax.training.optimizer import adapter_parts, leaf_trainable
from vrefer_jax.training.train_state import TrainState

DATA_AXES = ("data", "fsdp")  # mesh axes the batch dimension is split over (= activation_batch)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class StepConfig:
    """out_len: static length of the spliced sequence (official model_max_length 2048).
    accum_steps: micro-batches per step. logits_chunk: sequence chunk of the LM-head loss (0 = all)."""

    out_len: int = 2048
    accum_steps: int = 1
    logits_chunk: int = 512


def batch_sharding(mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXES, *([None] * (ndim - 1))))


def _split_trainable(params, trainable, lora_parts):
    """params -> (trained, frozen) flat dicts {path tuple: leaf}, split per leaf
    (`optimizer.leaf_trainable`: whole groups, or only the adapters of a LoRA part)."""
    flat = traverse_util.flatten_dict(params)
    train = {p: v for p, v in flat.items() if leaf_trainable(p, trainable, lora_parts)}
    return train, {p: v for p, v in flat.items() if p not in train}


def _lora_dropout(cfg) -> bool:
    """Whether the model has LoRA adapters with dropout (the step then passes a "dropout" rng)."""
    lora = getattr(getattr(cfg, "text", None), "lora", None)
    return bool(lora is not None and lora.enabled and lora.dropout > 0)


def make_train_step(cfg, step_cfg: StepConfig, tx: optax.GradientTransformation, schedule,
                    trainable: tuple[str, ...], mesh, rules, shardings: TrainState, batch_spec: dict[str, Any]):
    """The compiled-on-first-call step with explicit in/out shardings and the state donated.

    batch_spec: {key: ndim} of the batch arrays (kept for callers; every batch leaf is sharded over
    DATA_AXES on dim 0 whatever its rank, so packed and unpacked batches share the step).
    """
    family = families.for_config(cfg)
    model = family.module(cfg)
    BATCH_KEYS = family.batch_keys + family.optional_batch_keys
    A = step_cfg.accum_steps
    lora_parts = adapter_parts(shardings.params)
    grad_shardings = _split_trainable(shardings.params, trainable, lora_parts)[0]
    dropout = _lora_dropout(cfg)

    def loss_sum(train_params, frozen_params, mb, rng):
        # matmul weights in the compute dtype once per step (the layers' own casts become no-ops)
        params = precision.cast_weights(traverse_util.unflatten_dict({**frozen_params, **train_params}),
                                        cfg.compute_dtype)
        rngs = {"dropout": rng} if dropout else {}
        hidden, inputs = model.apply({"params": params}, mb, out_len=step_cfg.out_len, return_hidden=True,
                                     rngs=rngs)
        total, count = cross_entropy_sum(hidden, family.output_embedding(params), inputs["labels"],
                                         chunk_size=step_cfg.logits_chunk, compute_dtype=cfg.compute_dtype,
                                         segment_ids=inputs["segment_ids"])
        tokens = (inputs["segment_ids"] != 0).sum()
        return total, (count, tokens)

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)
    # `grad_norm=` reaches our clip (`optimizer.clip_by_global_norm`); a caller's plain optax
    # transform ignores it instead of failing (same state tree either way).
    update_tx = optax.with_extra_args_support(tx)

    def loss_mean(train_params, frozen_params, mb, rng):
        """One micro-batch holds the whole global batch: its count is the denominator, so the
        gradient comes out of the backward pass already divided (the 1/count seed costs nothing;
        dividing afterwards is one more pass over every gradient)."""
        total, (count, tokens) = loss_sum(train_params, frozen_params, mb, rng)
        return total / jnp.maximum(count, 1).astype(jnp.float32), (total, count, tokens)

    mean_grad_fn = jax.value_and_grad(loss_mean, has_aux=True)

    def micro_batches(batch):
        """[B, ...] -> [A, B/A, ...]; row i*A + a goes to micro-batch a, so each device keeps its rows.
        A pooled packed batch (`batch.VIDEO_INDEX`: frames [G, V, ...]) moves whole pool groups:
        group j*A + a and its B/G rows go to micro-batch a."""
        rows_per_group = 1
        if batch_lib.VIDEO_INDEX in batch:
            G = batch["frames"].shape[0]
            if G % A:
                raise ValueError(f"{G} video pool groups not divisible by accum_steps {A}")
            rows_per_group = batch["input_ids"].shape[0] // G

        def split(key, x):
            chunk = 1 if key == "frames" else rows_per_group  # pool groups / their rows move together
            n = x.shape[0] // chunk
            if n % A:
                raise ValueError(f"global batch {x.shape[0]} ({key}) not divisible by accum_steps {A}")
            x = x.reshape((n // A, A, chunk) + x.shape[1:]).swapaxes(0, 1).reshape((A, -1) + x.shape[1:])
            spec = PartitionSpec(None, DATA_AXES, *([None] * (x.ndim - 2)))
            return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
        return {k: split(k, v) for k, v in batch.items()}

    def step(state: TrainState, batch):
        batch = {k: v for k, v in batch.items() if k in BATCH_KEYS}
        train_p, frozen_p = _split_trainable(state.params, trainable, lora_parts)
        # LoRA dropout: a fresh key per step and micro-batch (the state's key is never advanced).
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def body(carry, mb_and_index):
            mb, a = mb_and_index
            g_acc, s_acc, c_acc, t_acc = carry
            (s, (c, t)), g = grad_fn(train_p, frozen_p, mb, jax.random.fold_in(step_key, a))
            g_acc = jax.tree.map(jnp.add, g_acc, g)
            g_acc = jax.lax.with_sharding_constraint(g_acc, grad_shardings)
            return (g_acc, s_acc + s, c_acc + c, t_acc + t), None

        if A == 1:  # gradients of the mean: nothing left to divide
            (_, (total, count, tokens)), grads = mean_grad_fn(train_p, frozen_p, batch, jax.random.fold_in(step_key, 0))
            grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
            grad_scale = None
        else:  # summed over micro-batches; the global count divides them in the update
            init = (jax.tree.map(jnp.zeros_like, train_p), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32),
                    jnp.zeros((), jnp.int32))
            (grads, total, count, tokens), _ = jax.lax.scan(body, init, (micro_batches(batch), jnp.arange(A)))
            grad_scale = jnp.maximum(count, 1).astype(jnp.float32)
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        loss = total / denom
        # With accumulation the 1/count scaling is folded into the update (one pass fewer).
        grad_norm = optax.global_norm(grads) / (1.0 if grad_scale is None else grad_scale)

        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(params, opt_state):
            flat = traverse_util.flatten_dict(params)
            full_grads = traverse_util.unflatten_dict(
                {**jax.tree.map(jnp.zeros_like, frozen_p),
                 **(grads if grad_scale is None else jax.tree.map(lambda g: g / grad_scale, grads))})
            # the clip reuses grad_norm (over the same gradients: frozen ones are zeros)
            updates, new_opt = update_tx.update(full_grads, opt_state, params, grad_norm=grad_norm)
            flat_updates = traverse_util.flatten_dict(updates)
            new_train = optax.apply_updates({k: flat[k] for k in train_p}, {k: flat_updates[k] for k in train_p})
            # Frozen leaves are carried over untouched (bit-identical), not `p + 0`.
            return traverse_util.unflatten_dict({**{k: flat[k] for k in frozen_p}, **new_train}), new_opt

        # The non-finite guard is a branch, not a select over every parameter and moment after the
        # update: a skipped step runs no update at all, a finite one pays nothing extra.
        new_params, new_opt = jax.lax.cond(finite, update, lambda p, o: (p, o), state.params, state.opt_state)
        new_state = state.replace(
            step=state.step + 1,
            params=new_params,
            opt_state=new_opt,
            nonfinite=jnp.where(finite, 0, state.nonfinite + 1),
        )
        metrics = dict(loss=loss, grad_norm=grad_norm, learning_rate=schedule(state.step),
                       supervised_tokens=count, tokens=tokens, finite=finite, nonfinite=new_state.nonfinite)
        return new_state, metrics

    # One sharding for every batch leaf (a pytree prefix): dim 0 over DATA_AXES, the rest replicated,
    # whatever the field's rank (packed frames [B, P, T, S, S, 3] included).
    batch_sh = batch_sharding(mesh, 1)
    jitted = jax.jit(step, in_shardings=(shardings, batch_sh),
                     out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())), donate_argnums=(0,))

    def run(state, batch):
        batch = {k: v for k, v in batch.items() if k in BATCH_KEYS}
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted(state, batch)

    run.jitted = jitted
    run.lower = lambda state, batch: _lower(jitted, mesh, rules, state, batch)
    return run


def _lower(jitted, mesh, rules, state, batch):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return jitted.lower(state, batch)


def make_eval_step(cfg, step_cfg: StepConfig, mesh, rules, param_shardings, batch_spec: dict[str, Any]):
    """Teacher-forced loss without gradients: (params, batch) -> dict(loss_sum, count)."""
    family = families.for_config(cfg)
    model = family.module(cfg)
    BATCH_KEYS = family.batch_keys + family.optional_batch_keys

    def evaluate(params, batch):
        batch = {k: v for k, v in batch.items() if k in BATCH_KEYS}
        hidden, inputs = model.apply({"params": params}, batch, out_len=step_cfg.out_len, return_hidden=True)
        total, count = cross_entropy_sum(hidden, family.output_embedding(params), inputs["labels"],
                                         chunk_size=step_cfg.logits_chunk, compute_dtype=cfg.compute_dtype,
                                         segment_ids=inputs["segment_ids"])
        return dict(loss_sum=total, count=count)

    batch_sh = batch_sharding(mesh, 1)  # a prefix for every batch leaf, as in the train step
    jitted = jax.jit(evaluate, in_shardings=(param_shardings, batch_sh),
                     out_shardings=NamedSharding(mesh, PartitionSpec()))

    def run(params, batch):
        batch = {k: v for k, v in batch.items() if k in BATCH_KEYS}
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted(params, batch)

    return run
