"""Load test of `vrefer-serve` on loopback: N concurrent clients vs sequential batch-1 requests.

    python benchmarks/serve.py [--clients 8] [--requests 64] [--new-tokens 16] [--window-ms 30]
                               [--max-batch 8] [--out serve_bench.json]

A tiny random VideoRefer (configs/models/tiny.gin, a BPE tokenizer trained on a few sentences) is
saved as an Orbax checkpoint with a 10-frame clip; `vrefer-serve` runs in a subprocess on
127.0.0.1 (an ephemeral port) with `configs/serve/tiny.gin`. The requests are single-frame
questions about one object (box, polygon or inline-PNG masks, frames and wording varied), all greedy
with `--new-tokens` new tokens. First the offline `Predictor` answers each request at batch 1 (the
reference); then, after a warm-up that compiles every batch shape, the same requests go to the
server (1) one at a time from one client (sequential batch-1) and (2) from `--clients` concurrent
clients (the same server: a lone request waits `--window-ms` for company). Reported: requests/s, generated tokens/s, latency percentiles (p50 / p90 / p99, arrival to
the last byte), the batch sizes the server formed, requests lost (every request must get a 200)
and answers that differ from the offline ones (must be 0). Everything is bounded in time: the server
is stopped (SIGTERM: a graceful drain; uvicorn re-raises the signal after it, so the exit status
is -15) at the end or on any failure. The server starts with `--warmup` (one request per question wording,
which covers the prompt-length buckets of the load), which compiles every batch row count before it
answers, so no compile falls inside a measurement. Exit status 1 when a request
was lost or an answer differed.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CORPUS = ["What is <region> doing in the video? Describe <region> and compare it with <region>.",
          "The red square moves to the right. A blue circle stays still. Where does it go next?"] * 20
H, W, NF = 40, 56, 10


def build_model(work: str) -> tuple[str, str]:
    """A tiny random VideoRefer checkpoint and its media -> (checkpoint folder, media root)."""
    from data_pipeline.synthetic.tokenizer import train_tokenizer
    from generate import random_params
    from vrefer_jax.checkpoints import store
    from vrefer_jax.config import model_config_from_gin
    from vrefer_jax.text import load_tokenizer

    tok_dir = os.path.join(work, "tok")
    train_tokenizer(CORPUS, tok_dir, vocab_size=320)
    tok = load_tokenizer(tok_dir)
    cfg = model_config_from_gin([os.path.join(ROOT, "configs/models/tiny.gin")])
    cfg = cfg.replace(text=cfg.text.__class__(**{**cfg.text.__dict__, "vocab_size": len(tok)}),
                      region_token_id=tok.region_id, pad_token_id=tok.pad_id)
    ckpt = os.path.join(work, "ckpt")
    store.save_imported(ckpt, cfg, random_params(cfg), None, tok_dir)
    media = os.path.join(work, "media")
    os.makedirs(os.path.join(media, "clip"))
    rng = np.random.default_rng(0)
    for t in range(NF):
        img = rng.integers(60, 120, (H, W, 3), np.uint8)
        img[10:22, 4 + 3 * t:16 + 3 * t] = (220, 30, 30)
        Image.fromarray(img).save(os.path.join(media, "clip", f"{t:05d}.png"))
    return ckpt, media


QUESTIONS = ["What is <region> doing?", "Where does <region> go?", "Describe <region> briefly.",
             "What colour is <region>?", "Is <region> moving to the right?"]


def make_requests(n: int, new_tokens: int) -> list[dict]:
    questions = QUESTIONS
    out = []
    for i in range(n):
        x0, y0 = 2 + (i * 7) % 30, 2 + (i * 5) % 18
        kind = i % 3
        if kind == 0:
            obj = {"box": [x0, y0, x0 + 14, y0 + 12]}
        elif kind == 1:
            obj = {"polygon": [[x0, y0, x0 + 16, y0, x0 + 8, y0 + 14]]}
        else:
            m = np.zeros((H, W), np.uint8)
            m[y0:y0 + 10, x0:x0 + 10] = 255
            buf = io.BytesIO()
            Image.fromarray(m).save(buf, format="PNG")
            obj = {"png": base64.b64encode(buf.getvalue()).decode()}
        out.append({"id": f"q{i}", "video": "clip", "question": questions[i % len(questions)], "frame": i % NF,
                    "objects": [obj], "max_new_tokens": new_tokens})
    return out


def offline_answers(ckpt: str, media: str, reqs: list[dict], new_tokens: int) -> list[str]:
    from vrefer_jax.inference.predictor import Predictor
    from vrefer_jax.inference.request_files import request_to_sample

    pred = Predictor.load(ckpt, num_frames=4)
    gen = pred.generation.replace(max_new_tokens=new_tokens)
    body = [{k: v for k, v in r.items() if k != "max_new_tokens"} for r in reqs]
    return pred.answer([request_to_sample(r, i, media) for i, r in enumerate(body)], media, gen=gen)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: str, media: str, port: int, a) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vrefer_jax.serving.cli", "--checkpoint", ckpt, "--media-root", media,
           "--port", str(port), "--num-frames", "4", "--gin_file", "configs/serve/tiny.gin", "--log-level", "warning",
           "--gin_bindings", f"ServeConfig.batch_window_ms = {a.window_ms}",
           "--gin_bindings", f"ServeConfig.max_batch_size = {a.max_batch}",
           "--gin_bindings", f"ServeConfig.max_queue = {max(256, a.requests)}",
           "--gin_bindings", f"ServeConfig.default_max_new_tokens = {a.new_tokens}",
           "--warmup", json.dumps([{k: v for k, v in r.items() if k != "max_new_tokens"}
                                   for r in make_requests(len(QUESTIONS), a.new_tokens)])]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(cmd, cwd=ROOT, env=env)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server did not become healthy in {timeout:.0f} s")


def run_load(url: str, reqs: list[dict], clients: int, timeout: float) -> dict:
    """`clients` threads, each sending its share back to back -> results in request order."""
    import httpx

    results: list[dict | None] = [None] * len(reqs)

    def client(k: int):
        with httpx.Client(base_url=url, timeout=timeout) as c:
            for i in range(k, len(reqs), clients):
                t = time.perf_counter()
                try:
                    r = c.post("/v1/regions/ask", json=reqs[i])
                    body = r.json()
                    results[i] = {"status": r.status_code, "latency": time.perf_counter() - t,
                                  "answer": body.get("answer"), "tokens": body.get("usage", {}).get("completion_tokens", 0)}
                except httpx.HTTPError as e:
                    results[i] = {"status": None, "latency": time.perf_counter() - t, "error": str(e), "tokens": 0}

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as ex:
        list(ex.map(client, range(clients)))
    wall = time.perf_counter() - t0
    lat = np.array([r["latency"] for r in results])
    ok = [r for r in results if r["status"] == 200]
    toks = sum(r["tokens"] for r in ok)
    return {"clients": clients, "requests": len(reqs), "ok": len(ok), "wall_s": round(wall, 3),
            "requests_per_s": round(len(ok) / wall, 3), "tokens_per_s": round(toks / wall, 2),
            "latency_p50_s": round(float(np.percentile(lat, 50)), 4),
            "latency_p90_s": round(float(np.percentile(lat, 90)), 4),
            "latency_p99_s": round(float(np.percentile(lat, 99)), 4), "results": results}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--window-ms", type=float, default=30.0)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=600.0, help="bound on server start-up and each phase (s)")
    ap.add_argument("--out", help="write the figures as JSON here")
    a = ap.parse_args(argv)
    import httpx

    work = tempfile.mkdtemp(prefix="vrefer-serve-bench-")
    t0 = time.perf_counter()
    ckpt, media = build_model(work)
    reqs = make_requests(a.requests, a.new_tokens)
    reference = offline_answers(ckpt, media, reqs, a.new_tokens)
    print(f"model + offline answers: {time.perf_counter() - t0:.1f} s ({len(set(reference))} distinct answers)")
    t0 = time.perf_counter()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(ckpt, media, port, a)
    try:
        wait_healthy(url, proc, a.timeout)
        print(f"server up (its --warmup compiled every batch row count): {time.perf_counter() - t0:.1f} s")
        m0 = httpx.get(url + "/metrics?format=json").json()
        seq = run_load(url, reqs, 1, a.timeout)
        m1 = httpx.get(url + "/metrics?format=json").json()
        conc = run_load(url, reqs, a.clients, a.timeout)
        m2 = httpx.get(url + "/metrics?format=json").json()
    finally:
        proc.send_signal(signal.SIGTERM)  # graceful drain
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()

    def batches(m_a, m_b):
        return {k: v - m_a["batch_sizes"].get(k, 0) for k, v in m_b["batch_sizes"].items()
                if v - m_a["batch_sizes"].get(k, 0)}

    report = {"config": vars(a), "server_exit": proc.returncode}
    failures = 0
    for name, run, (ma, mb) in (("sequential_batch1", seq, (m0, m1)), (f"concurrent_{a.clients}", conc, (m1, m2))):
        lost = run["requests"] - run["ok"]
        wrong = sum(1 for r, ref in zip(run["results"], reference) if r["status"] == 200 and r["answer"] != ref)
        failures += lost + wrong
        report[name] = {k: v for k, v in run.items() if k != "results"}
        report[name].update(lost=lost, differ_from_offline=wrong, batch_sizes=batches(ma, mb))
    report["speedup_requests_per_s"] = round(report[f"concurrent_{a.clients}"]["requests_per_s"]
                                             / report["sequential_batch1"]["requests_per_s"], 2)
    print(json.dumps(report, indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=2)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
