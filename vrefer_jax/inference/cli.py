"""`vrefer-infer`: ask VideoRefer about objects in a video or image.

    vrefer-infer --checkpoint CKPT --video clip.mp4 --question "What is <region> doing?" \\
        --mask obj.png --frame 12                                   # single-frame object
    vrefer-infer --checkpoint CKPT --video frames/ --question "Compare <region> and <region>." \\
        --box 10,20,60,90 --mask "0=a0.png;8=a8.png;16=a16.png"     # 2nd object on 3 frames
    vrefer-infer --checkpoint CKPT --requests reqs.jsonl --output answers.jsonl --batch-size 4

Objects (`--mask PNG`, `--rle JSON`, `--box x0,y0,x1,y1`; repeatable, in `<region>` order) sit on
`--frame`, or on several frames with `"F=VALUE;F=VALUE"` (multi-frame mode). Request lines follow
`vrefer_jax.inference.requests`. (`python -m vrefer_jax.inference.cli ...` without the console script.)
"""

from __future__ import annotations

import argparse
import json
import sys


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
    b.add_argument("--requests", help="JSONL file of requests (see vrefer_jax/inference/requests.py)")
    b.add_argument("--output", help="JSONL answers (default: stdout)")
    b.add_argument("--media-root", default="", help="folder that relative media / mask paths start from")
    b.add_argument("--batch-size", type=int, default=1)
    g = p.add_argument_group("generation (default: official mm_infer: greedy + generation_config.json)")
    g.add_argument("--num-frames", "--num_frames", type=int, default=16,
                   help="frames sampled per video (16 as trained; the released Bench scripts use 8)")
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


def main(argv: list[str] | None = None, predictor=None) -> int:
    """Run the CLI. `predictor` (a `Predictor`) skips loading `--checkpoint` (tests, notebooks)."""
    a = build_parser().parse_args(argv)
    from vrefer_jax.inference import requests as req_lib

    if a.requests:
        if a.video or a.image or a.question or a.objects:
            print("vrefer-infer: --requests excludes --video/--image/--question/objects", file=sys.stderr)
            return 2
        reqs = req_lib.read_requests(a.requests)
    else:
        if not (a.video or a.image) or not a.question:
            print("vrefer-infer: give --video or --image and --question (or --requests)", file=sys.stderr)
            return 2
        reqs = [{"id": a.id, "video": a.video, "image": a.image, "question": a.question, "frame": a.frame,
                 "objects": a.objects}]
    ok, bad = req_lib.samples_from_requests(reqs, a.media_root, a.bench_q_style)
    if not a.requests and bad:
        print(f"vrefer-infer: {bad[0][1]}", file=sys.stderr)
        return 2

    if predictor is None:
        from vrefer_jax.inference.predictor import Predictor

        predictor = Predictor.load(a.checkpoint, a.tokenizer, vision_tower=a.vision_tower,
                                   use_stored_vision_tower=a.use_stored_vision_tower, dtype=a.dtype,
                                   num_frames=a.num_frames, aspect=a.aspect)
    else:
        predictor.configure(a.num_frames, a.aspect)
    gen = _generation(predictor, a)

    from data_pipeline import schema

    results: dict[int, dict] = {i: {"id": reqs[i].get("id", f"#{i}"), "error": msg} for i, msg in bad}
    prepared, where = [], []
    for i, s in ok:
        try:
            prepared.append(predictor.prepare(s, a.media_root))
            where.append((i, s))
        except schema.SampleError as e:  # unreadable media, frame out of range, mask size mismatch...
            if not a.requests:
                print(f"vrefer-infer: {e}", file=sys.stderr)
                return 2
            results[i] = {"id": s.sample_id, "error": str(e)}
            bad.append((i, str(e)))
    if prepared:
        answers = predictor.answer_prepared(prepared, gen, batch_size=a.batch_size)
        for (i, s), ans in zip(where, answers):
            results[i] = {"id": s.sample_id, "question": s.extra.get("question"), "answer": ans}
    if not a.requests:
        print(results[0]["answer"])
        return 0
    out = open(a.output, "w", encoding="utf-8") if a.output else sys.stdout
    try:
        for i in range(len(reqs)):
            out.write(json.dumps(results[i], ensure_ascii=False) + "\n")
    finally:
        if a.output:
            out.close()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
