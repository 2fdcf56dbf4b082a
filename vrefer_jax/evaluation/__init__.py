"""Benchmark evaluation: VideoRefer-Bench-Q / -D, general video MCQA (MVBench, VideoMME,
Perception Test) and VRVL3's region benchmarks (LVIS, PACO, VG, HC-STVG, DLC-Bench, Ref-L4), with
resumable sharded predictions and the official scoring rules.

Modules: `runner` (sharding, batching, JSONL predictions, the `AnswerSource` protocol), `bench_q`,
`bench_d`, `judge` (OpenAI-compatible LLM judge), `mvbench`, `videomme`, `perception_test` (with their shared
`mcqa` pieces), `category` (LVIS / PACO), `captioning` (VG / HC-STVG), `dlc_bench`, `ref_l4`, `cli`
(`vrefer-eval`).
"""
