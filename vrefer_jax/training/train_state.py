"""The training state and its shardings.

State shardings come from the parameters' logical axis names: the state is built abstractly with
boxed (`nn.Partitioned`) parameters, so the AdamW moments inherit their parameter's names, and the
rules table maps the names onto the mesh. Real states are then created (or restored) directly into
those shardings; nothing is first materialised on one device.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vrefer_jax import families


@flax.struct.dataclass
class TrainState:
    """step: batches consumed; rng: raw uint32 PRNG key; nonfinite: consecutive skipped steps."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    nonfinite: jax.Array


def _new_state(params, tx: optax.GradientTransformation, rng) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng,
                      nonfinite=jnp.zeros((), jnp.int32))


def abstract_state(cfg, tx: optax.GradientTransformation) -> TrainState:
    """Shapes of the state with boxed parameters and moments (for the shardings)."""
    params = families.for_config(cfg).abstract_params(cfg, boxed=True)
    return jax.eval_shape(lambda p: _new_state(p, tx, jax.random.PRNGKey(0)), params)


def state_shardings(cfg, tx: optax.GradientTransformation, mesh, rules) -> TrainState:
    """A `TrainState` of `NamedSharding`s (unboxed structure)."""
    boxed = abstract_state(cfg, tx)
    specs = nn.get_partition_spec(boxed)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def abstract_unboxed(cfg, tx, shardings: TrainState) -> TrainState:
    """`ShapeDtypeStruct`s with shardings: the restore target."""
    shapes = nn.meta.unbox(abstract_state(cfg, tx))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def create_state(cfg, tx, shardings: TrainState, seed: int, params=None) -> TrainState:
    """A fresh state in `shardings`: random parameters (seeded) or the given ones (e.g. imported
    from a checkpoint; resharded if needed and donated), zero moments."""
    rng = jax.random.PRNGKey(seed)
    if params is not None:
        new = jax.jit(lambda r, p: _new_state(p, tx, r), out_shardings=shardings, donate_argnums=(1,))
        return new(rng, params)
    family = families.for_config(cfg)

    def init(r):
        init_rng, state_rng = jax.random.split(r)
        return _new_state(family.init_params(cfg, init_rng), tx, state_rng)

    return jax.jit(init, out_shardings=shardings)(rng)


