"""`vrefer-data` command line (also `python -m data_pipeline.cli`).

    vrefer-data convert  --json data.json --media-root DIR --out DIR --num-shards N
                         [--shard-range a:b] [--workers W] [--num-frames 16] [--image-size 384]
                         [--format train|bench-q|bench-d] [--bench-mode single|multi] ...
    vrefer-data tfds     --json data.json --media-root DIR --data-dir DIR [--name videorefer_train]
                         [--split train] [--num-frames 16] [--image-size 384] [--format ...]
    vrefer-data validate --json data.json [--format ...]      schema checks only (no media), counts by reason
    vrefer-data inspect  --records DIR [--index i ...]          record count and a summary of records

`convert` prints the merged report's totals and exits 0 when it finished its shard range (skipped
samples are not failures; they are in `<out>/<prefix>.report.json`). `validate` exits 1 when any
sample is invalid (duplicate ids included) unless `--allow-invalid`. An input that cannot be used
at all (unparseable JSON list, missing file, an output folder started from other input) prints one
line to stderr and exits 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections import Counter

from data_pipeline import bench_formats, convert, inputs, records, schema


def _parser_for(fmt: str, bench_mode: str, allow_text_only: bool):
    if fmt == "train":
        return functools.partial(schema.parse_sample, allow_text_only=allow_text_only)
    return functools.partial(bench_formats.PARSERS[fmt], mode=bench_mode)


def _shard_range(text: str | None, num_shards: int) -> tuple[int, int]:
    if not text:
        return 0, num_shards
    a, _, b = text.partition(":")
    return int(a or 0), int(b or num_shards)


def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", required=True,
                   help="sample list: a .json list (one that cannot be parsed stops with the file and position) "
                        "or .jsonl (a line that is not UTF-8 JSON is one bad_json_line skip; the rest is read)")
    p.add_argument("--format", default="train", choices=["train", *bench_formats.PARSERS],
                   help="training JSON (VideoRefer-700K style) or a benchmark file")
    p.add_argument("--bench-mode", default="single", choices=bench_formats.MODES,
                   help="benchmarks: masks at frame_idx only (single) or all annotated frames (multi)")
    p.add_argument("--allow-text-only", action="store_true", help="accept samples without video/image")
    p.add_argument("--allow-absolute-media", action="store_true",
                   help="accept absolute video/image/frame-folder paths in the data and read them as they "
                        "are (default: skip them as media_outside_root); relative paths must stay inside the "
                        "media root either way, so a '../' escape is always skipped")


def cmd_convert(args) -> int:
    cfg = convert.ConvertConfig(
        num_frames=args.num_frames, image_size=args.image_size, aspect=args.aspect,
        image_format=args.image_format, jpeg_quality=args.jpeg_quality, output_format=args.output_format,
        allow_text_only=args.allow_text_only, decode_threads=args.decode_threads,
        allow_absolute_media=args.allow_absolute_media)
    entries = inputs.load_entries(args.json)
    prefix = args.prefix or os.path.splitext(os.path.basename(args.json))[0]
    report = convert.convert(
        entries, args.out, media_root=args.media_root, num_shards=args.num_shards,
        shard_range=_shard_range(args.shard_range, args.num_shards), workers=args.workers, config=cfg,
        parse=_parser_for(args.format, args.bench_mode, args.allow_text_only),
        source=os.path.basename(args.json), prefix=prefix, progress=not args.no_progress)
    summary = {k: report[k] for k in ("written", "num_skipped", "skipped", "shards_done", "shards_missing", "run")}
    print(json.dumps(summary, indent=1))
    return 0


def cmd_tfds(args) -> int:
    from data_pipeline import tfds_data

    cfg = convert.ConvertConfig(
        num_frames=args.num_frames, image_size=args.image_size, aspect=args.aspect,
        image_format=args.image_format, jpeg_quality=args.jpeg_quality, allow_text_only=args.allow_text_only,
        decode_threads=args.decode_threads, allow_absolute_media=args.allow_absolute_media, output_format="array_record")
    name = args.name or {"train": "videorefer_train", "bench-q": "videorefer_bench_q",
                         "bench-d": "videorefer_bench_d"}[args.format]
    if (fmt := tfds_data.BUILDERS[name].FORMAT) != args.format:
        raise inputs.InputError(f"--name {name} reads --format {fmt}, not {args.format}")
    reports = tfds_data.prepare(name, args.data_dir, {args.split: args.json}, media_root=args.media_root, config=cfg,
                                bench_mode=args.bench_mode)
    print(json.dumps({s: {k: r[k] for k in ("written", "num_skipped", "skipped")} for s, r in reports.items()}, indent=1))
    print(f"loader source: {tfds_data.PREFIX}{os.path.join(os.path.abspath(args.data_dir), name)}:{args.split}",
          file=sys.stderr)
    return 0


def cmd_validate(args) -> int:
    entries = inputs.load_entries(args.json)
    # The same whole-input checks as `convert` (bad lines, repeated ids), then the media path's
    # form. The check is lexical, so it needs no media on disk; without --media-root, a root whose
    # name no data path re-enters stands in (then `a/../../root/x` counts as leaving it).
    parse = schema.CheckedParse.over(_parser_for(args.format, args.bench_mode, args.allow_text_only), entries)
    root = args.media_root or os.path.join(os.sep, "<media-root>")
    counts, examples = Counter(), {}
    for i, raw in enumerate(entries):
        try:
            convert.media_path(parse(raw, i), root, args.allow_absolute_media)
        except schema.SampleError as e:
            counts[e.reason] += 1
            examples.setdefault(e.reason, str(e))
    dups: dict[str, list[int]] = {}
    for i, (sid, first) in sorted(parse.duplicates.items()):
        dups.setdefault(sid, [first]).append(i)
    invalid = sum(counts.values())
    print(json.dumps({"samples": len(entries), "valid": len(entries) - invalid,
                      "invalid": dict(sorted(counts.items())), "duplicate_ids": dups,
                      "first_of_each": examples}, indent=1))
    return 1 if invalid and not args.allow_invalid else 0


def cmd_inspect(args) -> int:
    reader = records.RecordReader(args.records)
    print(repr(reader))
    for i in args.index or []:
        r = reader[i]
        print(json.dumps({
            "id": r.sample_id, "source": r.source, "index": r.index, "modality": r.modality, "media": r.media,
            "orig_size": r.orig_size, "num_source_frames": r.num_source_frames, "frame_indices": r.frame_indices,
            "region_frame_indices": r.region_frame_indices,
            "objects": [{"frames": o.frames, "region_index": o.region_index, "null": o.null} for o in r.objects],
            "conversations": r.conversations, "extra": r.extra,
            "bytes": {"frames": sum(map(len, r.frames)), "region_frames": sum(map(len, r.region_frames))},
        }, indent=1, ensure_ascii=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vrefer-data", description="VideoRefer data conversion and checks")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "convert", help="JSON + media -> record shards",
        description="JSON + media -> record shards. Unusable samples are skipped and counted by reason in "
                    "<out>/<prefix>.report.json: a repeated sample id keeps its first sample (duplicate_id), "
                    "an unreadable JSON Lines line is one bad_json_line skip, a media path that is absolute "
                    "or leaves --media-root is media_outside_root. Resuming into a folder whose manifest was "
                    "written for other input (its samples' SHA-256), source or options is refused.")
    _add_source_args(p)
    p.add_argument("--media-root", required=True, help="folder the samples' video/image paths are relative to")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--prefix", default=None, help="shard name prefix (default: the JSON file's stem)")
    p.add_argument("--num-shards", type=int, required=True)
    p.add_argument("--shard-range", default=None, help="a:b, shards a..b-1 of --num-shards (default all)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes; one that dies is replaced and the sample that "
                   "killed it skipped as worker_died (0 = in this process, where such a crash ends the run)")
    p.add_argument("--num-frames", type=int, default=16, help="frames sampled per video ('v1' rule)")
    p.add_argument("--image-size", type=int, default=384, help="stored frame side (0 = original resolution)")
    p.add_argument("--aspect", default="square", choices=["square", "pad"])
    p.add_argument("--image-format", default="png", choices=["png", "raw", "jpeg"],
                   help="stored frames: png (lossless, the exact resized pixels; default), raw (lossless, "
                        "uncompressed: ~2.3x the disk of png, fastest to load) or jpeg (lossy, ~1/3 of png: at q95 "
                        "pixels differ from the official decode by up to ~25/255 and logits by up to ~1.9)")
    p.add_argument("--jpeg-quality", type=int, default=95, help="with --image-format jpeg")
    p.add_argument("--output-format", default="tfrecord", choices=["tfrecord", "array_record"])
    p.add_argument("--decode-threads", type=int, default=1, help="FFmpeg threads per video decode")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser(
        "tfds", help="JSON + media -> a TFDS dataset (ArrayRecord, no TensorFlow)",
        description="Prepares a TFDS dataset of the converter's records (data_pipeline/tfds_data.py) under "
                    "--data-dir: the same checks, skips and report (<data-dir>/<name>/<version>/<split>.report.json) "
                    "as convert. Train on it with DataConfig.train = ('tfds:<data-dir>/<name>:<split>',).")
    _add_source_args(p)
    p.add_argument("--media-root", required=True, help="folder the samples' video/image paths are relative to")
    p.add_argument("--data-dir", required=True, help="TFDS data_dir")
    p.add_argument("--name", default=None, choices=["videorefer_train", "videorefer_bench_q", "videorefer_bench_d",
                                                    "videorefer_synthetic"],
                   help="dataset name (default: the --format's)")
    p.add_argument("--split", default="train")
    p.add_argument("--num-frames", type=int, default=16)
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--aspect", default="square", choices=["square", "pad"])
    p.add_argument("--image-format", default="png", choices=["png", "raw", "jpeg"])
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--decode-threads", type=int, default=1)
    p.set_defaults(fn=cmd_tfds)

    p = sub.add_parser("validate", help="schema checks only (no media access)",
                       description="Schema checks only (no media access). Exits 1 when any sample is invalid "
                                   "(a repeated id counts: convert keeps only the first), 2 when the file "
                                   "cannot be read.")
    _add_source_args(p)
    p.add_argument("--allow-invalid", action="store_true", help="exit 0 even when some samples are invalid")
    p.add_argument("--media-root", default=None,
                   help="check media paths against this root exactly as convert does (nothing is read); "
                        "default: a path must not be absolute or climb above where it starts")
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("inspect", help="summarise converted records")
    p.add_argument("--records", required=True, help="folder, glob or file of shards")
    p.add_argument("--index", type=int, nargs="*", help="global record indices to print")
    p.set_defaults(fn=cmd_inspect)

    sub.add_parser("synthetic", add_help=False,
                   help="generate the synthetic referring-video task (see `synthetic --help`)")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["synthetic"]:  # its own parser (data_pipeline/synthetic/dataset.py)
        from data_pipeline.synthetic import dataset

        return dataset.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (inputs.InputError, OSError) as e:  # the user's input, not a bug: one line, no traceback
        print(f"vrefer-data {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
