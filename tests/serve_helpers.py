"""What the serving tests share: a tiny VideoRefer predictor over small media, and a live uvicorn
server on 127.0.0.1 (an ephemeral port) run in a thread, bounded in time."""

from __future__ import annotations

import json
import os
import pathlib
import threading
import time

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_world(root: pathlib.Path, max_new_tokens: int = 8) -> dict:
    """A tiny random VideoRefer (configs/models/tiny.gin), its BPE tokenizer and media under `root`:
    `clip/` (10 PNG frames), `clip.mp4`, `photo.png`, `mask0.png`."""
    from data_pipeline.synthetic.tokenizer import train_tokenizer
    from test_inference import CORPUS, FLOORS, TINY, H, NF, W, random_params, write_mp4
    from vrefer_jax.config import model_config_from_gin
    from vrefer_jax.inference.predictor import Predictor, default_generation
    from vrefer_jax.text import load_tokenizer

    tok_dir = root / "tok"
    train_tokenizer(CORPUS, str(tok_dir), vocab_size=320)
    tok = load_tokenizer(str(tok_dir))
    cfg = model_config_from_gin([TINY])
    cfg = cfg.replace(text=cfg.text.__class__(**{**cfg.text.__dict__, "vocab_size": len(tok)}),
                      region_token_id=tok.region_id, pad_token_id=tok.pad_id)
    params = random_params(cfg)
    rng = np.random.default_rng(0)
    (root / "clip").mkdir()
    frames = []
    for t in range(NF):
        img = rng.integers(60, 120, (H, W, 3), np.uint8)
        img[10:22, 4 + 3 * t:16 + 3 * t] = (220, 30, 30)
        Image.fromarray(img).save(root / "clip" / f"{t:05d}.png")
        frames.append(img)
    write_mp4(root / "clip.mp4", frames)
    Image.fromarray(rng.integers(0, 255, (H, W, 3), np.uint8)).save(root / "photo.png")
    m = np.zeros((H, W), np.uint8)
    m[10:22, 4:16] = 255
    Image.fromarray(m).save(root / "mask0.png")
    gen = default_generation(tok, max_new_tokens=max_new_tokens)
    pred = Predictor(cfg, params, tok, num_frames=4, generation=gen, bucket_floors=FLOORS)
    return dict(root=str(root), tok_dir=str(tok_dir), tok=tok, cfg=cfg, params=params, pred=pred, gen=gen,
                H=H, W=W)


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1 in a daemon thread; `stop()` is the path SIGTERM takes
    (`should_exit`: stop accepting, answer open requests, lifespan shutdown)."""

    def __init__(self, app, start_timeout: float = 60.0):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    timeout_graceful_shutdown=60))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if time.monotonic() - t0 > start_timeout or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self, timeout: float = 60.0) -> bool:
        self.server.should_exit = True
        self.thread.join(timeout)
        return not self.thread.is_alive()


def sse_events(response) -> list:
    """The `data:` payloads of a server-sent-events response (JSON decoded; `[DONE]` kept as is)."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def shared_video(name: str = "dog_h264_1280x720.mp4") -> str | None:
    """The shared test video (`../shared/data/videos` beside the project, or /work/shared)."""
    for base in (ROOT.parent / "shared" / "data" / "videos", pathlib.Path("/work/shared/data/videos")):
        if (base / name).is_file():
            return str(base / name)
    return None


def wait_for(cond, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


__all__ = ["tiny_world", "LiveServer", "sse_events", "shared_video", "wait_for"]
