"""Forward and forward+backward time of VideoRefer configs, and achieved FLOP/s against this
machine's measured matmul peak.

    python benchmarks/forward.py                       # tiny and small, fp32
    python benchmarks/forward.py --configs small --dtype bfloat16 --batch 2

FLOPs come from XLA's cost analysis of the compiled step (what the hardware actually executes,
including the vision tower and connector), not from a formula.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from vrefer_jax import batch as batch_lib
from vrefer_jax import host_memory
from vrefer_jax.config import VIDEO_TOKEN_INDEX, model_config_from_gin
from vrefer_jax.models import videorefer
from vrefer_jax.models.videorefer import VideoRefer

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs" / "models"


def add_host_memory_flag(ap: argparse.ArgumentParser) -> None:
    """`--host-memory`; pass its value to `host_memory.configure` before the first computation."""
    ap.add_argument("--host-memory", default="auto", choices=host_memory.MODES,
                    help="vrefer_jax.host_memory: 'auto' keeps XLA:CPU's step memory mapped between steps "
                         "(as vrefer-train does on CPU); 'default' measures JAX's own setting")


def timeit(fn, *args, warmup: int = 1, iters: int = 5) -> float:
    """Median wall time in seconds of `fn(*args)` (blocked until ready)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak(dtype: str, n: int = 2048) -> float:
    """Measured FLOP/s of an n x n matmul (bf16 inputs accumulate in fp32)."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
    f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    return 2 * n**3 / timeit(f, a, a, warmup=2, iters=10)


def flops_of(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def bench_batch(cfg, batch: int, text_len: int, objects: int, object_frames: int):
    """A realistic batch: one <video>, `objects` regions on `object_frames` frames each."""
    rng = np.random.default_rng(0)
    T, S, g, K, M = cfg.num_frames, cfg.vision.image_size, cfg.vision.grid, objects, object_frames
    ids = rng.integers(1, cfg.text.vocab_size - 1, size=(batch, text_len)).astype(np.int32)
    ids[:, 1] = VIDEO_TOKEN_INDEX
    ids[:, 3:3 + 2 * K:2] = cfg.region_token_id
    masks = np.zeros((batch, K, M, g, g), bool)
    masks[..., g // 4: 3 * g // 4, g // 4: 3 * g // 4] = True
    return dict(
        input_ids=ids, labels=ids.copy(), segment_ids=np.ones_like(ids),
        frames=rng.standard_normal((batch, T, S, S, 3)).astype(np.float32),
        region_frames=rng.standard_normal((batch, M, S, S, 3)).astype(np.float32),
        object_frames=np.broadcast_to(np.arange(M, dtype=np.int32), (batch, K, M)).copy(),
        object_masks=masks, object_valid=np.ones((batch, K), bool))


def run(name: str, dtype: str, batch: int, text_len: int, peak: float, remat: str) -> dict:
    cfg = model_config_from_gin([str(CONFIGS / f"{name}.gin")]).replace(dtype=dtype, remat_policy=remat)
    b = bench_batch(cfg, batch, text_len, objects=2, object_frames=8)
    nv = batch_lib.model_video_tokens(cfg)
    out_len = text_len + nv + 2 * cfg.object_encoder.region_token_num
    batch_lib.validate(cfg, b, out_len)
    params = videorefer.init_params(cfg, jax.random.key(0))
    model = VideoRefer(cfg)

    def loss(p, bt):
        logits, inp = model.apply({"params": p}, bt, out_len)
        lab = inp["labels"][:, 1:]
        lp = jax.nn.log_softmax(logits[:, :-1])
        nll = -jnp.take_along_axis(lp, jnp.maximum(lab, 0)[..., None], -1)[..., 0]
        return jnp.sum(jnp.where(lab >= 0, nll, 0)) / jnp.maximum(jnp.sum(lab >= 0), 1)

    fwd = jax.jit(loss)
    fwd_bwd = jax.jit(jax.value_and_grad(loss))
    f_flops, fb_flops = flops_of(loss, params, b), flops_of(jax.value_and_grad(loss), params, b)
    t_f, t_fb = timeit(fwd, params, b), timeit(fwd_bwd, params, b)
    n_params = videorefer.count_params(params)
    return dict(config=name, dtype=dtype, params=n_params, batch=batch, seq=out_len,
                fwd_ms=1e3 * t_f, fwd_gflops=f_flops / t_f / 1e9, fwd_mfu=f_flops / t_f / peak,
                fb_ms=1e3 * t_fb, fb_gflops=fb_flops / t_fb / 1e9, fb_mfu=fb_flops / t_fb / peak,
                tokens_per_s=batch * out_len / t_fb)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["tiny", "small"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--text_len", type=int, default=64)
    ap.add_argument("--remat", default="none")
    args = ap.parse_args()

    peak = matmul_peak(args.dtype)
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  "
          f"measured matmul peak ({args.dtype}): {peak / 1e9:.1f} GFLOP/s")
    header = (f"{'config':8} {'dtype':9} {'params':>12} {'B':>3} {'seq':>5} | {'fwd ms':>8} {'GFLOP/s':>8} "
              f"{'MFU':>6} | {'fwd+bwd ms':>10} {'GFLOP/s':>8} {'MFU':>6} | {'train tok/s':>11}")
    print(header)
    print("-" * len(header))
    for name in args.configs:
        r = run(name, args.dtype, args.batch, args.text_len, peak, args.remat)
        print(f"{r['config']:8} {r['dtype']:9} {r['params']:>12,} {r['batch']:>3} {r['seq']:>5} | "
              f"{r['fwd_ms']:>8.1f} {r['fwd_gflops']:>8.1f} {r['fwd_mfu']:>6.1%} | "
              f"{r['fb_ms']:>10.1f} {r['fb_gflops']:>8.1f} {r['fb_mfu']:>6.1%} | {r['tokens_per_s']:>11.0f}")


if __name__ == "__main__":
    main()
