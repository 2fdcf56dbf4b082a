"""Generation speed: prefill time and decode tokens/s of `generate_multimodal` (random weights).

    python benchmarks/generate.py [--configs configs/models/tiny.gin configs/models/small.gin]
                                  [--batch 1 8] [--new-tokens 32] [--text 64] [--repeats 3]

Prefill = vision tower + connector + object encoder + splice + one decoder pass over the prompt
(measured as a run with max_new_tokens=1); decode tokens/s = B * (N - 1) / (time(N) - time(1)),
EOS disabled so every row runs all N steps. Times are medians after a warm-up compile, with
`block_until_ready`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vrefer_jax import batch as batch_lib  # noqa: E402
from vrefer_jax.config import VIDEO_TOKEN_INDEX, model_config_from_gin  # noqa: E402
from vrefer_jax.inference.generate import generate_multimodal  # noqa: E402
from vrefer_jax.inference.sampling import GenerationConfig  # noqa: E402
from vrefer_jax.models import videorefer  # noqa: E402


def random_params(cfg, seed=0):
    """Random weights from the parameter shapes (cheaper than running `init` eagerly)."""
    rng = np.random.default_rng(seed)
    paths, treedef = jax.tree_util.tree_flatten_with_path(videorefer.abstract_params(cfg))
    leaves = [jnp.asarray((1.0 if "scale" in str(p[-1]) else 0.0) + 0.05 * rng.standard_normal(x.shape), x.dtype)
              for p, x in paths]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def make_batch(cfg, B: int, text: int, seed=0):
    """B rows: <video> + `text` random ids + one single-frame object (`<region>` near the end)."""
    rng = np.random.default_rng(seed)
    g = cfg.vision.grid
    b = videorefer.dummy_batch(cfg, B, seq_len=text + 2, num_region_frames=1, max_objects=1, max_object_frames=1)
    b["input_ids"][:, 1:] = rng.integers(1, cfg.text.vocab_size - 1, (B, text + 1))
    b["input_ids"][:, 0] = VIDEO_TOKEN_INDEX
    b["input_ids"][:, -2] = cfg.region_token_id
    b["frames"][:] = rng.uniform(-1, 1, b["frames"].shape)
    b["region_frames"][:] = rng.uniform(-1, 1, b["region_frames"].shape)
    b["object_frames"][:, 0, 0] = 0
    b["object_masks"][:, 0, 0, : g // 2, : g // 2] = True
    b["object_valid"][:] = True
    out_len = batch_lib.model_video_tokens(cfg) + text + 2 + cfg.object_encoder.region_token_num
    return b, out_len


def timed(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main(argv=None) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=[os.path.join(root, "configs/models", f"{n}.gin")
                                                     for n in ("tiny", "small")])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--text", type=int, default=64, help="text tokens in the prompt besides the video")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    print(f"backend {jax.default_backend()}, devices {jax.device_count()}, new tokens {a.new_tokens}")
    print(f"{'config':8s} {'B':>3s} {'prompt':>7s} {'prefill ms':>11s} {'decode tok/s':>13s} {'ms/step':>8s}")
    for path in a.configs:
        cfg = model_config_from_gin([path])
        params = random_params(cfg)
        name = os.path.splitext(os.path.basename(path))[0]
        for B in a.batch:
            batch, out_len = make_batch(cfg, B, a.text)
            batch_lib.validate(cfg, batch, out_len)
            gen = GenerationConfig(max_new_tokens=a.new_tokens, eos_token_ids=(), pad_token_id=0)
            t1 = timed(lambda: generate_multimodal(cfg, params, batch, out_len, gen.replace(max_new_tokens=1)).tokens,
                       a.repeats)
            tn = timed(lambda: generate_multimodal(cfg, params, batch, out_len, gen).tokens, a.repeats)
            step = (tn - t1) / (a.new_tokens - 1)
            print(f"{name:8s} {B:3d} {out_len:7d} {1e3 * t1:11.1f} {B / step:13.1f} {1e3 * step:8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
