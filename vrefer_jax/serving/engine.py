"""The batching engine: one thread owns the device and decodes queued jobs together.

Jobs arrive prepared and checked (`requests.Preparer`), so nothing in a batch can fail for one
row's sake. The loop: wait for a job; give later ones `batch_window_ms` from the first one's arrival
to join (or until `max_batch_size` wait); group what is queued by (the family host's `group_key`,
the generation settings without `max_new_tokens` / greedy's seed), oldest group first; decode each
group in batches of at most `max_batch_size` rows with `Predictor.stream_batch`, reading the tokens
every `stream_chunk` steps. After every chunk each row's new text goes to its job (`Delta`), and a
row that emitted EOS, reached its own `max_new_tokens`, was cancelled (client gone) or passed its
deadline is finished there; the batch stops as soon as every row is finished.

Why settings split batches: greedy / sampling, temperature, top-k / top-p and the repetition
penalty are static arguments of the compiled decode loop (`GenerationConfig.static`), one program
per value, so rows with different settings cannot share a program. `max_new_tokens` does not split
them: the batch decodes to the largest of its rows (a power of two >= 16, at most the server's
limit) and each row's answer is cut at its own. Sampled rows share one key per batch (the first
row's seed); a sampled answer depends on its row in the batch, so a seed reproduces it only when
the same requests batch the same way. Greedy answers equal the offline `Predictor`'s.

Rows are padded up to a power of two (the mesh's row shards divide them), so a server compiles
one program per (bucket, settings, row count, max_new_tokens bucket) and reuses it.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from vrefer_jax.inference.sampling import GenerationConfig
from vrefer_jax.inference.videorefer_host import next_pow2
from vrefer_jax.serving.config import ServeConfig
from vrefer_jax.serving.metrics import Metrics
from vrefer_jax.serving.text_stream import TextStream

log = logging.getLogger(__name__)

MIN_DECODE_BUFFER = 16  # smallest max_new_tokens a batch compiles for


@dataclasses.dataclass(frozen=True)
class Delta:
    text: str


@dataclasses.dataclass(frozen=True)
class Finished:
    text: str
    finish_reason: str  # "stop" (EOS) or "length" (max_new_tokens)
    completion_tokens: int
    prompt_tokens: int


@dataclasses.dataclass(frozen=True)
class Failed:
    status: int
    code: str
    message: str


Event = Delta | Finished | Failed


class QueueFull(Exception):
    pass


class Closed(Exception):
    pass


@dataclasses.dataclass
class Job:
    """One request in the engine. `emit` is called from the engine thread with each `Event`, the
    last one a `Finished` or `Failed` (exactly one of them, unless the job was cancelled)."""

    rid: str
    prepared: Any
    gen: GenerationConfig
    deadline: float  # time.monotonic()
    emit: Callable[[Event], None]
    prompt_tokens: int = 0
    arrived: float = dataclasses.field(default_factory=time.monotonic)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)


def settings_key(gen: GenerationConfig) -> GenerationConfig:
    """The part of a request's settings that shapes the decode program (rows sharing it batch
    together): greedy ignores temperature / top-k / top-p / seed, so they are normalised away."""
    g = gen.replace(max_new_tokens=1, return_scores=False)
    return g.replace(temperature=1.0, top_k=0, top_p=1.0, seed=0) if not g.do_sample else g


class Engine:
    def __init__(self, predictor, cfg: ServeConfig, metrics: Metrics | None = None):
        self.predictor, self.cfg = predictor, cfg
        self.metrics = metrics or Metrics(cfg.max_batch_size)
        self.metrics.queue_depth = lambda: len(self._queue)
        self._queue: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="vrefer-engine", daemon=True)
        self.busy = False  # a batch is decoding

    # ------------------------------------------------------------------ control

    def start(self) -> Engine:
        self._thread.start()
        return self

    def submit(self, job: Job) -> None:
        """Queue a job; raises `Closed` while shutting down, `QueueFull` past `max_queue`."""
        with self._cv:
            if not self._accepting:
                raise Closed("the server is shutting down")
            if len(self._queue) >= self.cfg.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting (max_queue {self.cfg.max_queue})")
            self._queue.append(job)
            self._cv.notify_all()

    def stop(self, timeout: float | None = None) -> bool:
        """Refuse new jobs, finish every queued and running one, stop the thread. True when it ended
        within `timeout`."""
        with self._cv:
            self._accepting = False
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def warmup(self, prepared: Any, gen: GenerationConfig) -> list[int]:
        """Compile before serving: one batch of `prepared` (a prepared request) at every row count a
        batch can be padded to (1, 2, 4, ... max_batch_size), with `gen`'s settings and decode
        buffer. Call before `start`. Not counted in the metrics. -> the row counts run."""
        counts = sorted({min(next_pow2(n), self.cfg.max_batch_size) for n in range(1, self.cfg.max_batch_size + 1)})
        metrics, self.metrics = self.metrics, Metrics(self.cfg.max_batch_size)
        try:
            for n in counts:
                jobs = [Job(f"warmup-{n}-{i}", prepared, gen, float("inf"), lambda ev: None) for i in range(n)]
                self._run_batch(jobs, settings_key(gen))
        finally:
            self.metrics = metrics
        return counts

    @property
    def accepting(self) -> bool:
        return self._accepting

    def pending(self) -> int:
        return len(self._queue) + (1 if self.busy else 0)

    # ------------------------------------------------------------------ loop

    def _take(self) -> list[Job] | None:
        """Block for work; after the batching window, every queued job (None: stop)."""
        with self._cv:
            while not self._queue:
                if self._stopping:
                    return None
                self._cv.wait()
            window = self.cfg.batch_window_ms / 1000.0
            while not self._stopping and len(self._queue) < self.cfg.max_batch_size:
                left = self._queue[0].arrived + window - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            jobs = list(self._queue)
            self._queue.clear()
            self.busy = True
            return jobs

    def _run(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            try:
                groups: dict[Any, list[Job]] = {}
                for j in jobs:  # dict order = the oldest job of each group first
                    groups.setdefault((self.predictor.host.group_key(j.prepared), settings_key(j.gen)), []).append(j)
                for key, group in groups.items():
                    for s in range(0, len(group), self.cfg.max_batch_size):
                        self._run_batch(group[s:s + self.cfg.max_batch_size], key[1])
            finally:
                with self._cv:
                    self.busy = False

    def _finish(self, job: Job, event: Event, outcome: str) -> None:
        self.metrics.request_done(outcome, time.monotonic() - job.arrived if outcome == "ok" else None)
        job.emit(event)

    def _run_batch(self, jobs: list[Job], key: GenerationConfig) -> None:
        now = time.monotonic()
        live = []
        for j in jobs:
            if j.cancelled.is_set():
                self.metrics.request_done("cancelled")
            elif now > j.deadline:
                self._finish(j, Failed(504, "timeout", f"request {j.rid!r} timed out waiting for a batch"), "timeout")
            else:
                live.append(j)
        if not live:
            return
        pred = self.predictor
        rows = min(next_pow2(len(live)), max(self.cfg.max_batch_size, len(live)))
        N = min(next_pow2(max(j.gen.max_new_tokens for j in live), MIN_DECODE_BUFFER), self.cfg.max_new_tokens)
        N = max(N, max(j.gen.max_new_tokens for j in live))
        gen = key.replace(max_new_tokens=N, seed=live[0].gen.seed, eos_token_ids=live[0].gen.eos_token_ids,
                          pad_token_id=live[0].gen.pad_token_id)
        streams = [TextStream(pred.tokenizer) for _ in live]
        finished = [False] * len(live)
        delivered = 0
        try:
            batch, out_len = pred.make_batch([j.prepared for j in live], batch_size=rows)
            ids = [j.rid for j in live]
            ids += [ids[0]] * (batch["input_ids"].shape[0] - len(ids))
            stream = pred.stream_batch(batch, out_len, gen, chunk=self.cfg.stream_chunk, sample_ids=ids)
            try:
                for step in stream:
                    now = time.monotonic()
                    last = step.steps >= N
                    for i, j in enumerate(live):
                        if finished[i]:
                            continue
                        limit = j.gen.max_new_tokens
                        n = min(int(step.lengths[i]), limit)
                        toks = step.tokens[i, :n]
                        eos = bool(step.done[i]) and int(step.lengths[i]) <= limit
                        if j.cancelled.is_set():
                            finished[i] = True
                            self.metrics.request_done("cancelled")
                        elif eos or n >= limit or last:
                            rest, text = streams[i].finish(toks)
                            if rest:
                                j.emit(Delta(rest))
                            delivered += n
                            finished[i] = True
                            self._finish(j, Finished(text, "stop" if eos else "length", n, j.prompt_tokens), "ok")
                        elif now > j.deadline:
                            finished[i] = True
                            self._finish(j, Failed(504, "timeout", f"request {j.rid!r} timed out after {n} tokens"),
                                         "timeout")
                        else:
                            delta = streams[i].update(toks)
                            if delta:
                                j.emit(Delta(delta))
                    if all(finished):
                        break
            finally:
                stream.close()
        except Exception as e:  # noqa: BLE001 - a device / program failure fails this batch, not the server
            log.exception("batch of %s failed", [j.rid for j in live])
            for i, j in enumerate(live):
                if not finished[i]:
                    self._finish(j, Failed(500, "internal_error", f"{type(e).__name__}: {e}"), "error")
            return
        self.metrics.batch_done(len(live), delivered, sum(j.prompt_tokens for j in live))
