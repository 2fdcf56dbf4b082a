"""`vrefer-serve`: the HTTP API (and optionally the web demo) over one checkpoint.

    vrefer-serve --checkpoint /ckpt/vr7b-jax --media-root /data --port 8000
    vrefer-serve --checkpoint /ckpt/vr7b-jax --mesh data=1,fsdp=1,tensor=8 --gin_file configs/serve/default.gin
    vrefer-serve --checkpoint CKPT --demo [--sam-model /models/sam-vit-base]   # web demo at /demo

Batching, limits and timeouts are `ServeConfig` fields (gin: `--gin_file`, `--gin_bindings
"ServeConfig.max_batch_size = 16"`); `--media-root` / `--upload-dir` / `--allow-absolute-paths`
override the gin values. Frames follow the checkpoint's family as in `vrefer-infer` (VideoRefer-7B
8 frames, VRVL3 fps 1) unless `--num-frames` / `--fps` / `--max-frames` say otherwise. SIGTERM or
Ctrl-C: the listener closes, requests in flight are answered, then the process exits.
Every start-up error (missing checkpoint, bad option, bad gin) is one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import gin

from vrefer_jax.serving.config import ServeConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vrefer-serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    m = p.add_argument_group("model (as vrefer-infer)")
    m.add_argument("--checkpoint", required=True, help="Orbax folder (vrefer-convert import) or HF folder")
    m.add_argument("--tokenizer")
    m.add_argument("--vision-tower")
    m.add_argument("--use-stored-vision-tower", action="store_true")
    m.add_argument("--dtype")
    m.add_argument("--mesh", help="serve on a device mesh, e.g. 'data=1,fsdp=1,tensor=8' (default: one device)")
    m.add_argument("--num-frames", type=int)
    m.add_argument("--fps", type=float)
    m.add_argument("--max-frames", type=int)
    m.add_argument("--aspect", choices=["square", "pad"])
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--model-name", help="the name /v1/models reports (default: the checkpoint folder's name)")
    s.add_argument("--media-root", help="folder request paths resolve under (default: ServeConfig.media_root)")
    s.add_argument("--upload-dir", help="folder for uploaded media (default: a temporary folder)")
    s.add_argument("--allow-absolute-paths", action="store_true", default=None)
    s.add_argument("--gin_file", action="append", default=[], help="gin file binding ServeConfig (repeatable)")
    s.add_argument("--gin_bindings", action="append", default=[], help="gin binding (repeatable)")
    s.add_argument("--warmup", metavar="REQUESTS",
                   help="a request or a list of them (JSON text or a .json file; paths under the media root), "
                        "one per bucket you expect: each is compiled at every batch row count before serving, so "
                        "the first clients do not wait for compiles")
    s.add_argument("--log-level", default="info")
    d = p.add_argument_group("web demo")
    d.add_argument("--demo", action="store_true", help="also serve the Gradio demo at /demo")
    d.add_argument("--sam-model", help="local folder of a transformers SamModel: click-to-mask in the demo")
    return p


def _fail(message: str) -> int:
    print(f"vrefer-serve: {message}", file=sys.stderr)
    return 2


def serve_config(a) -> ServeConfig:
    for path in (os.getcwd(), REPO_ROOT):  # where gin files and their includes are looked up
        gin.add_config_file_search_path(path)
    gin.clear_config()  # this process serves one configuration: the one given here
    gin.parse_config_files_and_bindings(a.gin_file, a.gin_bindings, finalize_config=False)
    cfg = ServeConfig()
    over = {k: v for k, v in (("media_root", a.media_root), ("upload_dir", a.upload_dir),
                              ("allow_absolute_paths", a.allow_absolute_paths)) if v is not None}
    return cfg.replace(**over)


def main(argv: list[str] | None = None, predictor=None, run: bool = True):
    """Parse, load, serve. `predictor` skips loading (tests); `run=False` returns the uvicorn
    `Server` unstarted instead of serving."""
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = serve_config(a)
    except Exception as e:  # noqa: BLE001 - a bad gin file / binding / value: one line
        return _fail(f"configuration: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if predictor is None:
        from vrefer_jax.inference.cli import predictor_from_args

        predictor, error = predictor_from_args(a)
        if error:
            return _fail(error)
    try:
        predictor.configure(**predictor.family.host_options(
            "infer", num_frames=a.num_frames, aspect=a.aspect, fps=a.fps, max_frames=a.max_frames))
    except ValueError as e:
        return _fail(f"--{e}")

    import uvicorn

    from vrefer_jax.serving.app import create_app

    warmup = None
    if a.warmup:
        try:
            text = open(a.warmup, encoding="utf-8").read() if os.path.isfile(a.warmup) else a.warmup
            warmup = json.loads(text)
            if not isinstance(warmup, (dict, list)) or not all(isinstance(r, dict) for r in
                                                                (warmup if isinstance(warmup, list) else [warmup])):
                raise ValueError("expected a JSON object (a request) or a list of them")
        except (OSError, ValueError) as e:
            return _fail(f"--warmup: {e}")
    name = a.model_name or os.path.basename(os.path.normpath(a.checkpoint))
    app = create_app(predictor, cfg, model_name=name, warmup=warmup)
    if a.demo:
        from vrefer_jax.serving import demo

        demo.mount(app, app.state.service, sam_model=a.sam_model)
    server = uvicorn.Server(uvicorn.Config(app, host=a.host, port=a.port, log_level=a.log_level.lower(),
                                           timeout_graceful_shutdown=int(cfg.shutdown_timeout_s)))
    if not run:
        return server
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
