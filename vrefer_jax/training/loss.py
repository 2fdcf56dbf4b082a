"""Next-token cross-entropy over supervised labels, without materialising [B, L, V] logits at once.

The official loss (HF causal LM) shifts labels by one and averages over supervised tokens. We return
the *sum* and the *count* so that gradient accumulation and data parallelism average over the tokens
of the whole global batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vrefer_jax.config import IGNORE_INDEX
from vrefer_jax.models import fast_ops
from vrefer_jax.sharding import constrain


def shift_labels(labels: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """[B, L] labels aligned with inputs -> targets: position t predicts label t+1 (last: ignored).

    With segment_ids [B, L] (packed rows), a target in another segment than its position is
    ignored: a sample's last token never predicts the next sample's first label, so a packed row's
    loss is the sum of its samples' losses."""
    pad = jnp.full(labels.shape[:1] + (1,), IGNORE_INDEX, labels.dtype)
    targets = jnp.concatenate([labels[:, 1:], pad], axis=1)
    if segment_ids is not None:
        nxt = jnp.concatenate([segment_ids[:, 1:], jnp.zeros_like(segment_ids[:, :1])], axis=1)
        targets = jnp.where(nxt == segment_ids, targets, IGNORE_INDEX)
    return targets


def _chunk_loss(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, compute_dtype) -> tuple[jax.Array, jax.Array]:
    """hidden [B, C, E], kernel [E, V], targets [B, C] -> (sum of CE, number of supervised tokens)."""
    # One 2-D GEMM with a hand-written backward: autodiff of the [B, C, E] x [E, V] dot gives XLA a
    # weight gradient with a transposed [V, B*C] copy of the logits' cotangent (fast_ops).
    logits = fast_ops.matmul_last(hidden.astype(compute_dtype), kernel.astype(compute_dtype)).astype(jnp.float32)
    logits = constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))
    valid = targets != IGNORE_INDEX
    logz = jax.nn.logsumexp(logits, axis=-1)
    gold = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    nll = jnp.where(valid, logz - gold, 0.0)
    return nll.sum(), valid.sum()


def cross_entropy_sum(hidden: jax.Array, kernel: jax.Array, labels: jax.Array, *, chunk_size: int = 0,
                      compute_dtype=jnp.float32, segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Summed next-token CE of the LM head over `hidden` [B, L, E] with input-aligned `labels` [B, L]
    (`segment_ids` [B, L]: no target across a segment boundary, see `shift_labels`).

    chunk_size > 0 splits the sequence into chunks whose logits are recomputed in the backward pass
    (`jax.checkpoint`), so peak memory holds one chunk of fp32 logits instead of L x V per row.
    The logits are the LM head's: matmul in `compute_dtype`, upcast to fp32 (as `qwen2.LMHead`).
    Returns (sum over supervised tokens, their count), both scalars.
    """
    targets = shift_labels(labels, segment_ids)
    L = hidden.shape[1]
    if chunk_size <= 0 or chunk_size >= L:
        return _chunk_loss(hidden, kernel, targets, compute_dtype)
    n = -(-L // chunk_size)
    pad = n * chunk_size - L
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
    B, E = hidden.shape[0], hidden.shape[2]
    hs = hidden.reshape(B, n, chunk_size, E).swapaxes(0, 1)
    ts = targets.reshape(B, n, chunk_size).swapaxes(0, 1)
    body = jax.checkpoint(lambda h, t: _chunk_loss(h, kernel, t, compute_dtype))

    def step(carry, xs):
        s, c = body(*xs)
        return (carry[0] + s, carry[1] + c), None

    (total, count), _ = jax.lax.scan(step, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)), (hs, ts))
    return total, count
