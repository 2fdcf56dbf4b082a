"""`vrefer-infer`: ask VideoRefer about objects in a video or image.

    vrefer-infer --checkpoint CKPT --video clip.mp4 --question "What is <region> doing?" \\
        --mask obj.png --frame 12                                   # single-frame object
    vrefer-infer --checkpoint CKPT --video frames/ --question "Compare <region> and <region>." \\
        --box 10,20,60,90 --mask "0=a0.png;8=a8.png;16=a16.png"     # 2nd object on 3 frames
    vrefer-infer --checkpoint CKPT --requests reqs.jsonl --output answers.jsonl --batch-size 4

Objects (`--mask PNG`, `--rle JSON`, `--box x0,y0,x1,y1`; repeatable, in `<region>` order) sit on
`--frame`, or on several frames with `"F=VALUE;F=VALUE"` (multi-frame mode). Request lines follow
`vrefer_jax.inference.request_files`. (`python -m vrefer_jax.inference.cli ...` without the console script.)

Strictness. Paths on the command line are yours and used as given. Paths inside a --requests file
(video, image, mask PNG, RLE file) resolve against --media-root (default: the requests file's folder)
and must stay inside it: `../` escapes and absolute paths are refused (media_outside_root) unless
--allow-absolute-paths. Each bad request line (not JSON, not an object, a bad field, unreadable media,
a mask image over --max-image-pixels) becomes one output row {"id", "line", "error", "reason"}
naming the line and the field; the other lines are answered and the exit status is 1. An object
whose masks are all empty is answered with "warnings": ["empty_mask: object K"] in its row (and a
line on stderr). Frames follow the checkpoint's family: VideoRefer-7B samples --num-frames 8, as its
official mm_infer path; VideoRefer-VideoLLaMA3 samples --fps 1 (at most --max-frames 768), as its infer.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from vrefer_jax.inference import request_files as req_lib

# Frames per video of the official `mm_infer` path: DAMO-NLP-SG/VideoRefer `videorefer/constants.py`
# `NUM_FRAMES = 8` is the default of `mm_utils.process_video(..., num_frames=NUM_FRAMES)`, and the
# notebooks and Bench-D/Q scripts that feed `mm_infer` never pass another value (the config's 16 is
# the training value, used by the general benchmarks only).
OFFICIAL_NUM_FRAMES = 8


def _object(kind: str):
    def parse(value: str):
        items = [v for v in value.split(";") if v.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"empty --{kind}")
        if all("=" in v for v in items):
            frames = {}
            for v in items:
                f, spec = v.split("=", 1)
                if not f.strip().isdigit():
                    raise argparse.ArgumentTypeError(f"--{kind} {value!r}: frame {f!r} is not an integer")
                frames[f.strip()] = {kind: spec.strip()}
            return {"frames": frames}
        if len(items) > 1 or "=" in value:
            raise argparse.ArgumentTypeError(f"--{kind} {value!r}: use VALUE or F=VALUE;F=VALUE")
        return {kind: value.strip()}

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vrefer-infer", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    m = p.add_argument_group("model")
    m.add_argument("--checkpoint", required=True, help="Orbax folder (vrefer-convert import) or HF VideoRefer folder")
    m.add_argument("--tokenizer", help="tokenizer folder/file (default: the checkpoint's)")
    m.add_argument("--vision-tower", help="SigLIP folder, for HF checkpoints (as vrefer-convert import)")
    m.add_argument("--use-stored-vision-tower", action="store_true")
    m.add_argument("--dtype", help="compute dtype (default: the checkpoint's model config)")
    m.add_argument("--mesh", help="serve on a device mesh, e.g. 'data=1,fsdp=1,tensor=8' (parameters, KV cache and "
                                   "activations sharded by the logical-axis rules; default: one device)")
    q = p.add_argument_group("one request")
    src = q.add_mutually_exclusive_group()
    src.add_argument("--video", help="video file or frame folder")
    src.add_argument("--image", help="image file")
    q.add_argument("--question", help="text with one <region> per object (or <objectN> tags)")
    q.add_argument("--mask", dest="objects", action="append", type=_object("mask"), default=[],
                   metavar="PNG|F=PNG;F=PNG", help="mask PNG (non-zero = object); repeat per object")
    q.add_argument("--rle", dest="objects", action="append", type=_object("rle"),
                   metavar="JSON|F=JSON;..", help="JSON file with a COCO RLE (or polygon list)")
    q.add_argument("--box", dest="objects", action="append", type=_object("box"),
                   metavar="X0,Y0,X1,Y1|F=X0,Y0,X1,Y1;..", help="x0,y0,x1,y1 in pixels")
    q.add_argument("--frame", type=int, default=0, help="frame of single-frame objects (default 0)")
    q.add_argument("--id", default="request")
    b = p.add_argument_group("batch mode")
    b.add_argument("--requests", help="JSONL file of requests (see vrefer_jax/inference/request_files.py)")
    b.add_argument("--output", help="JSONL answers (default: stdout)")
    b.add_argument("--media-root", "--media_root", default="",
                   help="folder that paths inside --requests lines resolve against, and must stay inside "
                        "(default: the requests file's folder); with one request, the folder that relative "
                        "command-line paths start from (default: the current folder)")
    b.add_argument("--allow-absolute-paths", "--allow_absolute_paths", action="store_true",
                   help="read absolute paths inside --requests lines as they are (refused by default: "
                        "media_outside_root); relative paths must still stay inside --media-root")
    b.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-image-pixels", type=int, default=req_lib.MAX_IMAGE_PIXELS,
                   help=f"largest mask image read, in pixels (default {req_lib.MAX_IMAGE_PIXELS} = 8192x8192); a "
                        "larger one is refused before decoding (image_too_large). Pillow's own limit "
                        "(2 x PIL.Image.MAX_IMAGE_PIXELS) still applies to every image")
    g = p.add_argument_group("generation (default: official mm_infer: greedy + generation_config.json)")
    g.add_argument("--num-frames", "--num_frames", type=int, default=None,
                   help=f"VideoRefer-7B: frames sampled per video (default {OFFICIAL_NUM_FRAMES}, as the official "
                        "mm_infer path: NUM_FRAMES of videorefer/constants.py; 16 as trained and as the general "
                        "video benchmarks)")
    g.add_argument("--fps", type=float, default=None,
                   help="VideoRefer-VideoLLaMA3: frames per second sampled (default 1, as its infer.py; 4 as its "
                        "Bench-D and demo)")
    g.add_argument("--max-frames", "--max_frames", type=int, default=None,
                   help="VideoRefer-VideoLLaMA3: cap on sampled frames (default 768)")
    g.add_argument("--aspect", choices=["square", "pad"], default=None,
                   help="frame/mask aspect handling (default: the checkpoint's image_aspect_ratio)")
    g.add_argument("--bench-q-style", action="store_true", help="rewrite <region> to [<region>] (Bench-Q)")
    g.add_argument("--max-new-tokens", "--max_new_tokens", type=int)
    g.add_argument("--do-sample", action="store_true")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--seed", type=int)
    return p


def _generation(predictor, a):
    over = {k: getattr(a, k) for k in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty",
                                       "seed") if getattr(a, k) is not None}
    if a.do_sample:
        over["do_sample"] = True
    return predictor.generation.replace(**over)


def _fail(message: str) -> int:
    """A user error: one line on stderr, exit status 2."""
    print(f"vrefer-infer: {message}", file=sys.stderr)
    return 2


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def main(argv: list[str] | None = None, predictor=None) -> int:
    """Run the CLI. `predictor` (a `Predictor`) skips loading `--checkpoint` (tests, notebooks)."""
    a = build_parser().parse_args(argv)
    for flag in ("num_frames", "batch_size", "max_image_pixels", "max_frames", "fps"):
        if getattr(a, flag) is not None and getattr(a, flag) <= 0:
            return _fail(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")

    if a.requests:
        if a.video or a.image or a.question or a.objects:
            return _fail("--requests excludes --video/--image/--question/objects")
        try:
            lines = req_lib.read_request_lines(a.requests)
        except (OSError, UnicodeDecodeError) as e:
            return _fail(f"cannot read --requests {a.requests}: {_one_line(e)}")
        where = [w for w, _ in lines]
        reqs = [r for _, r in lines]
        root = a.media_root or os.path.dirname(os.path.abspath(a.requests))
        policy = req_lib.PathPolicy(confine=True, allow_absolute=a.allow_absolute_paths,
                                    max_image_pixels=a.max_image_pixels)
    else:
        if not (a.video or a.image) or not a.question:
            return _fail("give --video or --image and --question (or --requests)")
        reqs = [{"id": a.id, "video": a.video, "image": a.image, "question": a.question, "frame": a.frame,
                 "objects": a.objects}]
        where, root = ["command line"], a.media_root
        # the user's own paths: read where they point
        policy = req_lib.PathPolicy(confine=False, max_image_pixels=a.max_image_pixels)
    ok, bad = req_lib.samples_from_requests(reqs, root, a.bench_q_style, policy)
    if not a.requests and bad:
        return _fail(req_lib.error_text(bad[0][1]))

    out = sys.stdout
    if a.requests and a.output:
        try:  # before the (slow) model load
            out = open(a.output, "w", encoding="utf-8")
        except OSError as e:
            return _fail(f"cannot write --output {a.output}: {_one_line(e)}")
    try:
        return _run(a, predictor, reqs, where, root, ok, bad, out)
    finally:
        if out is not sys.stdout:
            out.close()


def predictor_from_args(a):
    """(Predictor, None) from the loading flags `vrefer-infer` and `vrefer-serve` share (--checkpoint,
    --tokenizer, --vision-tower, --use-stored-vision-tower, --dtype, --mesh), or (None, a one-line
    error naming the flag)."""
    from vrefer_jax.inference.predictor import Predictor
    from vrefer_jax.sharding import MeshConfig, make_mesh

    try:
        mesh = make_mesh(MeshConfig.parse(a.mesh)) if a.mesh else None
    except ValueError as e:
        return None, f"--mesh: {_one_line(e)}"
    try:
        return Predictor.load(a.checkpoint, a.tokenizer, vision_tower=a.vision_tower,
                              use_stored_vision_tower=a.use_stored_vision_tower, dtype=a.dtype, mesh=mesh), None
    except Exception as e:  # noqa: BLE001 - any load failure is one line, not a traceback
        return None, f"cannot load --checkpoint {a.checkpoint}: {_one_line(e)}"


def _run(a, predictor, reqs, where, root, ok, bad, out) -> int:
    from data_pipeline import schema

    if predictor is None:
        predictor, error = predictor_from_args(a)
        if error:
            return _fail(error)
    # the family's official frame sampling (VideoRefer-7B: 8 frames; VRVL3: fps 1), then the flags
    try:
        predictor.configure(**predictor.family.host_options(
            "infer", num_frames=a.num_frames, aspect=a.aspect, fps=a.fps, max_frames=a.max_frames))
    except ValueError as e:
        return _fail(f"--{e}")  # e.g. "--num_frames does not apply to videorefer_videollama3 models ..."
    gen = _generation(predictor, a)

    def row(i: int, **fields) -> dict:
        """An output row: the request's id, where it is ("line": N, or "item": N in a JSON list)."""
        rid = reqs[i].get("id") if isinstance(reqs[i], dict) else None
        head = {"id": str(rid) if rid is not None else f"#{i}"}
        kind, _, num = where[i].partition(" ")
        if num.isdigit():
            head[kind] = int(num)
        return {**head, **fields}

    results: dict[int, dict] = {}

    def fail(i: int, e) -> None:
        message = f"{where[i]}: {req_lib.error_text(e)}" if not isinstance(e, req_lib.BadLine) else e.message
        results[i] = row(i, error=message, reason=getattr(e, "reason", "bad_request"))
        print(f"vrefer-infer: {message}", file=sys.stderr)

    for i, e in bad:
        fail(i, e)
    prepared, done = [], []
    for i, s in ok:
        try:
            prepared.append(predictor.prepare(s, root, allow_absolute=True))  # requests checked the path
            done.append((i, s))
        except (schema.SampleError, ValueError, OSError) as e:  # unreadable media, frame out of range...
            if not a.requests:
                return _fail(str(e))
            fail(i, e)
    for (i, s), p in zip(done, prepared):
        for w in p.warnings:
            print(f"vrefer-infer: warning: {where[i]}, request {s.sample_id!r}: {w}", file=sys.stderr)
    if prepared:
        answers = predictor.answer_prepared(prepared, gen, batch_size=a.batch_size)
        for (i, s), p, ans in zip(done, prepared, answers):
            results[i] = row(i, question=s.extra.get("question"), answer=ans)
            results[i]["id"] = s.sample_id
            if p.warnings:
                results[i]["warnings"] = list(p.warnings)
    if not a.requests:
        print(results[0]["answer"])
        return 0
    for i in range(len(reqs)):
        out.write(json.dumps(results[i], ensure_ascii=False) + "\n")
    return 0 if len(done) == len(reqs) else 1


if __name__ == "__main__":
    sys.exit(main())
