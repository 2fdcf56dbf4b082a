"""Serving: `vrefer-serve` (an HTTP API with dynamic batching and streaming over the `Predictor`) and
the Gradio demo.

    config.py       `ServeConfig` (gin): batching window and size, limits, timeouts
    text_stream.py  token ids -> text deltas whose concatenation is the final answer
    metrics.py      counters and histograms for `/metrics` (Prometheus text) and `/health`
    engine.py       the batching engine: one thread owns the device, groups queued jobs by bucket and
                    generation settings, decodes them together in chunks, streams each row's text
    requests.py     HTTP bodies (pydantic, unknown fields refused) -> validated, prepared jobs
    app.py          the FastAPI app: /v1/chat/completions, /v1/regions/ask, /health, /metrics
    cli.py          `vrefer-serve` (uvicorn; `--demo` mounts the Gradio demo at /demo)
    demo.py         the Gradio demo (upload, pick frames, brush / box per object, chat, streamed answers)
"""
