"""Sequence packing for both families' loaders: several samples per row of static size.

`first_fit_decreasing` assigns samples to rows under several additive budgets at once (text ids,
expanded length, video slots, region frames, objects for VideoRefer-7B; rows, patches, visual
tokens, regions for VRVL3); `PackedBatches` runs it over a bounded window of the sample stream:

  * pull `window` kept samples (skip markers are counted by cap, as the unpacked batcher does);
  * first-fit decreasing on the sort key (the expanded length / the text length), ties in arrival
    order, so the longest samples open rows and short ones fill the gaps;
  * while the row count is not a multiple of the batch size B, pull one more sample and first-fit
    it (it fills a gap or opens a row), so no row of a batch is empty padding (until the stream
    ends: then the last batch is smaller, or dropped with `drop_remainder`);
  * the rows are shuffled with a generator seeded by (seed, window index), cut into batches of B
    and built by the family's row builder (`packed_batch.pack_examples` / `vl3_batch.pack_examples`).

Pooled batches (VideoRefer-7B, `group_rows` > 1 with a `group_budget`, `packed_batch.pack_batch`): rows
also fill in groups of `group_rows` consecutive rows that share a video pool of V entries; the
first fit checks the group's budget too (keeping one video in reserve per row the group has not
opened, so no group has an empty row), the shuffle moves whole groups, and a batch is B / group_rows
groups. A sample never loses its video: when a group's pool is full, it goes to a row of a later
group (or opens one).

Deterministic (a pure function of the sample stream and the seed) and resumable exactly: the state
is the parent's state at the current window's start, the window's index and the number of its
batches already emitted; `set_state` rebuilds that window and continues after them.
A row's samples keep their arrival order (segment ids 1, 2, ... in that order).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from vrefer_jax import packed_batch

PACK_KEY = "_pack"  # a kept sample from the transform: {PACK_KEY: sizes dict, "_item": payload}
SKIP_KEY = "_skip"


def first_fit_decreasing(sizes: Sequence[Mapping[str, int]], budget: Mapping[str, int], key: str,
                         rows: list[list[int]] | None = None, used: list[dict[str, int]] | None = None,
                         order: Sequence[int] | None = None, group_rows: int = 1,
                         group_budget: Mapping[str, int] | None = None) -> tuple[list[list[int]], list[dict[str, int]]]:
    """Pack items (indices into `sizes`) into rows under every budget in `budget` (sum per row <= it).

    Items go in decreasing `key` order (stable: ties by index), or in `order` if given, each into the
    first row it fits, else a new row. `rows`/`used` continue an earlier packing. An item over a
    budget on its own raises ValueError (the caps refuse or skip those before packing).

    group_budget: budgets of each group of `group_rows` consecutive rows (row r is in group
    r // group_rows; the video pool of a pooled batch). Each item needs at most 1 of a group-budget
    key, and the group keeps 1 in reserve for every row it has not opened yet, so a new row can
    always take its first item: groups fill without holes (every group but the last has exactly
    `group_rows` rows, none of them empty). A group budget below `group_rows` raises ValueError.
    Returns (rows as lists of item indices in placement order, per-row usage)."""
    rows = [] if rows is None else rows
    used = [] if used is None else used
    gb = dict(group_budget or {})
    if any(v < group_rows for v in gb.values()):
        raise ValueError(f"group budget {gb} below one per row of a group of {group_rows} rows")
    if order is None:
        order = sorted(range(len(sizes)), key=lambda i: -sizes[i][key])

    def group_use(g: int) -> tuple[dict[str, int], int]:
        members = used[g * group_rows:(g + 1) * group_rows]
        return {k: sum(u.get(k, 0) for u in members) for k in gb}, len(members)

    for i in order:
        s = sizes[i]
        over = [k for k in budget if s.get(k, 0) > budget[k]]
        if over:
            raise ValueError(f"item {i} needs {[(k, s[k]) for k in over]} over the row budget {dict(budget)}")
        if any(s.get(k, 0) > 1 for k in gb):
            raise ValueError(f"item {i} needs {[(k, s[k]) for k in gb if s.get(k, 0) > 1]}: at most 1 of a "
                             f"group-budget key ({sorted(gb)})")
        for r, u in enumerate(used):
            if not all(u[k] + s.get(k, 0) <= budget[k] for k in budget):
                continue
            if gb:
                g_used, n_rows = group_use(r // group_rows)
                if not all(g_used[k] + s.get(k, 0) + (group_rows - n_rows) <= gb[k] for k in gb):
                    continue
            rows[r].append(i)
            for k in u:
                u[k] += s.get(k, 0)
            break
        else:
            rows.append([i])
            used.append({k: s.get(k, 0) for k in set(budget) | set(gb)})
    return rows, used


class WindowedIterator(grain.DatasetIterator):
    """A batch iterator that fills a window of batches at a time from its parent (`_fill`, which
    records the parent state at the window's start in `_start` and sets `_batches`, `_k = 0`) and
    emits them one by one. Its checkpoint is (parent state at the window's start, window index,
    batches emitted): restoring refills that window, deterministically, and skips what was emitted."""

    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self._window = 0  # index of the next window to fill
        self._start: Any = None  # parent state at the current window's start
        self._batches: list = []
        self._k = 0  # batches of the current window emitted

    def _fill(self) -> None:
        raise NotImplementedError

    def _reset(self) -> None:
        """Per-window state a subclass keeps besides `_batches` (cleared on restore)."""

    def get_state(self):
        if self._k >= len(self._batches):  # between windows: the next one starts here
            return {"parent": self._parent.get_state(), "window": self._window, "emitted": 0}
        return {"parent": self._start, "window": self._window - 1, "emitted": self._k}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._window, self._batches, self._k = int(state["window"]), [], 0
        self._reset()
        if state["emitted"]:
            self._fill()
            self._k = int(state["emitted"])


class PackedBatches(grain.IterDataset):
    """Packed batches over a stream of `{PACK_KEY: sizes, "_item": payload}` / `{SKIP_KEY: cap}`
    elements (module docstring). `build_row(payloads)` makes one padded row (+ `sample_id`);
    `finish(rows, counts)` stacks them into a batch carrying the skip counts `num_skipped` by
    `caps` (on a window's first batch). Pooled: `build_batch(rows of payloads, counts)` makes the
    whole batch instead (rows in groups of `group_rows` under `group_budget`)."""

    def __init__(self, parent: grain.IterDataset, *, batch_size: int, window: int, budget: Mapping[str, int],
                 key: str, build_row: Callable[[list[Any]], dict] | None,
                 finish: Callable[[list[dict], np.ndarray], dict] | None, caps: Sequence[str], seed: int,
                 drop_remainder: bool, group_rows: int = 1, group_budget: Mapping[str, int] | None = None,
                 build_batch: Callable[[list[list[Any]], np.ndarray], dict] | None = None):
        super().__init__(parent)
        if batch_size < 1 or window < 1:
            raise ValueError(f"packing needs batch_size >= 1 and pack_window >= 1, got {batch_size}, {window}")
        if group_rows < 1 or batch_size % group_rows:
            raise ValueError(f"pool groups of {group_rows} rows must divide the batch of {batch_size} rows")
        if (build_batch is None) == (build_row is None or finish is None):
            raise ValueError("give either build_row and finish, or build_batch")
        self._kw = dict(batch_size=batch_size, window=window, budget=dict(budget), key=key, build_row=build_row,
                        finish=finish, caps=tuple(caps), seed=seed, drop_remainder=drop_remainder,
                        group_rows=group_rows, group_budget=dict(group_budget or {}), build_batch=build_batch)

    def __iter__(self):
        return _PackedBatchesIterator(self._parent.__iter__(), **self._kw)


class _PackedBatchesIterator(WindowedIterator):
    def __init__(self, parent: grain.DatasetIterator, *, batch_size, window, budget, key, build_row, finish, caps,
                 seed, drop_remainder, group_rows, group_budget, build_batch):
        super().__init__(parent)
        self._B, self._W, self._budget, self._key = batch_size, window, budget, key
        self._build_row, self._finish, self._caps = build_row, finish, caps
        self._R, self._group_budget, self._build_batch = group_rows, group_budget, build_batch
        self._seed, self._drop = seed, drop_remainder
        self._batches: list[list[list[Any]]] = []  # the window's batches, as rows of payloads (built lazily)
        self._counts = np.zeros((len(caps),), np.int64)

    def _pull(self, counts: np.ndarray):
        """The next kept element, or None at the end of the stream (skips counted on the way)."""
        while True:
            try:
                x = next(self._parent)
            except StopIteration:
                return None
            if SKIP_KEY in x:
                counts[self._caps.index(x[SKIP_KEY])] += 1
            else:
                return x

    def _fill(self) -> None:
        self._start = self._parent.get_state()
        counts = np.zeros((len(self._caps),), np.int64)
        items: list[Any] = []
        sizes: list[Mapping[str, int]] = []
        while len(items) < self._W:
            x = self._pull(counts)
            if x is None:
                break
            items.append(x["_item"])
            sizes.append(x[PACK_KEY])
        groups = dict(group_rows=self._R, group_budget=self._group_budget)
        rows, used = first_fit_decreasing(sizes, self._budget, self._key, **groups)
        while rows and len(rows) % self._B:  # top up: no empty rows in a batch while samples remain
            x = self._pull(counts)
            if x is None:
                break
            items.append(x["_item"])
            sizes.append(x[PACK_KEY])
            rows, used = first_fit_decreasing(sizes, self._budget, self._key, rows, used, order=[len(items) - 1],
                                              **groups)
        w, self._window = self._window, self._window + 1
        rows = [sorted(r) for r in rows]  # a row's samples in arrival order
        R = self._R
        n_full = len(rows) // R  # whole groups move together; a last partial group stays last
        if n_full > 1:
            order = np.random.default_rng(np.random.SeedSequence([self._seed, w])).permutation(n_full)
            rows = [row for g in order for row in rows[g * R:(g + 1) * R]] + rows[n_full * R:]
        batches = [[[items[i] for i in r] for r in rows[j:j + self._B]] for j in range(0, len(rows), self._B)]
        if batches and len(batches[-1]) < self._B and self._drop:
            batches.pop()
        self._batches, self._counts, self._k = batches, counts, 0

    def __next__(self):
        if self._k >= len(self._batches):
            self._fill()
            if not self._batches:
                if self._counts.any():  # skips after the last kept sample: a counts-only batch
                    counts, self._counts = self._counts, np.zeros_like(self._counts)
                    return {"num_skipped": counts}
                raise StopIteration
        counts = self._counts if self._k == 0 else np.zeros_like(self._counts)
        rows = self._batches[self._k]
        self._k += 1
        if self._build_batch is not None:
            return self._build_batch(rows, counts)
        return self._finish([self._build_row(r) for r in rows], counts)

    def _reset(self) -> None:
        self._counts = np.zeros((len(self._caps),), np.int64)


def videorefer_batches(parent: grain.IterDataset, cfg, *, caps: Sequence[str], finish: Callable) -> grain.IterDataset:
    """VideoRefer-7B packed batches over the loader transform's unpadded samples. `cfg`: the
    loader's `LoaderConfig`; rows with `pack_videos` slots (`packed_batch.pack_examples`, stacked by
    `finish`), or pooled batches when `pack_pool_rows` is set (`packed_batch.pack_batch`). The row
    budgets (the keys of the transform's sizes): L text ids, videos, F region frames, K objects, and
    the expanded length when `max_expanded_len` is set (then also the sort key)."""
    budget = dict(L=cfg.seq_len, videos=cfg.pack_videos, F=cfg.max_region_frames, K=cfg.max_objects)
    if cfg.max_expanded_len is not None:
        budget["expanded"] = cfg.max_expanded_len
    shape = dict(seq_len=cfg.seq_len, videos=cfg.pack_videos, region_frames=cfg.max_region_frames,
                 objects=cfg.max_objects, object_frames=cfg.max_object_frames, mask_size=cfg.grid,
                 pad_token_id=cfg.pad_token_id)
    common = dict(batch_size=cfg.batch_size, window=cfg.pack_window, budget=budget,
                  key="expanded" if "expanded" in budget else "L", caps=caps, seed=cfg.seed,
                  drop_remainder=cfg.drop_remainder)
    if not cfg.pack_pool_rows:
        return PackedBatches(parent, build_row=functools.partial(packed_batch.pack_examples, **shape), finish=finish,
                             **common)

    def build_batch(rows, counts):
        out = packed_batch.pack_batch(rows, pool_rows=cfg.pack_pool_rows, pool_videos=cfg.pack_pool_videos, **shape)
        out["num_skipped"] = counts
        return out

    return PackedBatches(parent, build_row=None, finish=None, build_batch=build_batch, group_rows=cfg.pack_pool_rows,
                         group_budget=dict(videos=cfg.pack_pool_videos), **common)
