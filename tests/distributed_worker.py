"""One process of `test_data_distributed`: joins a 2-process `jax.distributed` run on CPU, reads its
shard of a record set with the Grain loader (shard from `jax.process_index/count`), builds a global
batch with `distributed.to_global`, and writes what it saw as JSON.

    python tests/distributed_worker.py PROCESS_ID PORT RECORDS TOKENIZER_DIR OUT_JSON

The parent sets JAX_PLATFORMS=cpu and XLA_FLAGS=--xla_force_host_platform_device_count=2.
"""

import json
import sys


def main(process_id: int, port: int, records_path: str, tok_dir: str, out_path: str) -> None:
    import jax
    import numpy as np
    from jax.sharding import Mesh

    from data_pipeline import loader
    from vrefer_jax import distributed
    from vrefer_jax.text import HFTokenizer

    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    try:
        tok = HFTokenizer.from_file(tok_dir)
        # shard_index / num_shards left None: they come from jax.process_index / process_count
        cfg = loader.LoaderConfig(batch_size=2, seq_len=64, num_frames=4, image_size=8, grid=4, max_region_frames=1,
                                  max_objects=1, max_object_frames=1, seed=5, num_epochs=1)
        ids = [[str(s) for s in b["sample_ids"]] for b in loader.make_loader(records_path, cfg, tok)]

        # A global batch over all 4 devices (2 per process) from this process's first local batch.
        local = next(loader.make_loader(records_path, cfg, tok))
        mesh = Mesh(np.array(jax.devices()), ("data",))
        glob = distributed.to_global(local, mesh)
        arrays = {}
        for k, v in glob.items():
            if k == "sample_ids":
                continue
            shards = sorted(v.addressable_shards, key=lambda s: s.index[0].start)
            rows = [(s.index[0].start, s.index[0].stop) for s in shards]
            mine = np.concatenate([np.asarray(s.data) for s in shards])
            arrays[k] = {"global_shape": list(v.shape), "rows": rows,
                         "equals_local": bool(np.array_equal(mine, local[k])),
                         "devices": sorted(d.process_index for d in v.sharding.device_set)}
        result = {"process_index": jax.process_index(), "process_count": jax.process_count(),
                  "local_devices": jax.local_device_count(), "devices": jax.device_count(),
                  "batches": ids, "local_batch_ids": [str(s) for s in glob["sample_ids"]], "arrays": arrays}
    finally:
        jax.distributed.shutdown()
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:6])
