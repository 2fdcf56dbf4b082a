"""Hugging Face <-> Flax parameter mapping, written as data.

A `KeyRule` pairs one Hugging Face tensor name with one Flax parameter path and says how the layout
changes. Scanned layer stacks use `{i}` in the HF name: the Flax leaf has a leading `layers` axis and
HF tensors `...{0}...`, `...{1}...` are its slices. This module is the generic engine; the rules of
a family live beside it as data (`videorefer_keys.py`: one function per sub-tree, composed with
`prefixed`), so the model modules know no file format.

Layout kinds (PyTorch -> Flax):
  linear    nn.Linear weight [out, in] -> kernel [in..., out...] (transpose, then reshape to the
            Flax shape; `in_ndim` says how many leading Flax dims make up `in`)
  conv      nn.ConvNd weight [O, I, *k] -> kernel [*k, I, O]
  vector    any 1-D tensor (bias, norm weight) -> reshaped to the Flax shape (e.g. [heads, head_dim])
  identity  same shape (embedding tables)

The same functions move weights into the Flax tree for parity tests and for the checkpoint importer.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class KeyRule:
    hf: str  # HF tensor name, with "{i}" for the index of a scanned layer
    flax: Path  # path in the Flax params dict (without the top-level "params")
    kind: str = "identity"  # linear | conv | vector | identity
    in_ndim: int = 1  # linear only: leading Flax kernel dims that form the HF input dim

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf


def prefixed(rules: Iterable[KeyRule], hf_prefix: str, flax_prefix: Path) -> list[KeyRule]:
    return [dataclasses.replace(r, hf=hf_prefix + r.hf, flax=tuple(flax_prefix) + r.flax) for r in rules]


# ----------------------------------------------------------------------------- layout transforms


def to_flax_layout(rule: KeyRule, x: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
    """One HF tensor (one layer's slice for stacked rules) -> Flax layout of shape `flax_shape`."""
    if rule.kind == "linear":
        if x.ndim != 2:
            raise ValueError(f"{rule.hf}: linear weight must be 2-D, got {x.shape}")
        x = x.T
    elif rule.kind == "conv":
        x = np.transpose(x, tuple(range(2, x.ndim)) + (1, 0))
    elif rule.kind not in ("vector", "identity"):
        raise ValueError(f"{rule.hf}: unknown kind {rule.kind!r}")
    if int(np.prod(x.shape)) != int(np.prod(flax_shape)) or (
        rule.kind in ("conv", "identity") and tuple(x.shape) != tuple(flax_shape)
    ):
        raise ValueError(f"{rule.hf}: shape {x.shape} (after layout change) does not fit {flax_shape}")
    return np.reshape(x, flax_shape)


def to_hf_layout(rule: KeyRule, x: np.ndarray) -> np.ndarray:
    """Inverse of `to_flax_layout` for one (unstacked) Flax leaf."""
    if rule.kind == "linear":
        n_in = int(np.prod(x.shape[: rule.in_ndim]))
        return np.reshape(x, (n_in, -1)).T
    if rule.kind == "conv":
        nk = x.ndim - 2
        return np.transpose(x, (nk + 1, nk) + tuple(range(nk)))
    if rule.kind == "vector":
        return np.reshape(x, (-1,))
    return x


def hf_shape(rule: KeyRule, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape a Flax leaf of `flax_shape` corresponds to (per layer for stacks)."""
    shape = flax_shape[1:] if rule.stacked else flax_shape
    return to_hf_layout(rule, np.empty(shape, dtype=np.uint8)).shape


# ----------------------------------------------------------------------------- tree helpers


def get_path(tree: Mapping, path: Path) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def set_path(tree: dict, path: Path, value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def flatten_paths(tree: Mapping, prefix: Path = ()) -> dict[Path, Any]:
    out: dict[Path, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten_paths(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


# ----------------------------------------------------------------------------- conversion


class KeyMappingError(KeyError):
    """A missing, unexpected or wrongly shaped tensor; the message names it."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable
        return str(self.args[0])


def check_rules_cover(rules: list[KeyRule], flax_shapes: Mapping) -> None:
    """Every Flax leaf is produced by exactly one rule and every rule names a real leaf."""
    leaves = set(flatten_paths(flax_shapes))
    ruled = [r.flax for r in rules]
    dup = {p for p in ruled if ruled.count(p) > 1}
    if dup:
        raise KeyMappingError(f"several rules write {sorted(dup)}")
    if missing := leaves - set(ruled):
        raise KeyMappingError(f"no rule for Flax parameters {sorted('/'.join(p) for p in missing)}")
    if extra := set(ruled) - leaves:
        raise KeyMappingError(f"rules name Flax parameters that do not exist: {sorted('/'.join(p) for p in extra)}")


def hf_to_flax(
    get: Callable[[str], np.ndarray] | Mapping[str, Any],
    rules: list[KeyRule],
    flax_shapes: Mapping,
    *,
    available: Iterable[str] | None = None,
    ignore: Iterable[str] = (),
    dtype: Any = None,
    place: Callable[[Path, np.ndarray], Any] | None = None,
) -> dict:
    """Build the Flax params dict from HF tensors.

    Args:
      get: HF name -> array (a state dict, or a callable reading one tensor at a time).
      rules: the key map.
      flax_shapes: a pytree with the target shapes (e.g. from `jax.eval_shape(model.init, ...)`,
        unboxed); leaves need `.shape`.
      available: the HF names present; when given, names neither used nor matching `ignore`
        (regexes) raise as unexpected.
      dtype: cast every tensor to this dtype (default: keep).
      place: optional hook (flax path, numpy array) -> device array, e.g. to put each tensor
        straight into its sharding; called once per Flax leaf, so at most one leaf is held on the
        host at a time beyond what the caller keeps.
    """
    getter = get.__getitem__ if isinstance(get, Mapping) else get
    if available is None and isinstance(get, Mapping):
        available = list(get.keys())
    check_rules_cover(rules, flax_shapes)
    used: set[str] = set()
    out: dict = {}
    for rule in rules:
        target = tuple(get_path(flax_shapes, rule.flax).shape)
        names = [rule.hf.format(i=i) for i in range(target[0])] if rule.stacked else [rule.hf]
        slice_shape = target[1:] if rule.stacked else target
        arr = None  # filled slice by slice: a stacked leaf is held once, not twice
        for i, name in enumerate(names):
            try:
                x = np.asarray(_to_numpy(getter(name)))
            except KeyError:
                raise KeyMappingError(f"missing tensor {name!r} (for Flax parameter {'/'.join(rule.flax)})") from None
            try:
                x = to_flax_layout(rule, x, slice_shape)
            except ValueError as e:
                raise KeyMappingError(f"wrong shape for tensor {name!r}: {e}") from None
            if dtype is not None:
                x = x.astype(dtype)
            if not rule.stacked:
                arr = x
            else:
                if arr is None:
                    arr = np.empty(target, x.dtype)
                arr[i] = x
            used.add(name)
        set_path(out, rule.flax, place(rule.flax, arr) if place else arr)
    if available is not None:
        pats = [re.compile(p) for p in ignore]
        unexpected = [k for k in available if k not in used and not any(p.fullmatch(k) for p in pats)]
        if unexpected:
            raise KeyMappingError(f"unexpected tensors in checkpoint: {sorted(unexpected)[:20]}"
                                  + (f" (+{len(unexpected) - 20} more)" if len(unexpected) > 20 else ""))
    return out


def flax_to_hf(params: Mapping, rules: list[KeyRule]) -> dict[str, np.ndarray]:
    """Flax params -> HF state dict (numpy arrays, HF layout), all in memory: the reference oracle
    the round-trip tests check the streaming export (`hf_export`) and the rules against."""
    out: dict[str, np.ndarray] = {}
    for rule in rules:
        arr = np.asarray(_to_numpy(get_path(params, rule.flax)))
        if rule.stacked:
            for i in range(arr.shape[0]):
                out[rule.hf.format(i=i)] = np.ascontiguousarray(to_hf_layout(rule, arr[i]))
        else:
            out[rule.hf] = np.ascontiguousarray(to_hf_layout(rule, arr))
    return out


def torch_state_to_numpy(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A torch `state_dict()` -> numpy arrays (fp32 kept as is)."""
    return {k: _to_numpy(v) for k, v in state_dict.items()}


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, imported lazily by the caller
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    return np.asarray(x)
