"""Which contiguous slice of n items shard k of K takes: the one rule for the data converter and
the benchmark runners, with the two roundings they need."""

from __future__ import annotations

import math

# "ceil": the official VideoRefer/LLaVA eval scripts' `split_list` + `get_chunk`: chunks of
#   ceil(n / K) items, so the last shards may be short or empty (predictions stay comparable
#   with official sharded runs).
# "balanced": boundaries at floor(k * n / K), so shard sizes differ by at most one (the data
#   converter: no empty record files while n >= K).
ROUNDINGS = ("ceil", "balanced")


def shard_bounds(n: int, shard_index: int, num_shards: int, *, rounding: str = "ceil") -> tuple[int, int]:
    """[start, stop) of shard `shard_index` of `num_shards` over `n` items (see `ROUNDINGS`)."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"need 0 <= shard_index < num_shards, got {shard_index}/{num_shards}")
    if n < 0:
        raise ValueError(f"need n >= 0 items, got {n}")
    if rounding == "balanced":
        return shard_index * n // num_shards, (shard_index + 1) * n // num_shards
    if rounding != "ceil":
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    size = math.ceil(n / num_shards) if n else 0
    start = min(shard_index * size, n)
    return start, min(start + size, n)
