"""`vrefer-eval`: benchmark runs and scoring.

    vrefer-eval bench-q --checkpoint CKPT --tokenizer TOK --data VideoRefer-Bench-Q.json \\
        --media_root BENCH_Q_DIR --mode single --out preds/bench_q.jsonl [--shard_index K --num_shards N]
    vrefer-eval bench-d ... --scorer judge|attributes|none [--judge_model gpt-4o ...]
    vrefer-eval mcqa --benchmark mvbench|videomme|perception_test --data Q --media_root VIDEOS --out ...
    vrefer-eval region --benchmark lvis|paco|vg|hcstvg|dlc|refl4 --data FILE --media_root IMAGES ...
        [--embedding_model all-MiniLM-L6-v2/]   # lvis / paco SSim
        [--qa qa.json --class_names class_names.json]   # dlc (default: next to annotations.json)
    vrefer-eval score --benchmark bench-q --data Q.json --out preds/bench_q.jsonl   # merges the shards

A run appends to its prediction file and skips the ids already there (resume by re-running the
same command). With `--num_shards N` each process writes `<out>.shard<K>-of-<N>.jsonl`; `score`
reads `--out` and all its shard files (or the files given with `--pred`). The score report goes to
`--report` (default `<out stem>.score.json`); a summary is printed.

Frames: `--num_frames` defaults to 8 for bench-q / bench-d (the released Bench scripts use the
`NUM_FRAMES = 8` default) and 16 for mcqa (`model.config.num_frames`). VRVL3 samples by fps: its
family's protocol per benchmark (Bench-Q 1, Bench-D and HC-STVG 4; images take none).

Region benchmarks (VRVL3's image / video region scripts, `region --benchmark`): LVIS / PACO
(SSim, SIoU; `category.py`), VG / HC-STVG (COCO caption metrics; `captioning.py`), DLC-Bench
(LLM judge; `dlc_bench.py`), Ref-L4 (CLAIR through the judge; `ref_l4.py`). Scorers that need
something not given (an embedding model, a judge endpoint, Java) report what they skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from vrefer_jax.evaluation import (bench_d, bench_q, captioning, category, dlc_bench, judge, mcqa, mvbench,
                                   perception_test, ref_l4, runner, videomme)
from vrefer_jax.json_files import write_json

REGION_BENCHMARKS = ("lvis", "paco", "vg", "hcstvg", "dlc", "refl4")
REGION_MODULES = {"lvis": category, "paco": category, "vg": captioning, "hcstvg": captioning, "dlc": dlc_bench,
                  "refl4": ref_l4}
BENCHMARKS = ("bench-q", "bench-d", "mvbench", "videomme", "perception_test", *REGION_BENCHMARKS)


def load_predictor(args: argparse.Namespace):
    """The real predictor (imported here so scoring works without the model stack)."""
    from vrefer_jax.inference.predictor import Predictor
    from vrefer_jax.sharding import MeshConfig, make_mesh

    mesh = make_mesh(MeshConfig.parse(args.mesh)) if args.mesh else None
    predictor = Predictor.load(args.checkpoint, tokenizer=args.tokenizer,
                               allow_absolute_media=args.allow_absolute_media, mesh=mesh)
    return predictor.configure(**host_options(predictor.family, _bench(args), args))


def host_options(family, bench: str, args: argparse.Namespace) -> dict[str, Any]:
    """The family's protocol for this benchmark (VideoRefer-7B: 8 frames for Bench-Q/D, 16 for
    MCQA; VRVL3: fps 1 for Bench-Q, 4 for Bench-D), overridden by the frame flags given. A flag the
    family's host does not take (`--num_frames` for VRVL3, which samples by fps) is an error."""
    given = {k: getattr(args, k, None) for k in ("num_frames", "fps", "max_frames")}
    try:
        return family.host_options(bench, **given)
    except ValueError as e:
        raise SystemExit(f"vrefer-eval: --{e}") from None


def _bench(args: argparse.Namespace) -> str:
    return args.benchmark if args.cmd in ("mcqa", "region") else args.cmd


def _stem(out: str) -> str:
    return out[:-len(".jsonl")] if out.endswith(".jsonl") else out


def _items(bench: str, args: argparse.Namespace, protocol: str = "videorefer") -> list[runner.Item]:
    if bench in REGION_BENCHMARKS:
        # the region benchmarks' prompts are VRVL3's; a family without its own gets VRVL3's
        proto = "vl3" if protocol not in ("vl3", "videorefer") else protocol
        if bench in category.BENCHMARKS:
            return category.load(args.data, bench, proto)
        if bench in captioning.BENCHMARKS:
            return captioning.load(args.data, bench, proto)
        if bench == "dlc":
            return dlc_bench.load(args.data, proto)
        return ref_l4.load(args.data, proto, subset=getattr(args, "refl4_subset", "objects365"))
    if bench == "bench-q":
        return bench_q.load(args.data, args.mode, protocol)
    if bench == "bench-d":
        return bench_d.load(args.data, args.mode, protocol)
    if bench == "videomme":
        subs = runner.load_json(args.subtitles) if getattr(args, "subtitles", None) else None
        return videomme.load(args.data, getattr(args, "media_root", None), subs,
                             subtitle_folder=getattr(args, "subtitle_folder", None),
                             num_frames=getattr(args, "num_frames", None) or 16)
    if bench == "perception_test":
        return perception_test.load(args.data, getattr(args, "media_root", None))
    return mvbench.load(args.data)


def _judge_configured(args: argparse.Namespace) -> bool:
    return bool(args.judge_base_url or os.environ.get(judge.ENV_BASE_URL) or os.environ.get(judge.ENV_KEY))


def _read_text(path: str | None) -> str | None:
    if not path:
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def _score_region(bench: str, args: argparse.Namespace, items, rows) -> dict[str, Any]:
    scorer = getattr(args, "scorer", "auto")
    if scorer == "none":
        return {}
    if bench in category.BENCHMARKS:
        emb = category.SentenceEmbedder(args.embedding_model) if args.embedding_model else None
        return category.score(rows, items, emb, bench)
    if bench in captioning.BENCHMARKS:
        return captioning.score(rows, items, bench, tokenizer=args.caption_tokenizer, meteor=not args.no_meteor,
                                spice=not args.no_spice)
    if scorer == "auto" and not _judge_configured(args):
        _log(f"no judge configured ({judge.ENV_BASE_URL} / {judge.ENV_KEY} / --judge_base_url): "
             f"{bench} predictions left unscored; run `vrefer-eval score --benchmark {bench}` later")
        return {}
    client = _judge_client(args)
    if bench == "dlc":
        qa, names = dlc_bench.default_side_files(args.data) if args.data else (None, None)
        qa, names = args.qa or qa, args.class_names or names
        if not qa or not names:
            raise SystemExit("vrefer-eval: DLC-Bench scoring needs --qa and --class_names (or --data next to them)")
        prompts = dlc_bench.DLCPrompts.from_file(args.dlc_prompts) if args.dlc_prompts else dlc_bench.DLCPrompts()
        return dlc_bench.score(rows, client, qa, names, items, prompts, log=_log)
    return ref_l4.score(rows, client, items, prompt=_read_text(args.clair_prompt) or ref_l4.DEFAULT_PROMPT,
                        char_references=args.clair_char_references, log=_log)


def _judge_client(args: argparse.Namespace) -> judge.JudgeClient:
    system = None
    if args.judge_system_prompt:
        with open(args.judge_system_prompt, encoding="utf-8") as f:
            system = f.read()
    cfg = judge.JudgeConfig.from_env(base_url=args.judge_base_url, model=args.judge_model,
                                     workers=args.judge_workers, retries=args.judge_retries,
                                     timeout=args.judge_timeout, system_prompt=system,
                                     unparsed_attempts=args.judge_unparsed_attempts)
    cache = args.judge_cache or _stem(args.out) + ".judge_cache.jsonl"
    return judge.JudgeClient(cfg, cache)


def _score(bench: str, args: argparse.Namespace, items: list[runner.Item] | None, files: list[str]) -> dict[str, Any]:
    if not files:
        raise SystemExit(f"no prediction files for {args.out!r}")
    rows = runner.read_predictions(files)
    if bench in REGION_BENCHMARKS:
        report = _score_region(bench, args, items, rows)
        if not report:
            return {}
    elif bench == "bench-q":
        report = bench_q.score(rows, items)
    elif bench == "bench-d":
        scorer = args.scorer
        if scorer == "auto":
            has_attr = any("attributes" in r for r in rows.values())
            scorer = "attributes" if has_attr else "judge"
            configured = args.judge_base_url or os.environ.get(judge.ENV_BASE_URL) or os.environ.get(judge.ENV_KEY)
            if scorer == "judge" and not configured:
                _log(f"no judge configured ({judge.ENV_BASE_URL} / {judge.ENV_KEY} / --judge_base_url): "
                     "Bench-D predictions left unscored; run `vrefer-eval score --scorer judge` later")
                return {}
        if scorer == "none":
            return {}
        if scorer == "attributes":
            report = bench_d.score_attributes(rows, items)
        else:
            report = bench_d.score_judge(rows, _judge_client(args), items, log=_log)
    else:
        report = mcqa.score(rows, items, bench)
        if bench == "perception_test":
            sub = args.submission or _stem(args.out) + ".submission.json"
            write_json(sub, perception_test.submission(rows))
            report["submission"] = sub
    report["prediction_files"] = files
    write_json(args.report or _stem(args.out) + ".score.json", report)
    return report


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _brief(obj: Any, depth: int = 0) -> Any:
    """The report with long lists shown as counts (the full report is in the file)."""
    if isinstance(obj, dict):
        return {k: _brief(v, depth + 1) for k, v in obj.items() if k not in ("judged", "per_item", "questions")}
    if isinstance(obj, list) and len(obj) > 10:
        return f"<{len(obj)} items, see the report file>"
    return obj


def _cmd_run(bench: str, args: argparse.Namespace) -> int:
    predictor = load_predictor(args)
    family = getattr(predictor, "family", None)  # test doubles have none: VideoRefer's prompts
    items = _items(bench, args, family.bench_protocol if family is not None else "videorefer")
    mod = {"bench-q": bench_q, "bench-d": bench_d, **REGION_MODULES}.get(bench, mcqa)
    gen = None  # the predictor's default (the checkpoint's generation config, greedy)
    if args.max_new_tokens is not None and hasattr(predictor, "generation"):
        gen = predictor.generation.replace(max_new_tokens=args.max_new_tokens)
    res = mod.run(items, predictor, args.out, media_root=args.media_root, gen=gen, batch_size=args.batch_size,
                  shard_index=args.shard_index, num_shards=args.num_shards, limit=args.limit, log=_log)
    print(json.dumps({"predictions": res.path, "shard": res.shard, "written": res.written,
                      "resumed": res.resumed, "error_rows": res.errors}))
    if args.num_shards > 1 or args.no_score:
        print("scoring skipped: run `vrefer-eval score` once every shard is done", file=sys.stderr)
        return 0
    report = _score(bench, args, items, [res.path])
    if report:
        print(json.dumps(_brief(report), indent=1))
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    items = _items(args.benchmark, args) if args.data else None
    files = args.pred or runner.shard_files(args.out)
    report = _score(args.benchmark, args, items, files)
    print(json.dumps(_brief(report), indent=1))
    return 0


def _add_judge(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LLM-judge scoring (Bench-D, DLC-Bench, Ref-L4 CLAIR)")
    g.add_argument("--scorer", default="auto", choices=["auto", "judge", "attributes", "none"],
                   help="auto: Bench-D attributes when the predictions carry them (synthetic set), else the judge "
                        "when one is configured; none: predictions only")
    g.add_argument("--judge_base_url", help=f"OpenAI-compatible API root (env {judge.ENV_BASE_URL})")
    g.add_argument("--judge_model", help=f"judge model name (env {judge.ENV_MODEL})")
    g.add_argument("--judge_workers", type=int, default=4)
    g.add_argument("--judge_retries", type=int, default=5)
    g.add_argument("--judge_timeout", type=float, default=120.0)
    g.add_argument("--judge_cache", help="JSONL cache of judge replies (default <out stem>.judge_cache.jsonl)")
    g.add_argument("--judge_unparsed_attempts", type=int, default=3,
                   help="only replies with all four scores are cached as final; a reply that cannot be parsed is "
                        "asked again on later runs, up to this many requests per item over all runs sharing the "
                        "cache, then its last reply is kept (and listed under 'unparsed')")
    g.add_argument("--judge_system_prompt", help="Bench-D: file with the system prompt (e.g. the official system.txt)")


def _add_region_scoring(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("region benchmark scoring")
    g.add_argument("--embedding_model", help="lvis / paco: local sentence-transformers folder (all-MiniLM-L6-v2) "
                   "for SSim; without it only SIoU is reported")
    g.add_argument("--caption_tokenizer", default="auto", choices=["auto", "java", "python"],
                   help="vg / hcstvg: PTB tokenizer (auto: pycocoevalcap's Java one when java is on the PATH)")
    g.add_argument("--no_meteor", action="store_true", help="vg / hcstvg: skip METEOR (a Java program)")
    g.add_argument("--no_spice", action="store_true", help="vg / hcstvg: skip SPICE (Java + CoreNLP 3.6.0 jars)")
    g.add_argument("--qa", help="dlc: DLC-Bench qa.json (default: next to --data)")
    g.add_argument("--class_names", help="dlc: DLC-Bench class_names.json (default: next to --data)")
    g.add_argument("--dlc_prompts", help="dlc: JSON with template / recognition_singular / recognition_plural "
                   "(e.g. DAM's own texts)")
    g.add_argument("--clair_prompt", help="refl4: file with the CLAIR prompt ({candidates}, {references})")
    g.add_argument("--clair_char_references", action="store_true",
                   help="refl4: send the reference caption one character per line, as the official script does")
    g.add_argument("--refl4_subset", default="objects365", choices=["objects365", "all"],
                   help="refl4: the entries evaluated (official: the Objects365 split)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vrefer-eval", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p, frames):
        p.add_argument("--data", required=True, help="benchmark JSON (MVBench: the folder of task JSONs)")
        p.add_argument("--media_root", required=True, help="folder the entries' video paths are relative to")
        p.add_argument("--allow_absolute_media", action="store_true",
                       help="read absolute video paths in the benchmark file as they are (default: every path "
                            "must stay inside --media_root; others are error rows, media_outside_root)")
        p.add_argument("--out", required=True, help="prediction JSONL (shards get a suffix)")
        p.add_argument("--checkpoint", required=True)
        p.add_argument("--mesh", default=None, help="serve on a device mesh, e.g. 'data=1,fsdp=1,tensor=8' "
                       "(default: one device)")
        p.add_argument("--tokenizer", default=None)
        p.add_argument("--num_frames", type=int, default=None,
                       help=f"VideoRefer-7B: frames per video (default {frames}, the official scripts')")
        p.add_argument("--fps", type=float, default=None,
                       help="VRVL3: frames per second sampled (default: its protocol, Bench-Q 1, Bench-D 4)")
        p.add_argument("--max_frames", type=int, default=None, help="VRVL3: cap on sampled frames (default 768)")
        p.add_argument("--batch_size", type=int, default=1)
        p.add_argument("--shard_index", type=int, default=0)
        p.add_argument("--num_shards", type=int, default=1)
        p.add_argument("--limit", type=int, default=None, help="at most this many new predictions")
        p.add_argument("--max_new_tokens", type=int, default=None,
                       help="cap on generated tokens (official: 2048); default: the predictor's")
        p.add_argument("--report", default=None)
        p.add_argument("--no_score", action="store_true")

    for name in ("bench-q", "bench-d"):
        p = sub.add_parser(name, help=f"VideoRefer-Bench-{name[-1].upper()}: predict, then score")
        common(p, 8)
        p.add_argument("--mode", default="single", choices=["single", "multi"])
        if name == "bench-d":
            _add_judge(p)
    p = sub.add_parser("mcqa", help="MVBench / VideoMME / Perception Test: predict, then score")
    common(p, 16)
    p.add_argument("--benchmark", required=True, choices=list(mcqa.BENCHMARKS))
    p.add_argument("--subtitles", help="VideoMME: JSON {youtube id: subtitle text} for the subtitle run")
    p.add_argument("--subtitle_folder", help="VideoMME: the official <youtube id>.srt files for the subtitle run "
                   "(read at the official frame times; needs --media_root)")
    p.add_argument("--submission", help="Perception Test: where to write the server JSON")

    p = sub.add_parser("region", help="LVIS / PACO / VG / HC-STVG / DLC-Bench / Ref-L4 (VRVL3's region "
                       "benchmarks): predict, then score")
    common(p, 8)
    p.add_argument("--benchmark", required=True, choices=list(REGION_BENCHMARKS))
    _add_region_scoring(p)
    _add_judge(p)

    p = sub.add_parser("score", help="score existing prediction files")
    p.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    p.add_argument("--out", required=True, help="prediction JSONL the runs wrote (its shards are merged)")
    p.add_argument("--pred", nargs="*", help="explicit prediction files instead of <out> and its shards")
    p.add_argument("--data", help="benchmark JSON: ground truth from the data, missing ids reported")
    p.add_argument("--media_root", help="VideoMME / Perception Test: video folder (resolves file names)")
    p.add_argument("--mode", default="single", choices=["single", "multi"])
    p.add_argument("--subtitles")
    p.add_argument("--submission")
    p.add_argument("--report", default=None)
    _add_region_scoring(p)
    _add_judge(p)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "score":
        return _cmd_score(args)
    return _cmd_run(_bench(args), args)


if __name__ == "__main__":
    sys.exit(main())
