"""Benchmark evaluation: VideoRefer-Bench-Q / -D and general video MCQA (MVBench, VideoMME,
Perception Test), with resumable sharded predictions and the official scoring rules.

Modules: `runner` (sharding, batching, JSONL predictions, the `AnswerSource` protocol), `bench_q`,
`bench_d`, `judge` (OpenAI-compatible LLM judge), `mvbench`, `videomme`, `perception_test` (with their shared
`mcqa` pieces), `cli` (`vrefer-eval`).
"""
