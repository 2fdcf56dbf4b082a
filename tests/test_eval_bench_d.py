"""Bench-D evaluation: judge client against a local OpenAI-compatible server, parsing, cache,
attribute scoring, CLI."""

import http.server
import json
import os
import threading

import pytest

from data_pipeline.synthetic import dataset, scene
from test_eval_bench_q import FakePredictor, make_bench
from vrefer_jax.evaluation import attribute_score, bench_d, cli, judge, runner

GOOD = ("1. Subject Correspondence: 5\nExplanation: same dog.\n2. Appearance Description: 4\nExplanation: ok.\n"
        "3. Temporal Description: 3\nExplanation: partly.\n4. Hallucination Detection: 2\nExplanation: adds a ball.")
MARKDOWN = GOOD.replace("Subject Correspondence", "**Subject Correspondence**")


class Server:
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1; the reply depends on a keyword in
    the predicted description: FLAKY (500 once, then fine), MALFORMED (reply text without
    scores), PARTIAL (one dimension missing), BADSCORE (score '.'), BADBODY (non-JSON body,
    always), MARKDOWN (bold names), ONCEBAD (MALFORMED the first time, then GOOD), else GOOD."""

    def __init__(self):
        self.requests, self.bodies, self.headers, self.flaky_seen = 0, [], [], set()
        self.oncebad_seen = set()
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                outer.requests += 1
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    return self._send(404, b'{"error": "not found"}')
                outer.bodies.append(body)
                outer.headers.append(dict(self.headers))
                user = body["messages"][1]["content"]
                if "FLAKY" in user and user not in outer.flaky_seen:
                    outer.flaky_seen.add(user)
                    return self._send(500, b'{"error": "overloaded"}')
                if "BADBODY" in user:
                    return self._send(200, b"<html>gateway</html>")
                text = GOOD
                if "MALFORMED" in user or ("ONCEBAD" in user and user not in outer.oncebad_seen):
                    outer.oncebad_seen.add(user)
                    text = "I cannot evaluate this."
                elif "PARTIAL" in user:
                    text = GOOD.split("\n4.")[0]
                elif "BADSCORE" in user:
                    text = GOOD.replace("Temporal Description: 3", "Temporal Description: .")
                elif "MARKDOWN" in user:
                    text = MARKDOWN
                payload = {"id": "x", "object": "chat.completion",
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
                self._send(200, json.dumps(payload).encode())

            def _send(self, code, data):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def _client(server, cache, **kw):
    cfg = judge.JudgeConfig(base_url=server.url, model="judge-x", api_key="sk-test", backoff=0.0, workers=2, **kw)
    return judge.JudgeClient(cfg, cache, sleep=lambda s: None)


def test_parse_scores():
    s, p = judge.parse_scores(GOOD)
    assert s == dict(zip(judge.DIMENSIONS, (5.0, 4.0, 3.0, 2.0))) and p is None
    assert judge.parse_scores(MARKDOWN) == (s, None)
    s, p = judge.parse_scores("1. Subject Correspondence: 4")
    assert s == {"Subject Correspondence": 4.0} and "Hallucination Detection" in p
    s, p = judge.parse_scores(GOOD.replace(": 3", ": ."))
    assert s == {} and "not a number" in p


def test_judge_scores_retries_and_cache(server, tmp_path):
    rows = [{"id": f"d{i}", "caption": f"A brown dog runs. {i}", "pred": pred} for i, pred in enumerate(
        ["A dog runs.", "FLAKY dog", "MALFORMED", "PARTIAL", "BADSCORE", "MARKDOWN dog", "Another dog."])]
    cache = str(tmp_path / "cache.jsonl")
    client = _client(server, cache)
    rep = bench_d.score_judge(rows, client)
    # 7 items, one 500 retried once
    assert server.requests == 8 and client.requests == 8
    body = server.bodies[0]
    assert body["model"] == "judge-x" and body["temperature"] == 0.0
    assert body["messages"][0] == {"role": "system", "content": judge.SYSTEM_PROMPT}
    assert server.headers[0]["Authorization"] == "Bearer sk-test"
    users = {b["messages"][1]["content"] for b in server.bodies}
    assert "##Correct answer: A brown dog runs. 0\n##Predicted answer: A dog runs.\n" in users
    # d0, d1, d5, d6 complete; d3 has three dimensions; d2 and d4 none
    assert rep["n"] == {"Subject Correspondence": 5, "Appearance Description": 5, "Temporal Description": 5,
                        "Hallucination Detection": 4}
    assert rep["means"] == {"Subject Correspondence": 5.0, "Appearance Description": 4.0,
                            "Temporal Description": 3.0, "Hallucination Detection": 2.0}
    assert rep["average"] == pytest.approx(3.5)
    assert sorted(u["id"] for u in rep["unparsed"]) == ["d2", "d3", "d4"]
    assert all(u["reply"] for u in rep["unparsed"])
    print("judge requests:", server.requests, "unparsed:", [(u["id"], u["reason"]) for u in rep["unparsed"]])

    before = server.requests
    client2 = _client(server, cache)  # a new run reading the same cache: only the unparsed 3 are asked again
    rep2 = bench_d.score_judge(rows, client2)
    assert server.requests == before + 3 and client2.requests == 3
    assert rep2["means"] == rep["means"] and rep2["unparsed"] == rep["unparsed"]
    keys = [json.loads(line)["key"] for line in open(cache)]
    assert len(keys) == 7 + 3 and all(k.startswith("judge-x:") for k in keys)
    # another judge model does not reuse the cache
    client3 = judge.JudgeClient(judge.JudgeConfig(base_url=server.url, model="judge-y", backoff=0.0), cache)
    client3.judge("cap", "A dog")
    assert client3.requests == 1


def test_unparsed_reply_is_retried_next_run_bounded(server, tmp_path):
    """An HTTP-200 reply without the four scores is not final: the next run asks again (and keeps a
    good answer), up to `unparsed_attempts` requests in all; the item stays listed meanwhile."""
    cache = str(tmp_path / "c.jsonl")
    rows = [{"id": "ok", "caption": "c", "pred": "fine"}, {"id": "bad", "caption": "c", "pred": "MALFORMED"},
            {"id": "once", "caption": "c", "pred": "ONCEBAD"}]
    runs = []
    for _ in range(4):
        client = _client(server, cache, unparsed_attempts=3)
        rep = bench_d.score_judge(rows, client)
        runs.append((client.requests, [u["id"] for u in rep["unparsed"]]))
    # run 1: all three asked; run 2: bad and once again (once now parses); run 3: bad a third time;
    # run 4: bad has used its 3 attempts, its last reply stands and is still listed
    assert runs == [(3, ["bad", "once"]), (2, ["bad"]), (1, ["bad"]), (0, ["bad"])]
    assert rep["unparsed"][0]["reply"] == "I cannot evaluate this."
    assert rep["n"]["Subject Correspondence"] == 2  # ok and once
    rows_on_disk = [json.loads(line) for line in open(cache)]
    assert [r["parsed"] for r in rows_on_disk].count(True) == 2 and len(rows_on_disk) == 6
    # a cache written before the rule (no "parsed" field) is judged by its reply the same way
    legacy = tmp_path / "legacy.jsonl"
    legacy.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "parsed"}) + "\n"
                              for r in rows_on_disk[:5]))  # runs 1 and 2
    client = _client(server, str(legacy), unparsed_attempts=3)
    bench_d.score_judge(rows, client)
    assert client.requests == 1  # bad: its third attempt; once and ok come from the cache


def test_judge_config_repr_masks_api_key():
    cfg = judge.JudgeConfig(base_url="http://h/v1", model="m", api_key="sk-secret-123")
    assert "sk-secret-123" not in repr(cfg) and "api_key='***'" in repr(cfg) and "sk-secret" not in str(cfg)
    assert "api_key=None" in repr(judge.JudgeConfig(base_url="http://h/v1", model="m"))


def test_unusable_endpoint_reply_is_listed_not_dropped(server, tmp_path):
    client = _client(server, str(tmp_path / "c.jsonl"), retries=2)
    rows = [{"id": "ok", "caption": "c", "pred": "fine"}, {"id": "bad", "caption": "c", "pred": "BADBODY"}]
    rep = bench_d.score_judge(rows, client)
    assert server.requests == 1 + 3  # the bad one: first try + 2 retries
    assert [u["id"] for u in rep["unparsed"]] == ["bad"] and rep["unparsed"][0]["reply"] is None
    assert "no reply after 3 attempts" in rep["unparsed"][0]["reason"]
    assert rep["means"]["Subject Correspondence"] == 5.0 and rep["items"] == 2
    assert [json.loads(line)["reply"] for line in open(tmp_path / "c.jsonl")] == [GOOD]  # failures not cached


def test_http_errors(server):
    cfg = judge.JudgeConfig(base_url="http://127.0.0.1:1/v1", model="m", retries=1, backoff=0.0, timeout=2)
    with pytest.raises(judge.JudgeError, match="2 attempts"):
        judge.JudgeClient(cfg, sleep=lambda s: None).complete([{"role": "user", "content": "x"}])
    cfg = judge.JudgeConfig(base_url=server.url + "/nothing", model="m", retries=3, backoff=0.0)
    with pytest.raises(judge.JudgeError, match="HTTP 404"):  # a client error is not retried
        judge.JudgeClient(cfg, sleep=lambda s: None).complete([{"role": "user", "content": "x"}])
    assert server.requests == 1
    assert judge.JudgeConfig(base_url="http://h/v1/chat/completions", model="m").url == "http://h/v1/chat/completions"


def _synthetic_bench_d(root):
    entries = make_bench(root, n=4)
    attrs = [{"colour": "red", "shape": "circle", "motion": "left"},
             {"colour": "blue", "shape": "square", "motion": "up"}]
    out = []
    for i, e in enumerate(entries):
        out.append({"id": f"vid_{i}_d", "video": e["video"], "caption": f"caption {i}", "frame_idx": 3,
                    "annotation": e["annotation"][:1], "attributes": attrs[i % 2]})
    return out


def test_attribute_scoring(tmp_path):
    media = str(tmp_path / "media")
    entries = _synthetic_bench_d(media)
    items = bench_d.load(entries, "single")
    preds = {"vid_0_d": "A red circle that moves left slowly.", "vid_1_d": "A green square moving up.",
             "vid_2_d": "A red or blue circle.", "vid_3_d": "A blue square that moves up."}
    fake = FakePredictor(preds)
    bench_d.run(items, fake, str(tmp_path / "d.jsonl"), media_root=media, batch_size=3)
    assert fake.calls == [3, 1]
    rows = runner.read_predictions(str(tmp_path / "d.jsonl"))
    rep = bench_d.score_attributes(rows, items)
    want = attribute_score.score_descriptions([preds[e["id"]] for e in entries], entries)
    for k in ("colour", "shape", "motion", "score"):
        assert rep[k] == pytest.approx(want[k])
    assert rep["n"] == 4 and rep["colour"] == pytest.approx(0.5)
    assert bench_d.score_attributes(rows)["score"] == pytest.approx(want["score"])  # rows carry attributes


def test_cli_bench_d(server, tmp_path, monkeypatch, capsys):
    media = str(tmp_path / "media")
    entries = _synthetic_bench_d(media)
    data = tmp_path / "bench_d.json"
    data.write_text(json.dumps(entries))
    monkeypatch.setattr(cli, "load_predictor", lambda args: FakePredictor({"vid_1_d": "MALFORMED"}))
    out = str(tmp_path / "bd.jsonl")
    assert cli.main(["bench-d", "--checkpoint", "c", "--data", str(data), "--media_root", media, "--out", out]) == 0
    rep = json.load(open(tmp_path / "bd.score.json"))
    assert rep["scorer"] == "attributes" and rep["n"] == 4
    monkeypatch.setenv(judge.ENV_BASE_URL, server.url)
    monkeypatch.setenv(judge.ENV_MODEL, "env-judge")
    monkeypatch.setenv(judge.ENV_KEY, "sk-env")
    capsys.readouterr()
    assert cli.main(["score", "--benchmark", "bench-d", "--out", out, "--scorer", "judge", "--data", str(data)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["judge_model"] == "env-judge" and [u["id"] for u in rep["unparsed"]] == ["vid_1_d"]
    assert rep["means"]["Appearance Description"] == 4.0 and server.headers[0]["Authorization"] == "Bearer sk-env"
    assert os.path.exists(tmp_path / "bd.judge_cache.jsonl")


def test_synthetic_bench_d_ground_truth_scores_one(tmp_path):
    root = str(tmp_path / "syn")
    dataset.generate(root, seed=2, train_videos=0, eval_videos=3, tokenizer=False,
                       cfg=scene.SynthConfig(num_frames=6, size=32))
    items = bench_d.load(os.path.join(root, "bench_d.json"), "multi")
    truth = {s.sample_id: s.extra["caption"] for s in items}
    bench_d.run(items, FakePredictor(truth), str(tmp_path / "d.jsonl"), media_root=root)
    rep = bench_d.score_attributes(runner.read_predictions(str(tmp_path / "d.jsonl")), items)
    assert rep["n"] == 3 and rep["score"] == 1.0


def test_cli_bench_d_without_judge_leaves_predictions_unscored(tmp_path, monkeypatch):
    media = str(tmp_path / "media")
    entries = [{k: v for k, v in e.items() if k != "attributes"} for e in _synthetic_bench_d(media)]
    data = tmp_path / "bench_d.json"
    data.write_text(json.dumps(entries))
    for var in (judge.ENV_BASE_URL, judge.ENV_MODEL, judge.ENV_KEY):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(cli, "load_predictor", lambda args: FakePredictor())
    out = str(tmp_path / "bd.jsonl")
    assert cli.main(["bench-d", "--checkpoint", "c", "--data", str(data), "--media_root", media, "--out", out,
                     "--mode", "multi"]) == 0
    assert len(runner.read_rows(out)) == 4 and not os.path.exists(tmp_path / "bd.score.json")
