"""Print a model config's parameter count per part, from `jax.eval_shape` (nothing is allocated).

    python -m vrefer_jax.param_count configs/models/videorefer_7b.gin
    python -m vrefer_jax.param_count configs/models/vl3_7b.gin
    python -m vrefer_jax.param_count --family videorefer_videollama3 my.gin

The model family is the one whose config class the gin files bind (`families.config_from_gin`);
`--family` names it when they bind none or several.
"""

from __future__ import annotations

import argparse

import numpy as np


def count_params(tree) -> int:
    """Number of parameters in a tree of arrays or shape structs."""
    import jax

    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree_util.tree_leaves(tree)))


def part_counts(cfg) -> dict[str, int]:
    """Top-level part -> parameter count of `cfg`'s model (its family's tree, eval_shape only)."""
    from vrefer_jax import families

    shapes = families.for_config(cfg).abstract_params(cfg)
    return {name: count_params(tree) for name, tree in shapes.items()}


def main(argv=None) -> None:
    from vrefer_jax import families

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gin_files", nargs="+")
    ap.add_argument("--gin_bindings", nargs="*", default=[])
    ap.add_argument("--family", default=None, help=f"model family ({', '.join(sorted(families.REGISTRY))})")
    args = ap.parse_args(argv)
    cfg = families.config_from_gin(args.gin_files, args.gin_bindings, family=args.family)
    counts = part_counts(cfg)
    print(f"{'family':16} {families.for_config(cfg).name}")
    for name, n in counts.items():
        print(f"{name:16} {n:>15,}")
    print(f"{'total':16} {sum(counts.values()):>15,}")


if __name__ == "__main__":
    main()
