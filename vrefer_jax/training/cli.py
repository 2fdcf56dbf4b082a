"""`vrefer-train`: run a gin-configured training job.

    vrefer-train --gin_file=configs/experiments/videorefer7b_stage3_v5p64.gin [--gin_file=...]
                 [--gin_bindings='TrainConfig.total_steps = 100' ...] [--workdir=DIR] [--no-resume]

The experiment must be a training one (`experiment.kind = 'train'`); the main job has its own
command, `vrefer-demo`. Every `%gin.REQUIRED` of the files must be bound. Multi-process
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
import sys

from vrefer_jax import gin_setup, host_memory


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vrefer-train", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n")[-1], formatter_class=argparse.RawDescriptionHelpFormatter)
    gin_setup.add_arguments(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's per-save chatter
    from vrefer_jax.distributed import maybe_initialize_distributed

    maybe_initialize_distributed()
    from vrefer_jax.training import trainer  # registers the configurables the experiment binds
    from vrefer_jax.training.checkpointing import CheckpointError

    try:
        workdir = gin_setup.parse(a, "train")
        host_memory.configure()
        out = trainer.train(workdir, resume=a.resume)
    except (gin_setup.GinSetupError, trainer.ConfigError, CheckpointError) as e:
        print(f"vrefer-train: {e}", file=sys.stderr)
        return 2
    if out["already_done"]:
        print(f"{workdir} already finished at step {out['step']}: nothing to do "
              "(raise TrainConfig.total_steps to train on)")
    else:
        print(f"finished at step {out['step']}" + (" (preempted: checkpoint saved)" if out["preempted"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
