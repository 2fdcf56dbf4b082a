"""Gin for the command-line jobs (`vrefer-train`, `vrefer-demo`): the flags they share, where gin
files and their includes are looked up, the `experiment` a file names, and one parse that turns a
user's mistake (a missing file, a `%gin.REQUIRED` left unset, an experiment meant for the other
command) into one line.
"""

from __future__ import annotations

import argparse
import os

import gin

import data_pipeline.loader  # noqa: F401  (registers LoaderConfig, which experiments bind)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = {"train": "vrefer-train", "synthetic_demo": "vrefer-demo"}


class GinSetupError(ValueError):
    """A configuration the user must fix; the message is one line."""


@gin.configurable
def experiment(kind: str = "train", workdir: str = "runs/default"):
    """kind: 'train' (a training job, `vrefer-train`) or 'synthetic_demo' (the main job,
    `vrefer-demo`). workdir: the output folder (`--workdir` overrides it)."""
    return kind, workdir


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The flags every gin job takes."""
    ap.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
    ap.add_argument("--gin_bindings", action="append", default=[], help="gin binding (repeatable)")
    ap.add_argument("--workdir", default=None, help="output folder (default: experiment.workdir)")
    ap.add_argument("--resume", dest="resume", action="store_true", default=True,
                    help="continue from the newest intact checkpoint in workdir (default); a finished "
                         "run is left as it is")
    ap.add_argument("--no-resume", dest="resume", action="store_false",
                    help="start from step 0; refused when workdir already holds checkpoints")
    ap.add_argument("--gin_search_path", action="append", default=[],
                    help="folders where gin files and includes are looked up (default: cwd, then the repo root)")


def _resolve(path: str, paths) -> str:
    if os.path.isabs(path) or os.path.exists(path):
        return path
    for p in paths:
        cand = os.path.join(p, path)
        if os.path.exists(cand):
            return cand
    raise GinSetupError(f"gin file {path!r} not found (searched {paths})")


def parse(args: argparse.Namespace, kind: str, default_files: tuple[str, ...] = ()) -> str:
    """Parse `args`' gin files and bindings from a clear configuration and return the workdir.

    `--workdir` is a binding, so that it satisfies an experiment's `%gin.REQUIRED` workdir. Raises
    GinSetupError for a missing file, an unset `%gin.REQUIRED` and an experiment of another kind
    (naming the command that runs it)."""
    import vrefer_jax.config  # noqa: F401  (registers the configurables the files bind)
    import vrefer_jax.host_memory  # noqa: F401
    import vrefer_jax.sharding  # noqa: F401

    paths = [*args.gin_search_path, os.getcwd(), REPO_ROOT]
    for p in paths:
        gin.add_config_file_search_path(p)
    files = [_resolve(f, paths) for f in (args.gin_file or default_files)]
    if not files:
        raise GinSetupError(f"give --gin_file (experiments are in {os.path.join(REPO_ROOT, 'configs/experiments')})")
    bindings = [*args.gin_bindings, *([f"experiment.workdir = {args.workdir!r}"] if args.workdir else [])]
    gin.clear_config()  # a run starts from its own files only (not from an earlier call in this process)
    try:
        gin.parse_config_files_and_bindings(files, bindings)
    except ValueError as e:  # e.g. "DataConfig.train set to `%gin.REQUIRED` but not subsequently overridden"
        gin.clear_config()  # nothing half-parsed stays bound in this process
        raise GinSetupError(f"{e} (give it with --gin_bindings)") from None
    got, workdir = experiment()
    if got != kind:
        gin.clear_config()
        raise GinSetupError(f"experiment.kind is {got!r}: run it with {KINDS.get(got, 'another command')}, "
                            f"not {KINDS[kind]}")
    return workdir
