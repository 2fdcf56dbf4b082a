"""Server metrics: counters, batch-size and latency histograms, recent tokens/s.

Thread-safe (the engine thread and the event loop both write). `prometheus()` renders the
Prometheus text format (`/metrics`), `snapshot()` a JSON dict (`/metrics?format=json`, `/health`).
"""

from __future__ import annotations

import collections
import threading
import time

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKENS_PER_S_WINDOW = 60.0  # seconds of history behind the tokens/s gauge


class Metrics:
    def __init__(self, max_batch_size: int):
        self._lock = threading.Lock()
        self.started = time.time()
        self.requests = collections.Counter()  # by outcome: ok, bad_request, timeout, ...
        self.batch_sizes = collections.Counter()  # real rows per batch
        self.batches = 0
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self._recent: collections.deque = collections.deque()  # (time, tokens) of finished batches
        self.max_batch_size = max_batch_size
        self.queue_depth = lambda: 0  # set by the engine
        self.in_flight = 0

    def request_done(self, outcome: str, seconds: float | None = None) -> None:
        with self._lock:
            self.requests[outcome] += 1
            if seconds is not None:
                self.latency_sum += seconds
                i = next((k for k, b in enumerate(LATENCY_BUCKETS) if seconds <= b), len(LATENCY_BUCKETS))
                self.latency[i] += 1

    def batch_done(self, rows: int, new_tokens: int, prompt_tokens: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.batches += 1
            self.batch_sizes[rows] += 1
            self.generated_tokens += new_tokens
            self.prompt_tokens += prompt_tokens
            self._recent.append((now, new_tokens))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._recent and now - self._recent[0][0] > TOKENS_PER_S_WINDOW:
            self._recent.popleft()

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last `TOKENS_PER_S_WINDOW` seconds (or since start)."""
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            total = sum(n for _, n in self._recent)
        span = min(TOKENS_PER_S_WINDOW, time.time() - self.started)
        return total / span if span > 0 else 0.0

    def snapshot(self) -> dict:
        tps = self.tokens_per_second()
        with self._lock:
            return {"queue_depth": self.queue_depth(), "in_flight": self.in_flight,
                    "requests": dict(self.requests), "batches": self.batches,
                    "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                    "generated_tokens": self.generated_tokens, "prompt_tokens": self.prompt_tokens,
                    "tokens_per_second": round(tps, 3), "uptime_s": round(time.time() - self.started, 3)}

    def prometheus(self) -> str:
        s = self.snapshot()
        lines = [
            "# HELP vrefer_queue_depth Requests waiting for a batch.", "# TYPE vrefer_queue_depth gauge",
            f"vrefer_queue_depth {s['queue_depth']}",
            "# HELP vrefer_in_flight Requests accepted and not yet answered.", "# TYPE vrefer_in_flight gauge",
            f"vrefer_in_flight {s['in_flight']}",
            "# HELP vrefer_requests_total Finished requests by outcome.", "# TYPE vrefer_requests_total counter",
            *(f'vrefer_requests_total{{outcome="{k}"}} {v}' for k, v in sorted(s["requests"].items())),
            "# HELP vrefer_generated_tokens_total New tokens delivered.", "# TYPE vrefer_generated_tokens_total counter",
            f"vrefer_generated_tokens_total {s['generated_tokens']}",
            "# HELP vrefer_prompt_tokens_total Prompt tokens of batched rows.",
            "# TYPE vrefer_prompt_tokens_total counter", f"vrefer_prompt_tokens_total {s['prompt_tokens']}",
            f"# HELP vrefer_tokens_per_second Generated tokens/s over the last {TOKENS_PER_S_WINDOW:g} s.",
            "# TYPE vrefer_tokens_per_second gauge", f"vrefer_tokens_per_second {s['tokens_per_second']}",
            "# HELP vrefer_batch_size Real rows per decoded batch.", "# TYPE vrefer_batch_size histogram",
        ]
        with self._lock:
            sizes = dict(self.batch_sizes)
            lat, lat_sum = list(self.latency), self.latency_sum
        cum = 0
        for b in range(1, self.max_batch_size + 1):
            cum += sizes.get(b, 0)
            lines.append(f'vrefer_batch_size_bucket{{le="{b}"}} {cum}')
        lines += [f'vrefer_batch_size_bucket{{le="+Inf"}} {cum}', f"vrefer_batch_size_count {cum}",
                  f"vrefer_batch_size_sum {sum(k * v for k, v in sizes.items())}",
                  "# HELP vrefer_request_seconds Arrival to last token of answered requests.",
                  "# TYPE vrefer_request_seconds histogram"]
        cum = 0
        for b, n in zip(LATENCY_BUCKETS, lat):
            cum += n
            lines.append(f'vrefer_request_seconds_bucket{{le="{b:g}"}} {cum}')
        cum += lat[-1]
        lines += [f'vrefer_request_seconds_bucket{{le="+Inf"}} {cum}', f"vrefer_request_seconds_count {cum}",
                  f"vrefer_request_seconds_sum {lat_sum:.6f}"]
        return "\n".join(lines) + "\n"
