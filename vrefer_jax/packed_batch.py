"""Packed rows and pooled packed batches of the VideoRefer-7B contract (`vrefer_jax.batch`, "Packed
rows" and "Pooled packed batches" in its docstring): the host-side builders the packer calls.

`pack_examples`: several `Example`s -> one row with P video slots; `pack_batch`: rows -> a batch whose
videos sit in pools shared by groups of consecutive rows (`frames [G, V, T, S, S, 3]` + `video_index
[B, P]`). Budgets are checked, never truncated: a row or pool too small raises naming its samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from vrefer_jax.batch import FIELDS, VIDEO_INDEX, Example, _empty, num_placeholders

PACK_SEPARATOR = "+"  # a packed row's `sample_id`: its samples' ids joined in row order


def pack_examples(examples: Sequence[Example], *, seq_len: int, videos: int, region_frames: int, objects: int,
                  object_frames: int, mask_size: int, pad_token_id: int) -> dict[str, Any]:
    """Several `Example`s -> one packed row of the contract (no batch dimension; see "Packed rows"
    in the module docstring), + `sample_id` (the ids joined by `PACK_SEPARATOR`).

    seq_len, videos (P), region_frames and objects are budgets of the whole row; object_frames (M)
    bounds each object. A budget too small raises ValueError naming the row's samples (the packer
    checks the budgets before this: nothing is ever truncated)."""
    row, clips = _pack_row(examples, seq_len=seq_len, videos=videos, region_frames=region_frames, objects=objects,
                           object_frames=object_frames, mask_size=mask_size, pad_token_id=pad_token_id)
    T, S = examples[0].frames.shape[0], examples[0].frames.shape[1]
    frames = np.zeros((videos, T, S, S, 3), np.float32)
    for p, clip in enumerate(clips):
        frames[p] = clip
    row["frames"] = frames
    out = {k: row[k] for k in FIELDS if k in row}
    out["sample_id"] = row["sample_id"]
    return out


def _pack_row(examples: Sequence[Example], *, seq_len: int, videos: int, region_frames: int, objects: int,
              object_frames: int, mask_size: int, pad_token_id: int) -> tuple[dict[str, Any], list[np.ndarray]]:
    """A packed row without `frames` + its videos in row order ([T, S, S, 3] each, one per sample
    with a `<video>`/`<image>`). Budget checks as `pack_examples`."""
    if not examples:
        raise ValueError("pack_examples needs at least one example")
    name = PACK_SEPARATOR.join(ex.sample_id for ex in examples)
    need = dict(seq_len=sum(len(ex.input_ids) for ex in examples),
                videos=sum(num_placeholders(ex.input_ids) for ex in examples),
                region_frames=sum(int(ex.region_frames.shape[0]) for ex in examples),
                objects=sum(len(ex.object_frames) for ex in examples),
                object_frames=max(ex.sizes()["object_frames"] for ex in examples))
    have = dict(seq_len=seq_len, videos=videos, region_frames=region_frames, objects=objects,
                object_frames=object_frames)
    for k, n in need.items():
        if n > have[k]:
            raise ValueError(f"packed row {name}: {k} needs {n} but the row holds {have[k]}")
    with_labels = examples[0].labels is not None
    if any((ex.labels is not None) != with_labels for ex in examples):
        raise ValueError(f"packed row {name}: some samples have labels and some do not")
    T, S = examples[0].frames.shape[0], examples[0].frames.shape[1]
    out = _empty(dict(L=seq_len, T=T, S=S, F=region_frames, K=objects, M=object_frames, G=mask_size), pad_token_id,
                 skip=("frames",) if with_labels else ("frames", "labels"))
    clips = []
    pos = f0 = k0 = 0
    for seg, ex in enumerate(examples, start=1):
        if ex.frames.shape[:2] != (T, S):
            raise ValueError(f"packed row {name}: sample {ex.sample_id} has frames {ex.frames.shape[:2]}, "
                             f"the row {(T, S)}")
        n = len(ex.input_ids)
        out["input_ids"][pos:pos + n] = ex.input_ids
        if with_labels:
            out["labels"][pos:pos + n] = ex.labels
        out["segment_ids"][pos:pos + n] = seg
        pos += n
        if num_placeholders(ex.input_ids):
            clips.append(ex.frames)
        nf = int(ex.region_frames.shape[0])
        out["region_frames"][f0:f0 + nf] = ex.region_frames
        for fr, m in zip(ex.object_frames, ex.object_masks):
            out["object_frames"][k0, : len(fr)] = np.asarray(fr, np.int32) + f0  # into the row's F
            out["object_masks"][k0, : len(fr)] = m
            out["object_valid"][k0] = True
            k0 += 1
        f0 += nf
    out["sample_id"] = name
    return out, clips


def pack_batch(rows: Sequence[Sequence[Example]], *, pool_rows: int, pool_videos: int, seq_len: int, videos: int,
               region_frames: int, objects: int, object_frames: int, mask_size: int,
               pad_token_id: int) -> dict[str, Any]:
    """Rows of `Example`s -> a pooled packed batch (module docstring, "Pooled packed batches"):
    frames [G, V, T, S, S, 3] with V = `pool_videos` and G = ceil(len(rows) / pool_rows) groups of
    `pool_rows` consecutive rows, `video_index` [B, P] with P = `videos` (the per-row cap), the other
    fields as `pack_examples` stacked, `sample_ids` [B]. When len(rows) is not a multiple of
    `pool_rows` (a stream's last batch), empty rows (segment 0, sample id "") complete the last
    group. A group whose rows hold more than V videos raises ValueError naming its samples (the
    packer keeps every group within V: nothing is dropped here)."""
    if not rows or pool_rows < 1 or pool_videos < 1:
        raise ValueError(f"pack_batch needs rows, pool_rows >= 1 and pool_videos >= 1; got {len(rows)} rows, "
                         f"{pool_rows}, {pool_videos}")
    kw = dict(seq_len=seq_len, videos=videos, region_frames=region_frames, objects=objects,
              object_frames=object_frames, mask_size=mask_size, pad_token_id=pad_token_id)
    built = [_pack_row(r, **kw) for r in rows]
    T, S = rows[0][0].frames.shape[0], rows[0][0].frames.shape[1]
    G = -(-len(rows) // pool_rows)
    frames = np.zeros((G, pool_videos, T, S, S, 3), np.float32)
    index = np.full((G * pool_rows, videos), -1, np.int32)
    out_rows = []
    for g in range(G):
        members = built[g * pool_rows:(g + 1) * pool_rows]
        n_videos = sum(len(clips) for _, clips in members)
        if n_videos > pool_videos:
            names = ", ".join(row["sample_id"] for row, _ in members)
            raise ValueError(f"video pool of rows {names}: {n_videos} videos but the pool holds {pool_videos}")
        v = 0
        for i, (row, clips) in enumerate(members):
            for p, clip in enumerate(clips):
                frames[g, v] = clip
                index[g * pool_rows + i, p] = v
                v += 1
            out_rows.append(row)
    with_labels = "labels" in out_rows[0]
    while len(out_rows) < G * pool_rows:  # complete the last group with all-padding rows
        empty = _empty(dict(L=seq_len, T=T, S=S, F=region_frames, K=objects, M=object_frames, G=mask_size),
                       pad_token_id, skip=("frames",) if with_labels else ("frames", "labels"))
        out_rows.append({**empty, "sample_id": ""})
    out = {k: frames if k == "frames" else np.stack([r[k] for r in out_rows]) for k in FIELDS
           if k == "frames" or k in out_rows[0]}
    out[VIDEO_INDEX] = index
    out["sample_ids"] = np.array([r["sample_id"] for r in out_rows])
    return out
