"""Training: mesh, optimizer, loss, sharded train step, checkpoints, loop and CLI (`vrefer-train`)."""
