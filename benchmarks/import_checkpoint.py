"""Import time and peak host memory (RSS) for a generated ~1 GB VideoRefer checkpoint.

    python benchmarks/import_checkpoint.py                    # fp32 shards, fp32 import
    python benchmarks/import_checkpoint.py --file-dtype float16 --shard-size 300MB

A mid-sized VideoRefer config (SigLIP 12 x 384, STC v35, Qwen2-style 16 x 1024, vocab 32000) is
written as random safetensors shards with the official names and an official-style config.json
(one tensor at a time, so generation itself stays small). The import then runs in a fresh process
(`use_stored_vision_tower=True`, the folder has no separate SigLIP folder), which reports:
wall time, peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`), the RSS before the import
(Python + jax + the traced shapes), and the sum of the imported parameters' sizes. On a CPU
backend the imported parameters themselves live in host memory, so the overhead of the import is
peak RSS - RSS before - parameter bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def bench_config():
    from vrefer_jax.config import ConnectorConfig, ModelConfig, ObjectEncoderConfig, TextConfig, VisionConfig

    return ModelConfig(
        vision=VisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                            image_size=224, patch_size=14, select_layer=-2),
        connector=ConnectorConfig(projector_type="stc_connector_v35", depth=4),
        object_encoder=ObjectEncoderConfig(region_token_num=4),
        text=TextConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                        num_attention_heads=16, num_key_value_heads=4, rope_theta=1e6),
        num_frames=8, region_token_id=31999, pad_token_id=0)


def generate(folder: str, file_dtype: str, shard_size: str) -> int:
    """Random checkpoint with the official names; returns the bytes of tensor data written."""
    from vrefer_jax.checkpoints import hf_config, st_io
    from vrefer_jax.checkpoints.hf_export import tensor_plan
    from vrefer_jax.models import videorefer

    cfg = bench_config()
    entries, _ = tensor_plan(videorefer.abstract_params(cfg), cfg, file_dtype)
    rng = np.random.default_rng(0)
    spec = {n: (s, d) for n, s, d in entries}

    def produce(name):
        shape, dtype = spec[name]
        return (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)

    st_io.write_checkpoint(folder, entries, produce, shard_size)
    hf = hf_config.model_config_to_hf(cfg, mm_vision_tower="bench-siglip", torch_dtype=file_dtype)
    hf_config.write_json(os.path.join(folder, "config.json"), hf)
    return sum(int(np.prod(s)) * np.dtype(d).itemsize for _, s, d in entries)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(folder: str, param_dtype: str) -> dict:
    """Run in a fresh process: import and report time / memory."""
    import jax

    from vrefer_jax.checkpoints.hf_import import abstract_params, import_videorefer
    from vrefer_jax.checkpoints.hf_config import find_config, model_config_from_hf

    cfg = model_config_from_hf(find_config(folder))
    abstract_params(cfg)  # trace the shapes before measuring (cached)
    jax.device_put(np.zeros(1)).block_until_ready()
    before = rss_bytes()
    t0 = time.perf_counter()
    _, params = import_videorefer(folder, use_stored_vision_tower=True, dtype=param_dtype)
    jax.block_until_ready(params)
    dt = time.perf_counter() - t0
    leaves = jax.tree.leaves(params)
    return dict(seconds=dt, peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                rss_before=before, rss_after=rss_bytes(), param_bytes=sum(x.nbytes for x in leaves),
                largest_leaf=max(x.nbytes for x in leaves), n_params=sum(x.size for x in leaves),
                device=str(jax.devices()[0]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", help="checkpoint folder (default: a temporary one, deleted afterwards)")
    p.add_argument("--file-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--param-dtype", default="float32")
    p.add_argument("--shard-size", default="300MB")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.measure:
        print(json.dumps(measure(a.measure, a.param_dtype)))
        return
    folder = a.dir or tempfile.mkdtemp(prefix="vrefer_bench_")
    try:
        t0 = time.perf_counter()
        file_bytes = generate(folder, a.file_dtype, a.shard_size)
        n_files = len([f for f in os.listdir(folder) if f.endswith(".safetensors")])
        print(f"generated {file_bytes / 1e9:.3f} GB of {a.file_dtype} tensors in {n_files} shards "
              f"({time.perf_counter() - t0:.1f} s)")
        out = subprocess.run([sys.executable, __file__, "--measure", folder, "--param-dtype", a.param_dtype],
                             check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        r = json.loads(out.stdout.strip().splitlines()[-1])
        gb = 1e9
        overhead = r["peak_rss"] - r["rss_before"] - r["param_bytes"]
        print(f"device: {r['device']}; {r['n_params'] / 1e6:.1f} M parameters as {a.param_dtype}")
        print(f"import time:            {r['seconds']:.2f} s  ({file_bytes / gb / r['seconds']:.2f} GB/s of file data)")
        print(f"sum of tensor sizes:    file {file_bytes / gb:.3f} GB, imported params {r['param_bytes'] / gb:.3f} GB "
              f"(largest leaf {r['largest_leaf'] / gb:.3f} GB)")
        print(f"RSS before import:      {r['rss_before'] / gb:.3f} GB")
        print(f"peak RSS:               {r['peak_rss'] / gb:.3f} GB")
        print(f"RSS after import:       {r['rss_after'] / gb:.3f} GB")
        print(f"peak - before - params: {overhead / gb:.3f} GB "
              f"({overhead / r['largest_leaf']:.2f} x the largest leaf)")
    finally:
        if not a.dir:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
