"""The multimodal splice: text ids + video tokens + object tokens -> one static-length LLM input.

Official behaviour (`prepare_inputs_labels_for_multimodal`): the `<video>`/`<image>` placeholder is
replaced by all video tokens, the k-th `<region>` id of a sample by the tokens of its k-th object
(1..region_token_num of them, a data-dependent count), inserted rows get label -100, real tokens come
first and padding last, positions run 0..L'-1.

Here the expansion happens on the device with static shapes: every input position gets a size
(1 for text, `Nv` for the placeholder, `counts[k]` for the k-th region, 0 for padding); a cumulative
sum gives each input position its output span, and every output slot finds its source position with
a binary search. Output slots past the expanded length are padding (segment 0). Packed rows (several
segment ids in one row, `vrefer_jax.batch` "Packed rows") keep their segments and restart positions
per segment; the p-th placeholder of a row takes video slot p (or, in a pooled batch, the entry
`video_index[b, p]` of its group's pool: a static-shape gather), so each video expands inside its
own segment. (The loss never lets a segment's last token predict the next segment's first label:
`training.loss.cross_entropy_sum(segment_ids=...)`.)

Host-side checks that make the on-device gather safe live in `vrefer_jax.batch.check_batch`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vrefer_jax.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX, VIDEO_TOKEN_INDEX

_TEXT, _VISUAL, _REGION = 0, 1, 2


def _splice_row(text_emb, ids, labels, segments, video_index, objects, counts, video, region_id: int,
                out_len: int):
    """One row. text_emb [L,E], ids/labels/segments [L], video_index [P] (the row's p-th placeholder
    -> an entry of `video`), objects [K,R,E], counts [K]; video [V,Nv,E] the row's pool."""
    L = ids.shape[0]
    nv, r = video.shape[1], objects.shape[1]
    is_visual = (ids == IMAGE_TOKEN_INDEX) | (ids == VIDEO_TOKEN_INDEX)
    is_region = ids == region_id
    kind = jnp.where(is_visual, _VISUAL, jnp.where(is_region, _REGION, _TEXT))
    p = jnp.clip(jnp.cumsum(is_visual) - 1, 0, video_index.shape[0] - 1)  # the p-th placeholder
    vid_idx = jnp.clip(video_index[p], 0, video.shape[0] - 1)  # -> its pool entry
    obj_idx = jnp.clip(jnp.cumsum(is_region) - 1, 0, objects.shape[0] - 1)
    size = jnp.where(kind == _VISUAL, nv, jnp.where(kind == _REGION, counts[obj_idx], 1))
    size = jnp.where(segments > 0, size, 0)
    ends = jnp.cumsum(size)
    starts = ends - size

    slot = jnp.arange(out_len)
    src = jnp.clip(jnp.searchsorted(ends, slot, side="right"), 0, L - 1)
    offset = slot - starts[src]
    filled = slot < ends[-1]
    src_kind = kind[src]

    emb_text = text_emb[src]
    emb_video = video[vid_idx[src], jnp.clip(offset, 0, nv - 1)]
    emb_obj = objects[obj_idx[src], jnp.clip(offset, 0, r - 1)]
    emb = jnp.where((src_kind == _VISUAL)[:, None], emb_video.astype(emb_text.dtype), emb_text)
    emb = jnp.where((src_kind == _REGION)[:, None], emb_obj.astype(emb_text.dtype), emb)
    emb = jnp.where(filled[:, None], emb, 0)  # padding rows are zeros, as the official right-padding

    # Positions restart at each segment: the first input index of the source token's segment.
    idx = jnp.arange(L)
    seg_start = jax.lax.cummax(jnp.where(jnp.concatenate([jnp.ones(1, bool), segments[1:] != segments[:-1]]), idx, 0))
    positions = jnp.where(filled, slot - starts[seg_start[src]], 0)
    out_labels = jnp.where(filled & (src_kind == _TEXT), labels[src], IGNORE_INDEX)
    out_segments = jnp.where(filled, segments[src], 0)
    return emb, out_labels, out_segments, positions.astype(jnp.int32), ends[-1]


def splice(
    text_emb: jax.Array,
    input_ids: jax.Array,
    labels: jax.Array,
    segment_ids: jax.Array,
    video_tokens: jax.Array,
    object_tokens: jax.Array,
    object_counts: jax.Array,
    *,
    region_token_id: int,
    out_len: int,
    video_index: jax.Array | None = None,
):
    """Expand placeholders into the LLM input.

    Args:
      text_emb: [B, L, E] embeddings of `input_ids` (placeholder rows are ignored).
      input_ids, labels: [B, L] int32; placeholders -200/-201 and `region_token_id`.
      segment_ids: [B, L] int32, 0 = padding (padding only at the end of a row).
      video_tokens: [B, Nv, E] connector output, or [B, P, Nv, E] for P video slots per row
        (packed rows: the p-th placeholder of a row takes slot p), or with `video_index` the pools
        [G, V, Nv, E] of a pooled batch (rows g*B/G ... (g+1)*B/G - 1 read pool g).
      object_tokens: [B, K, R, E] object-encoder output; object_counts [B, K] int32 (<= R).
      out_len: static output length.
      video_index: [B, P] int32 (pooled batches): the pool entry of each row's p-th placeholder
        (-1 = none); None = slot p (video_tokens [B, P, Nv, E]) or the row's one video.

    Returns:
      inputs_embeds [B, out_len, E], labels [B, out_len] (-100 on inserted rows and padding),
      segment_ids [B, out_len] (0 = padding), positions [B, out_len], lengths [B] (expanded length
      before clipping to out_len; > out_len means tokens were cut, which `check_batch` prevents).
    """
    if video_tokens.ndim == 3:
        video_tokens = video_tokens[:, None]
    B = input_ids.shape[0]
    if video_index is None:  # per-row slots: a pool of P per row, entry p for the p-th placeholder
        video_index = jnp.broadcast_to(jnp.arange(video_tokens.shape[1], dtype=jnp.int32), (B, video_tokens.shape[1]))
    G = video_tokens.shape[0]
    if B % G:
        raise ValueError(f"{B} rows cannot share {G} video pools evenly")
    row = jax.vmap(lambda *a: _splice_row(*a, region_id=region_token_id, out_len=out_len),
                   in_axes=(0,) * 7 + (None,))  # the rows of one group share its pool
    rows = (text_emb, input_ids, labels, segment_ids, video_index, object_tokens, object_counts)
    grouped = jax.tree.map(lambda x: x.reshape((G, B // G) + x.shape[1:]), rows)
    out = jax.vmap(lambda r, v: row(*r, v))(grouped, video_tokens)
    return jax.tree.map(lambda x: x.reshape((B,) + x.shape[2:]), out)
