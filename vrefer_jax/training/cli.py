"""`vrefer-train`: run a gin-configured training job.

    vrefer-train --gin_file=configs/experiments/synthetic_tiny.gin [--gin_file=...]
                 [--gin_bindings='TrainConfig.total_steps = 100' ...] [--workdir=DIR] [--no-resume]

With no arguments it runs the main job (configs/experiments/synthetic_tiny.gin). Multi-process
runs (TPU pods, GPU clusters) start `jax.distributed` from the environment (see
`vrefer_jax.distributed.maybe_initialize_distributed`); every process runs the same command.

Re-running: the same command after the run finished is a no-op that says so; with a larger
`TrainConfig.total_steps` it continues from the last checkpoint (the cosine schedule is then
stretched to the new total) and replaces `final/` atomically. Resuming restores the newest
checkpoint that matches its checksums; a corrupt or partial newer step is named in the log, moved to
`checkpoints.corrupt/` and skipped. The model's special ids (region, pad) must be the tokenizer's:
a mismatch is refused before training.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import gin

DEFAULT_EXPERIMENT = "configs/experiments/synthetic_tiny.gin"


@gin.configurable
def experiment(kind: str = "train", workdir: str = "runs/default"):
    """kind: 'train' (a plain training job) or 'synthetic_demo' (the main job: data generation,
    training, evaluation, export and a question answered; see vrefer_jax.main_job)."""
    return kind, workdir


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vrefer-train", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n")[-1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
    ap.add_argument("--gin_bindings", action="append", default=[], help="gin binding (repeatable)")
    ap.add_argument("--workdir", default=None, help="output folder (default: experiment.workdir)")
    ap.add_argument("--resume", dest="resume", action="store_true", default=True,
                    help="continue from the newest intact checkpoint in workdir (default); a finished "
                         "run is left as it is")
    ap.add_argument("--no-resume", dest="resume", action="store_false",
                    help="start from step 0; refused when workdir already holds checkpoints")
    ap.add_argument("--gin_search_path", action="append", default=[],
                    help="folders where gin includes are looked up (default: the repo root and cwd)")
    return ap


def _search_paths(extra):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return [*extra, os.getcwd(), root]


def _resolve(path: str, paths) -> str:
    if os.path.isabs(path) or os.path.exists(path):
        return path
    for p in paths:
        cand = os.path.join(p, path)
        if os.path.exists(cand):
            return cand
    raise FileNotFoundError(f"gin file {path!r} not found (searched {paths})")


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's per-save chatter
    from vrefer_jax.distributed import maybe_initialize_distributed

    maybe_initialize_distributed()
    paths = _search_paths(a.gin_search_path)
    for p in paths:
        gin.add_config_file_search_path(p)
    files = [_resolve(f, paths) for f in (a.gin_file or [DEFAULT_EXPERIMENT])]
    import vrefer_jax.config  # noqa: F401  (registers configurables)
    import vrefer_jax.sharding  # noqa: F401
    from vrefer_jax import main_job  # noqa: F401  (registers SyntheticJob)
    from vrefer_jax.training import trainer

    # --workdir is a binding, so that it satisfies an experiment's `%gin.REQUIRED` workdir
    bindings = [*a.gin_bindings, *([f"experiment.workdir = {a.workdir!r}"] if a.workdir else [])]
    gin.clear_config()  # a run starts from its own files only (not from an earlier main() in this process)
    try:
        gin.parse_config_files_and_bindings(files, bindings)
    except ValueError as e:  # e.g. "DataConfig.train set to `%gin.REQUIRED` but not subsequently overridden"
        print(f"vrefer-train: {e} (give it with --gin_bindings)", file=sys.stderr)
        return 2
    kind, workdir = experiment()
    if kind == "synthetic_demo":
        main_job.run(workdir, resume=a.resume)
    elif kind == "train":
        from vrefer_jax.training.checkpointing import CheckpointError

        try:
            out = trainer.train(workdir, resume=a.resume)
        except (trainer.ConfigError, CheckpointError) as e:
            print(f"vrefer-train: {e}", file=sys.stderr)
            return 2
        if out["already_done"]:
            print(f"{workdir} already finished at step {out['step']}: nothing to do "
                  "(raise TrainConfig.total_steps to train on)")
        else:
            print(f"finished at step {out['step']}" + (" (preempted: checkpoint saved)" if out["preempted"] else ""))
    else:
        raise ValueError(f"experiment.kind must be 'train' or 'synthetic_demo', got {kind!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
