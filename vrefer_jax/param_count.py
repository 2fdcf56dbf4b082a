"""Print a model config's parameter count per part, from `jax.eval_shape` (nothing is allocated).

    python -m vrefer_jax.param_count configs/models/videorefer_7b.gin
"""

from __future__ import annotations

import argparse

from vrefer_jax.config import model_config_from_gin
from vrefer_jax.models import videorefer


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gin_files", nargs="+")
    ap.add_argument("--gin_bindings", nargs="*", default=[])
    args = ap.parse_args(argv)
    cfg = model_config_from_gin(args.gin_files, args.gin_bindings)
    shapes = videorefer.abstract_params(cfg)
    total = 0
    for name, tree in shapes.items():
        n = videorefer.count_params(tree)
        total += n
        print(f"{name:16} {n:>15,}")
    print(f"{'total':16} {total:>15,}")


if __name__ == "__main__":
    main()
