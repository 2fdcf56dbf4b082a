"""LLM judge through any OpenAI-compatible chat endpoint: the client (`JudgeClient.ask`, shared by
Bench-D, DLC-Bench and Ref-L4 CLAIR) and Bench-D's rubric, parsing and aggregation.

Rubric (reference §5.2; official `videorefer/eval/videorefer_bench_d/system.txt`, here in our own
words): four dimensions scored with an integer 0-5 each, answered as numbered lines
`1. Subject Correspondence: 5` followed by an explanation. The user message is the official one:
`##Correct answer: {caption}\\n##Predicted answer: {pred}\\n`. To reproduce the official judge
text exactly, pass the official `system.txt` as `JudgeConfig.system_prompt`.

Differences from the official scripts, on purpose: temperature 0 (official 0.7, so scores were
not reproducible), a JSONL cache keyed by (model, hash of messages and sampling settings), retries
with exponential backoff, and every item whose reply is missing or unreadable is listed
(`2.extract_re.py` drops them silently). Only replies that parse are final in the cache: one that
does not (HTTP 200, but no four scores) is recorded as an attempt and asked again on the next run,
up to `JudgeConfig.unparsed_attempts` times in all, then its last reply stands (still listed).

Extraction follows `2.extract_re.py`: every match of "number, dot, whitespace, lazily-matched
name, colon, whitespace, number" becomes `{name: float(score)}`; a score that is not a number
spoils the whole item, as there. We also strip markdown emphasis (`**Name**`) from names, which
the official regex would keep (and then miss the dimension). Aggregation follows
`3.analyze_score.py`: each dimension's mean over the items that have it; overall = mean of the
four means.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any

DIMENSIONS = ("Subject Correspondence", "Appearance Description", "Temporal Description", "Hallucination Detection")

SYSTEM_PROMPT = """\
You are an expert evaluator of object-level video descriptions. You will be given a correct \
(reference) description of one object in a video and a predicted description of the same object. \
Judge how factually consistent the prediction is with the reference along four dimensions:
1. Subject Correspondence: does the predicted description refer to the same subject as the reference?
2. Appearance Description: are the appearance details right (colour, shape, size, texture and other visual \
attributes)?
3. Temporal Description: does the described motion and behaviour of the object over time agree with the \
movements in the reference?
4. Hallucination Detection: does the prediction avoid facts, actions or elements that are not really there \
(imagined content, wrong inferences)? Fewer hallucinations earn a higher score.
Give each dimension an integer score from 0 to 5 (5 = a perfect match, 0 = no relevance at all) and a short \
explanation of the score.
Answer in exactly this format:
1. Subject Correspondence: <score>
Explanation: <text>
2. Appearance Description: <score>
Explanation: <text>
3. Temporal Description: <score>
Explanation: <text>
4. Hallucination Detection: <score>
Explanation: <text>"""

ENV_BASE_URL, ENV_MODEL, ENV_KEY = "VREFER_JUDGE_BASE_URL", "VREFER_JUDGE_MODEL", "OPENAI_API_KEY"
_SCORE_LINE = re.compile(r"\d+\.\s+(.*?):\s+([\d.]+)")  # as `2.extract_re.py`
_RETRY_STATUS = {408, 409, 425, 429}


def user_message(caption: str, pred: str) -> str:
    return "##Correct answer: " + caption + "\n" + "##Predicted answer: " + pred + "\n"


class JudgeError(RuntimeError):
    """The endpoint gave no usable reply (after the retries, or a non-retryable HTTP error)."""


@dataclasses.dataclass(frozen=True, repr=False)
class JudgeConfig:
    """Endpoint and sampling. `base_url` is the API root (`.../v1`; `/chat/completions` is added
    unless already there). `backoff` seconds doubles per retry, capped at `max_backoff`.
    `unparsed_attempts`: how many requests, over all runs sharing a cache, an item whose reply
    cannot be parsed gets before its last reply is kept as final. The repr masks `api_key`."""

    base_url: str
    model: str
    api_key: str | None = None
    temperature: float = 0.0
    max_tokens: int = 800
    timeout: float = 120.0
    retries: int = 5
    backoff: float = 2.0
    max_backoff: float = 60.0
    workers: int = 4
    system_prompt: str = SYSTEM_PROMPT
    unparsed_attempts: int = 3

    def __repr__(self) -> str:
        def shown(name: str) -> str:
            value = getattr(self, name)
            return "'***'" if name == "api_key" and value else repr(value)

        fields = ", ".join(f"{f.name}={shown(f.name)}" for f in dataclasses.fields(self))
        return f"{type(self).__name__}({fields})"

    @classmethod
    def from_env(cls, **overrides) -> JudgeConfig:
        """VREFER_JUDGE_BASE_URL / VREFER_JUDGE_MODEL / OPENAI_API_KEY, then non-None overrides."""
        kw: dict[str, Any] = {"base_url": os.environ.get(ENV_BASE_URL, "https://api.openai.com/v1"),
                              "model": os.environ.get(ENV_MODEL, "gpt-4o"),
                              "api_key": os.environ.get(ENV_KEY)}
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)

    @property
    def url(self) -> str:
        u = self.base_url.rstrip("/")
        return u if u.endswith("/chat/completions") else u + "/chat/completions"


def _parses(reply: str) -> bool:
    return parse_scores(reply)[1] is None


class JudgeClient:
    """Chat completions over urllib with retries and a JSONL cache (thread-safe), for any scorer.

    `ask(messages, accept, attempts)` is the general entry point (Bench-D's `judge`, DLC-Bench and
    CLAIR use it): `requests` counts HTTP attempts made (cache hits make none). A cached reply is
    final only if `accept(reply)` (default: Bench-D's four scores); every other reply is appended
    with `"parsed": false` and counts as one attempt, so that later calls (this run or later runs
    sharing the cache) ask again until `attempts` (default `cfg.unparsed_attempts`) requests were
    made; then the last reply stands. Acceptance is evaluated when a reply is looked up, so caches
    written before this rule, or shared between scorers, are handled the same way."""

    def __init__(self, cfg: JudgeConfig, cache_path: str | None = None, sleep: Callable[[float], None] = time.sleep,
                 accept: Callable[[str], bool] = _parses):
        self.cfg, self.cache_path, self._sleep, self._accept = cfg, cache_path, sleep, accept
        self._lock = threading.Lock()
        self.requests = 0
        self._replies: dict[str, list[str]] = {}  # key -> every reply received, in order
        if cache_path and os.path.exists(cache_path):
            with open(cache_path, encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                        key, reply = row["key"], row["reply"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a line cut short by a killed run
                    if isinstance(key, str) and isinstance(reply, str):
                        self._replies.setdefault(key, []).append(reply)

    # -- requests

    def messages(self, caption: str, pred: str) -> list[dict[str, str]]:
        """Bench-D's messages: the rubric as system prompt, reference and prediction as user turn."""
        return [{"role": "system", "content": self.cfg.system_prompt},
                {"role": "user", "content": user_message(caption, pred)}]

    def cache_key(self, messages: Sequence[Mapping[str, str]]) -> str:
        body = {"messages": list(messages), "temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens}
        digest = hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        return f"{self.cfg.model}:{digest}"

    def complete(self, messages: Sequence[Mapping[str, str]]) -> str:
        """One chat completion's text, retried on network errors, 408/409/425/429/5xx and bodies
        without a text reply."""
        body = json.dumps({"model": self.cfg.model, "messages": list(messages), "temperature": self.cfg.temperature,
                           "max_tokens": self.cfg.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.cfg.api_key:
            headers["Authorization"] = f"Bearer {self.cfg.api_key}"
        last = "no attempt"
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                self._sleep(min(self.cfg.backoff * 2 ** (attempt - 1), self.cfg.max_backoff))
            with self._lock:
                self.requests += 1
            req = urllib.request.Request(self.cfg.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.cfg.timeout) as resp:
                    payload = resp.read()
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {e.read()[:300]!r}"
                if e.code in _RETRY_STATUS or e.code >= 500:
                    continue
                raise JudgeError(last) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = f"{type(e).__name__}: {e}"
                continue
            try:
                text = json.loads(payload)["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                last = f"unexpected response body: {payload[:300]!r}"
                continue
            if isinstance(text, str):
                return text
            last = f"reply content is {type(text).__name__}, not text"
        raise JudgeError(f"no reply after {self.cfg.retries + 1} attempts; last: {last}")

    def ask(self, messages: Sequence[Mapping[str, str]], accept: Callable[[str], bool] | None = None,
            attempts: int | None = None) -> str:
        """The reply to `messages`: the first cached reply that `accept`s, else a new request unless
        `attempts` requests (over all runs sharing the cache) were already made, in which case the
        last reply stands. Raises `JudgeError` when the endpoint gives no reply (not cached)."""
        accept = accept or self._accept
        limit = max(1, self.cfg.unparsed_attempts if attempts is None else attempts)
        key = self.cache_key(messages)
        with self._lock:
            seen = self._replies.get(key, [])
            for reply in seen:
                if accept(reply):
                    return reply
            if len(seen) >= limit:
                return seen[-1]  # bounded: the unparsed reply stands (the scorer lists it)
        reply = self.complete(messages)
        parsed = bool(accept(reply))
        with self._lock:
            self._replies.setdefault(key, []).append(reply)
            if self.cache_path:
                os.makedirs(os.path.dirname(os.path.abspath(self.cache_path)), exist_ok=True)
                with open(self.cache_path, "a", encoding="utf-8") as f:
                    row = {"key": key, "model": self.cfg.model, "reply": reply, "parsed": parsed}
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
        return reply

    def judge(self, caption: str, pred: str) -> str:
        """Bench-D: the judge's reply for one (reference, prediction) pair, from the cache when present."""
        return self.ask(self.messages(caption, pred))


def map_concurrent(fn: Callable[[Any], Any], items: Sequence[Any], workers: int,
                   log: Callable[[str], None] | None = None, what: str = "judged") -> list[Any]:
    """`[fn(x) for x in items]` on `workers` threads, in order, logging every 50 results."""
    out: list[Any] = []
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as ex:
        for i, res in enumerate(ex.map(fn, items)):
            out.append(res)
            if log and (i + 1) % 50 == 0:
                log(f"{what} {i + 1}/{len(items)}")
    return out


# ----------------------------------------------------------------------------- parsing and aggregation


def parse_scores(reply: str) -> tuple[dict[str, float], str | None]:
    """(`{dimension: score}` for the four dimensions found, problem or None).

    Every `N. name: score` line is read as `2.extract_re.py` does; names are compared after
    stripping markdown `*`, `_`, `#` and spaces. A score that is not a number spoils the item
    (the official script drops it); a missing dimension is a problem too.
    """
    found: dict[str, float] = {}
    for name, value in _SCORE_LINE.findall(reply):
        try:
            v = float(value)
        except ValueError:
            return {}, f"score {value!r} for {name!r} is not a number"
        found[name.strip(" *_#\t")] = v
    scores = {d: found[d] for d in DIMENSIONS if d in found}
    missing = [d for d in DIMENSIONS if d not in scores]
    return scores, (f"missing {', '.join(missing)}" if missing else None)


def judge_items(pairs: Sequence[tuple[str, str, str]], client: JudgeClient,
                log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Judge `(id, caption, pred)` triples concurrently; one dict per triple, in order, with
    `reply` (or None) and `error` (transport failure) or parsed `scores` / `problem`."""

    def one(p):
        sid, caption, pred = p
        try:
            reply = client.judge(caption, pred)
        except JudgeError as e:
            return {"id": sid, "reply": None, "error": str(e)}
        scores, problem = parse_scores(reply)
        return {"id": sid, "reply": reply, "scores": scores, "problem": problem}

    return map_concurrent(one, pairs, client.cfg.workers, log)


def aggregate(judged: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Official aggregation plus the full list of items that could not be scored.

    `means[d]`: mean over items with a score for d (`n[d]` of them); `average`: mean of the four
    means (over the dimensions that have any score). `unparsed`: every item whose reply is
    missing, unreadable or lacks a dimension, with the reason and the reply (never dropped).
    `out_of_range`: scores outside 0-5 (kept in the means, as the official script does).
    """
    sums = {d: 0.0 for d in DIMENSIONS}
    n = {d: 0 for d in DIMENSIONS}
    unparsed, out_of_range = [], []
    for j in judged:
        if j.get("reply") is None:
            unparsed.append({"id": j["id"], "reason": "no judge reply: " + j.get("error", ""), "reply": None})
            continue
        if j.get("problem"):
            unparsed.append({"id": j["id"], "reason": j["problem"], "reply": j["reply"]})
        for d, v in j.get("scores", {}).items():
            sums[d] += v
            n[d] += 1
            if not 0 <= v <= 5:
                out_of_range.append({"id": j["id"], "dimension": d, "score": v})
    means = {d: sums[d] / n[d] for d in DIMENSIONS if n[d]}
    return {"means": means, "n": n, "average": sum(means.values()) / len(means) if means else 0.0,
            "items": len(judged), "unparsed": unparsed, "out_of_range": out_of_range}
