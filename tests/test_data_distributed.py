"""data_pipeline.loader across two `jax.distributed` processes on localhost (CPU, 2 fake devices each):
shards from jax.process_index/count, disjoint and covering; `distributed.to_global` on a 4-device mesh."""

import json
import os
import socket
import subprocess
import sys
import time

from absl import flags

from data_helpers import save_tiny_tokenizer, tiny_record, write_records
from data_pipeline import loader
from vrefer_jax.text import HFTokenizer

flags.FLAGS.mark_as_parsed()
ROOT = os.path.join(os.path.dirname(__file__), "..")
WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
N = 37  # odd: one sample of the epoch is dropped so both processes read the same number


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_shard_and_global_batch(tmp_path):
    recs = str(tmp_path / "recs")
    os.makedirs(recs)
    write_records(os.path.join(recs, "d-0.tfrecord"), [tiny_record(f"s{i}", i) for i in range(0, N, 2)])
    write_records(os.path.join(recs, "d-1.tfrecord"), [tiny_record(f"s{i}", i) for i in range(1, N, 2)])
    tok_dir = save_tiny_tokenizer(tmp_path)

    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=os.pathsep.join([os.path.abspath(ROOT), os.path.dirname(WORKER),
                                           os.environ.get("PYTHONPATH", "")]))
    port = _free_port()
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, WORKER, str(i), str(port), recs, tok_dir, str(tmp_path / f"p{i}.json")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} failed:\n{logs[i][-4000:]}"
    print(f"\ntwo jax.distributed processes: {time.perf_counter() - t0:.1f} s wall")
    res = [json.load(open(tmp_path / f"p{i}.json")) for i in range(2)]

    for i, r in enumerate(res):
        assert (r["process_index"], r["process_count"], r["local_devices"], r["devices"]) == (i, 2, 2, 4)
    # Disjoint, together the set less the documented `len % 2` remainder, equal lengths.
    seen = [sum(r["batches"], []) for r in res]
    assert len(seen[0]) == len(seen[1]) == N // 2 and all(len(b) == 2 for r in res for b in r["batches"])
    assert not set(seen[0]) & set(seen[1])
    union = set(seen[0]) | set(seen[1])
    assert len(union) == N - N % 2 and union <= {f"s{i}" for i in range(N)}
    # ... and each is every 2nd element of the global shuffled order a single process computes.
    cfg = loader.LoaderConfig(batch_size=1, seq_len=64, num_frames=4, image_size=8, grid=4, max_region_frames=1,
                              max_objects=1, max_object_frames=1, seed=5, num_epochs=1, num_shards=1, shard_index=0)
    order = [str(b["sample_ids"][0]) for b in loader.make_loader(recs, cfg, HFTokenizer.from_file(tok_dir))]
    assert seen[0] == order[0:N - 1:2] and seen[1] == order[1:N - 1:2]

    # Global batch: 2 local rows x 2 processes on a 4-device 'data' mesh; each process's
    # addressable shards are its own rows, in order, and the global array spans both processes.
    for i, r in enumerate(res):
        assert r["local_batch_ids"] == r["batches"][0]
        assert set(r["arrays"]) == {"input_ids", "labels", "segment_ids", "frames", "region_frames",
                                    "object_frames", "object_masks", "object_valid"}
        for k, a in r["arrays"].items():
            assert a["global_shape"][0] == 4, k
            assert a["rows"] == [[2 * i, 2 * i + 1], [2 * i + 1, 2 * i + 2]], (k, a["rows"])
            assert a["equals_local"] and a["devices"] == [0, 0, 1, 1], k
    assert res[0]["arrays"]["frames"]["global_shape"] == [4, 4, 8, 8, 3]
    assert res[0]["arrays"]["object_masks"]["global_shape"] == [4, 1, 1, 4, 4]
