"""`vrefer-serve` against a live server on 127.0.0.1 (a tiny random VideoRefer): good and bad requests
mixed in one batch, streaming, chat history, timeouts, limits, metrics, shutdown with requests in
flight, and every greedy answer equal to the offline `Predictor`'s for the same input."""

import base64
import concurrent.futures as cf
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from serve_helpers import LiveServer, sse_events, tiny_world, wait_for
from vrefer_jax.inference import generate as gen_lib
from vrefer_jax.inference.request_files import request_to_sample
from vrefer_jax.serving.app import create_app
from vrefer_jax.serving.config import ServeConfig

N_NEW = 8  # default max_new_tokens of the tests' server and offline predictor


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world(tmp_path_factory.mktemp("serve"), max_new_tokens=N_NEW)


def serve_cfg(world, **kw):
    base = dict(media_root=world["root"], batch_window_ms=400.0, stream_chunk=2, max_new_tokens=64,
                default_max_new_tokens=N_NEW, max_objects=3, request_timeout_s=60.0, shutdown_timeout_s=60.0)
    return ServeConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def live(world):
    server = LiveServer(create_app(world["pred"], serve_cfg(world), model_name="tiny"))
    yield server
    assert server.stop()


def offline(world, req, max_new_tokens=N_NEW):
    """The offline Predictor's greedy answer to a `request_files` request."""
    pred = world["pred"]
    s = request_to_sample(req, 0, world["root"])
    return pred.answer([s], world["root"], gen=pred.generation.replace(max_new_tokens=max_new_tokens))[0]


def png_b64(mask: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


GOOD = [
    {"id": "single", "video": "clip", "question": "What is <region> doing?", "frame": 2,
     "objects": [{"mask": "mask0.png"}]},
    {"id": "multi", "video": "clip", "question": "Compare <object0> with <object1>.",
     "objects": [{"frames": {"0": {"mask": "mask0.png"}, "4": {"box": [16, 10, 28, 22]}}},
                 {"polygon": [[3, 3, 20, 3, 20, 30, 3, 30]], "frame": 5}]},
    {"id": "inline", "video": "clip.mp4", "question": "Where does <region> go?", "frame": 1, "max_new_tokens": 5},
]


def _inline_mask(world):
    m = np.zeros((world["H"], world["W"]), bool)
    m[8:20, 10:30] = True
    return m


def test_mixed_batch_good_and_bad(world, live):
    """Good and bad requests sent together: every bad one gets its own 4xx naming the field, the good
    ones are decoded in one batch and answer exactly what the offline predictor answers."""
    good = [dict(r) for r in GOOD]
    good[2]["objects"] = [{"png": png_b64(_inline_mask(world))}]
    bad = [
        ({**GOOD[0], "id": "unknown", "colour": "red"}, 400, "unknown_field", "colour"),
        ({**GOOD[0], "id": "nested", "objects": [{"mask": "mask0.png", "shape": 1}]}, 400, "unknown_field",
         "objects.0.shape"),
        ({**GOOD[0], "id": "outside", "video": "../clip"}, 400, "media_outside_root", "video"),
        ({**GOOD[0], "id": "count", "question": "<region> and <region>?"}, 400, "bad_request", "question"),
        ({**GOOD[0], "id": "many", "question": "<region>" * 4, "objects": [{"box": [0, 0, 5, 5]}] * 4}, 400,
         "limit_exceeded", "objects"),
        ({**GOOD[0], "id": "missing", "video": "nothing.mp4"}, 404, "media_not_found", "video"),
        ({**GOOD[0], "id": "budget", "max_new_tokens": 1000}, 400, "limit_exceeded", "max_new_tokens"),
        ({**GOOD[0], "id": "notpng", "objects": [{"png": "%%%"}]}, 400, "bad_request", "objects[0].png"),
    ]
    before = httpx.get(live.url + "/metrics?format=json").json()
    with httpx.Client(base_url=live.url, timeout=60) as client, cf.ThreadPoolExecutor(12) as ex:
        futs = [ex.submit(client.post, "/v1/regions/ask", json=r) for r in good + [b[0] for b in bad]]
        replies = [f.result() for f in futs]
    for r, want in zip(replies[:3], [offline(world, g, g.get("max_new_tokens", N_NEW)) for g in good]):
        assert r.status_code == 200, r.text
        assert r.json()["answer"] == want and r.headers["x-request-id"] == r.json()["id"]
    assert replies[2].json()["usage"]["completion_tokens"] <= 5
    for r, (req, status, code, param) in zip(replies[3:], bad):
        err = r.json()["error"]
        assert (r.status_code, err["code"]) == (status, code), (req["id"], r.text)
        assert err["param"] == param and err["message"], (req["id"], err)
    after = httpx.get(live.url + "/metrics?format=json").json()
    sizes = {int(k): v - before["batch_sizes"].get(k, 0) for k, v in after["batch_sizes"].items()}
    assert sizes.get(3) == 1, sizes  # the three good requests shared one batch
    assert after["requests"]["bad_request"] - before["requests"].get("bad_request", 0) == len(bad)
    text = httpx.get(live.url + "/metrics").text
    assert "vrefer_queue_depth 0" in text and 'vrefer_batch_size_bucket{le="3"}' in text
    assert "vrefer_tokens_per_second" in text


def test_streaming_chat_and_ask(world, live):
    """SSE: the text arrives in several pieces while the batch decodes, and the pieces add up to the
    non-streamed answer, which is the offline one."""
    frame_part = {"type": "video", "video": "clip"}
    objects = [{"mask": "mask0.png", "frame": 3}]
    body = {"messages": [{"role": "user", "content": [frame_part, {"type": "text", "text": "What is <object0> doing?"}],
                          "objects": objects}], "max_tokens": 16}
    want = offline(world, {"video": "clip", "question": "What is <object0> doing?", "objects": objects}, 16)
    with httpx.Client(base_url=live.url, timeout=60) as client:
        plain = client.post("/v1/chat/completions", json=body).json()
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True,
                                                                 "stream_options": {"include_usage": True}}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = sse_events(r)
        with client.stream("POST", "/v1/regions/ask", json={"video": "clip", "question": "What is <object0> doing?",
                                                             "objects": objects, "max_new_tokens": 16,
                                                             "stream": True}) as r:
            ask_events = sse_events(r)
    assert plain["object"] == "chat.completion" and plain["choices"][0]["message"]["content"] == want
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]
    deltas = [e["choices"][0]["delta"].get("content", "") for e in events[:-2] if e["choices"]]
    assert sum(1 for d in deltas if d) >= 2, deltas  # streamed in pieces, not one blob
    assert "".join(deltas) == want
    assert events[-3]["choices"][0]["finish_reason"] in ("stop", "length")
    pieces = [e["delta"] for e in ask_events if "delta" in e]
    assert len([p for p in pieces if p]) >= 2 and "".join(pieces) == ask_events[-1]["answer"] == want


def test_settings_split_batches_but_max_new_tokens_does_not():
    """Rows batch together when their programs agree: greedy ignores the sampling knobs and the
    seed; max_new_tokens never splits; sampling parameters and the penalty do."""
    from vrefer_jax.inference.sampling import GenerationConfig
    from vrefer_jax.serving.engine import settings_key

    g = GenerationConfig(max_new_tokens=8, repetition_penalty=1.05)
    assert settings_key(g) == settings_key(g.replace(max_new_tokens=99, temperature=0.3, top_k=5, seed=7))
    assert settings_key(g) != settings_key(g.replace(repetition_penalty=1.0))
    s = g.replace(do_sample=True, temperature=0.7)
    assert settings_key(s) != settings_key(s.replace(temperature=0.8)) and settings_key(s) != settings_key(g)
    assert settings_key(s) == settings_key(s.replace(max_new_tokens=3))


def test_chat_history_and_image(world, live):
    """A second turn about an object introduced in the first: the prompt holds both turns (the
    offline predictor given the same history answers the same), and images work like videos."""
    obj = {"box": [2, 2, 30, 30]}
    body = {"messages": [
        {"role": "user", "content": [{"type": "image", "image": "photo.png"}, {"type": "text", "text": "Describe <object0>."}],
         "objects": [obj]},
        {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": "Where is <object0>?"}]}
    r = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    req = {"image": "photo.png", "question": "Where is <object0>?", "objects": [obj],
           "history": [{"question": "Describe <object0>.", "answer": "A red square."}]}
    assert r.json()["choices"][0]["message"]["content"] == offline(world, req)
    s = request_to_sample(req, 0, world["root"])
    assert [t["value"] for t in s.conversations] == ["<image>\nDescribe <object0> [<region>].", "A red square.",
                                                     "Where is <object0>?", ""]
    single = offline(world, {"image": "photo.png", "question": "Where is <object0>?", "objects": [obj]})
    print("\nwith history:", r.json()["choices"][0]["message"]["content"], "| without:", single)
    bad = dict(body, messages=body["messages"] + [{"role": "user", "content": "again?"}])
    r = httpx.post(live.url + "/v1/chat/completions", json=bad, timeout=60)
    assert r.status_code == 400 and "alternate" in r.json()["error"]["message"]
    r = httpx.post(live.url + "/v1/chat/completions", json={**body, "n": 2}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_uploaded_video_and_timeouts(world, live):
    """A video uploaded as a data: URL answers like the same file by path (and is deleted after);
    a request whose timeout passes while it waits for its batch gets 504."""
    with open(f"{world['root']}/clip.mp4", "rb") as f:
        url = "data:video/mp4;base64," + base64.b64encode(f.read()).decode()
    req = {"question": "What is <region> doing?", "frame": 2, "objects": [{"box": [4, 10, 16, 22]}]}
    r = httpx.post(live.url + "/v1/regions/ask", json={**req, "video": url}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["answer"] == offline(world, {**req, "video": "clip.mp4"})
    svc = live.server.config.app.state.service
    import os

    assert os.listdir(svc.preparer.upload_dir) == []
    r = httpx.post(live.url + "/v1/regions/ask", json={**req, "video": "clip", "timeout": 0.05}, timeout=60)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    r = httpx.get(live.url + "/health")
    assert r.json()["status"] == "ok" and r.json()["family"] == "videorefer"


def test_shutdown_finishes_requests_in_flight(world):
    """should_exit (what SIGTERM sets) while requests are queued and decoding: every one of them is
    answered in full, the server stops within bounds, and later connections are refused."""
    cfg = serve_cfg(world, max_batch_size=4)  # 8 requests: two batches of 4 (programs the tests compiled)
    server = LiveServer(create_app(world["pred"], cfg))
    svc = server.server.config.app.state.service
    reqs = [dict(GOOD[0], id=f"r{i}", frame=i % 4, max_new_tokens=16) for i in range(8)]
    with httpx.Client(base_url=server.url, timeout=60) as client, cf.ThreadPoolExecutor(8) as ex:
        futs = [ex.submit(client.post, "/v1/regions/ask", json=r) for r in reqs]
        wait_for(lambda: svc.engine.busy and svc.metrics.queue_depth() > 0, 30, "a busy engine with a queue")
        assert server.stop(60)
        replies = [f.result() for f in futs]
    assert [r.status_code for r in replies] == [200] * 8
    for r, q in zip(replies, reqs):
        assert r.json()["answer"] == offline(world, q, 16)
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=5)
    assert not svc.engine.accepting and svc.metrics.queue_depth() == 0


@pytest.mark.slow
def test_chunked_decode_equals_one_loop(world):
    """The streaming path (prefill + chunks of the decode loop) gives the one-loop program's tokens
    for any chunk size; a chunk size compiles once whatever step it starts from."""
    pred = world["pred"]
    s = request_to_sample(GOOD[1], 0, world["root"])
    batch, out_len = pred.make_batch([pred.prepare(s, world["root"])] * 2)
    gen = pred.generation.replace(max_new_tokens=12, eos_token_ids=(10_000,))  # no EOS: all 12 steps
    _, ref = pred.generate_batch(batch, out_len, gen, return_output=True)
    for chunk in (1, 5):
        steps = list(pred.stream_batch(batch, out_len, gen, chunk=chunk))
        assert [st.steps for st in steps] == sorted({1, *range(1 + chunk, 12, chunk), 12})
        np.testing.assert_array_equal(steps[-1].tokens, ref.tokens)
        np.testing.assert_array_equal(steps[-1].lengths, ref.lengths)
    n = gen_lib._continue_decode._cache_size()
    list(pred.stream_batch(batch, out_len, gen, chunk=5))
    assert gen_lib._continue_decode._cache_size() == n


def test_text_stream_pieces_add_up():
    """Deltas never retract: a character still being completed and trailing spaces are held back;
    a broken byte sequence in the middle is final and goes out."""
    from vrefer_jax.serving.text_stream import TextStream

    class Bytes:  # a byte tokenizer: id = byte
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    text = "  héllo wörld ✓ done  "
    ids = list(text.encode())
    ts = TextStream(Bytes())
    pieces = [ts.update(ids[:k]) for k in range(1, len(ids) + 1)]
    rest, final = ts.finish(ids)
    assert final == text.strip() and "".join(pieces) + rest == final
    assert all("\ufffd" not in p for p in pieces) and sum(1 for p in pieces if p) > 5
    broken = list(b"ab\xe9cd\xff")  # invalid bytes mid-text stay U+FFFD; the final one is held to the end
    ts = TextStream(Bytes())
    pieces = [ts.update(broken[:k]) for k in range(1, len(broken) + 1)]
    rest, final = ts.finish(broken)
    assert "".join(pieces) == "ab\ufffdcd" and rest == "\ufffd" and final == "ab\ufffdcd\ufffd"


def test_config_and_cli_errors(world, capsys):
    from vrefer_jax.serving import cli

    with pytest.raises(ValueError, match="max_batch_size"):
        ServeConfig(max_batch_size=0)
    assert cli.main(["--checkpoint", "/nonexistent/ckpt"]) == 2
    assert "cannot load --checkpoint" in capsys.readouterr().err
    assert cli.main(["--checkpoint", "x", "--gin_bindings", "ServeConfig.nope = 1"], predictor=world["pred"]) == 2
    assert "configuration" in capsys.readouterr().err
    assert cli.main(["--checkpoint", "x", "--warmup", "{not json"], predictor=world["pred"]) == 2
    assert "--warmup" in capsys.readouterr().err
    server = cli.main(["--checkpoint", "tiny-ckpt", "--gin_file", "configs/serve/tiny.gin", "--port", "0",
                       "--media-root", world["root"]], predictor=world["pred"], run=False)
    svc = server.config.app.state.service
    assert svc.cfg.stream_chunk == 2 and svc.cfg.media_root == world["root"] and svc.model_name == "tiny-ckpt"
    import gin

    gin.clear_config()


@pytest.mark.slow
def test_serving_on_a_mesh(world):
    """`vrefer-serve --mesh`: a predictor on a (data 2, tensor 2) mesh of the fake CPU devices serves
    a batch of three (rows padded to the row shards) with the single-device answers."""
    from vrefer_jax.inference.predictor import Predictor
    from vrefer_jax.sharding import MeshConfig, make_mesh

    mesh = make_mesh(MeshConfig.parse("data=2,fsdp=1,tensor=2"))
    pred = Predictor(world["cfg"], world["params"], world["tok"], num_frames=4, generation=world["gen"],
                     bucket_floors=world["pred"].host.bucket_floors, mesh=mesh)
    server = LiveServer(create_app(pred, serve_cfg(world)))
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client, cf.ThreadPoolExecutor(3) as ex:
            reqs = [dict(GOOD[0], id=f"m{i}", frame=i) for i in range(3)]
            replies = [f.result() for f in [ex.submit(client.post, "/v1/regions/ask", json=r) for r in reqs]]
    finally:
        assert server.stop()
    assert [r.json()["answer"] for r in replies] == [offline(world, r) for r in reqs]
