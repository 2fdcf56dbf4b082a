"""`vrefer-serve` over a tiny random VideoRefer-VideoLLaMA3: an image and a video request batched
together (VRVL3 pads every size, so any rows mix), streamed and plain, equal to the offline
Predictor's greedy answers; a bad request beside them gets its own 400."""

import concurrent.futures as cf
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from serve_helpers import LiveServer, sse_events
from vrefer_jax.inference.request_files import request_to_sample
from vrefer_jax.serving.app import create_app
from vrefer_jax.serving.config import ServeConfig


@pytest.fixture(scope="module")
def vl3(tmp_path_factory):
    import jax

    from test_vl3_prompt import _bpe
    from vrefer_jax import families
    from vrefer_jax.config import TextConfig
    from vrefer_jax.inference.predictor import Predictor
    from vrefer_jax.inference.sampling import GenerationConfig
    from vrefer_jax.text import vl3_prompt
    from vrefer_jax.vl3_config import NaViTConfig, VL3Config

    root = tmp_path_factory.mktemp("vl3serve")
    (root / "tok").mkdir()
    _bpe().save(str(root / "tok" / "tokenizer.json"))
    (root / "tok" / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}))
    tok = vl3_prompt.load_vl3_tokenizer(str(root / "tok"))
    cfg = VL3Config(
        vision=NaViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        text=TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=True),
        mm_max_length=48, image_token_id=tok.token_to_id("<image>"), region_token_id=tok.token_to_id("<REGION>"),
        pad_token_id=tok.pad_id)
    rng = np.random.default_rng(0)
    params = jax.tree.map_with_path(
        lambda path, a: (np.ones(a.shape, a.dtype) if "scale" in str(path[-1]) else
                         np.zeros(a.shape, a.dtype) if "bias" in str(path[-1]) else
                         (0.2 * rng.standard_normal(a.shape)).astype(a.dtype)),
        families.get("videorefer_videollama3").abstract_params(cfg))
    gen = GenerationConfig(max_new_tokens=6, eos_token_ids=(tok.eos_id,), pad_token_id=tok.pad_id)
    pred = Predictor(cfg, params, tok, generation=gen)
    pred.configure(fps=1, max_frames=4)
    (root / "clip").mkdir()
    for t in range(4):
        img = rng.integers(40, 200, (56, 84, 3), np.uint8)
        img[10:30, 5 + 8 * t:25 + 8 * t] = (220, 30, 30)
        Image.fromarray(img).save(root / "clip" / f"{t:05d}.png")
    Image.fromarray(rng.integers(0, 255, (56, 84, 3), np.uint8)).save(root / "photo.png")
    return dict(root=str(root), pred=pred)


def test_vl3_batch_stream_and_offline_equality(vl3):
    pred, root = vl3["pred"], vl3["root"]
    image = {"id": "img", "image": "photo.png", "question": "What is <region>?", "objects": [{"box": [10, 8, 50, 40]}]}
    video = {"id": "vid", "video": "clip", "question": "What is <object0> doing?", "frame": 1,
             "objects": [{"box": [12, 10, 40, 30]}]}
    bad = {"id": "bad", "image": "photo.png", "question": "What is <region>?", "objects": [{"box": [1, 2, 3]}]}
    want = pred.answer([request_to_sample(r, i, root) for i, r in enumerate([image, video])], root)
    cfg = ServeConfig(media_root=root, batch_window_ms=400.0, stream_chunk=2, max_new_tokens=16,
                      default_max_new_tokens=6)
    server = LiveServer(create_app(pred, cfg))
    svc = server.server.config.app.state.service
    try:
        with httpx.Client(base_url=server.url, timeout=120) as c, cf.ThreadPoolExecutor(3) as ex:
            futs = [ex.submit(c.post, "/v1/regions/ask", json=r) for r in (image, video, bad)]
            replies = [f.result() for f in futs]
            with c.stream("POST", "/v1/regions/ask", json={**video, "stream": True}) as r:
                events = sse_events(r)
        assert [r.status_code for r in replies] == [200, 200, 400]
        assert [r.json()["answer"] for r in replies[:2]] == want
        assert "objects[0].box" in replies[2].json()["error"]["message"]
        assert svc.metrics.snapshot()["batch_sizes"].get("2") == 1  # image and video in one batch
        assert "".join(e.get("delta", "") for e in events) == events[-1]["answer"] == want[1]
        assert httpx.get(server.url + "/health").json()["family"] == "videorefer_videollama3"
    finally:
        assert server.stop()
