"""The main job: a synthetic referring-video task learned on a CPU in minutes, end to end.

    vrefer-demo [--gin_file=configs/experiments/synthetic_tiny.gin] [--gin_bindings=...] [--workdir=DIR]
                                                                          (or `make demo`)

1. generate moving-shape videos with exact masks, Bench-Q/Bench-D-style eval sets and a BPE
   tokenizer (`data_pipeline.synthetic`), in the official JSON + RLE format;
2. convert the training JSON to TFRecord shards (`data_pipeline.convert`); a VRVL3 model
   (`configs/experiments/synthetic_tiny_vl3.gin`) trains from the JSON + media directly and gets
   a copy of the tokenizer with its `<image>` / `<REGION>` tokens instead;
3. train the tiny model with the real trainer (the family's Grain loader, sharded step over the
   local devices, Orbax checkpoints);
4. evaluate with the Bench-Q runner (official + strict parsers), again with the object tokens
   zeroed (the ablation), and score Bench-D descriptions by attribute matching;
5. export a Hugging Face folder and answer one question with `vrefer-infer`.

Each stage is skipped when its output exists, so an interrupted job resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any

import gin
import numpy as np

from vrefer_jax.json_files import write_json
from vrefer_jax import gin_setup, host_memory

log = logging.getLogger(__name__)
DEFAULT_EXPERIMENT = "configs/experiments/synthetic_tiny.gin"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SyntheticJob:
    seed: int = 0
    train_videos: int = 160
    eval_videos: int = 40
    video_frames: int = 16
    video_size: int = 64
    mask_frames: int = 2
    eval_mask_frames: int = 4
    turns_per_sample: int = 1
    fixed_options: bool = True  # see data_pipeline.synthetic.scene.SynthConfig.fixed_options
    # None: data_pipeline.synthetic.scene.SynthConfig's default.
    question_kinds: tuple[str, ...] | None = None
    travel: tuple[float, float] | None = None
    min_speed_ratio: float | None = None
    captions_per_video: int | None = None
    named_questions: float | None = None  # see data_pipeline.synthetic.scene.SynthConfig.named_questions
    vocab_size: int = 512
    convert_shards: int = 4
    eval_mode: str = "single"
    frame_noise: float = 0.0  # see data_pipeline.synthetic.scene.SynthConfig.frame_noise
    scene_tint: float = 0.0  # see data_pipeline.synthetic.scene.SynthConfig.scene_tint
    tint_objects: bool = False  # see data_pipeline.synthetic.scene.SynthConfig.tint_objects
    eval_batch_size: int = 16
    bench_d_items: int = 40
    description_tokens: int = 48


def _done(path: str) -> bool:
    return os.path.exists(path)


def _family():
    """The model family the gin configuration binds (VideoRefer-7B unless e.g. `VL3Config` is bound)."""
    from vrefer_jax import families

    bound = [f for f in families.REGISTRY.values() if families._binds(f.config_class)]
    return bound[0] if len(bound) == 1 else families.get("videorefer")


def _model_for(tok_path: str, family=None):
    """The gin-bound model config of `family` with the synthetic tokenizer's vocabulary and
    special ids (VRVL3: `<image>`, `<REGION>` and the pad of `vl3_tokenizer`'s copy)."""
    from vrefer_jax.text.tokenizer import load_tokenizer

    family = family or _family()
    tok = load_tokenizer(tok_path)
    cfg = family.config_class()
    if tok.vocab_size > cfg.text.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} ids, the model {cfg.text.vocab_size}")
    pad = tok.token_to_id("<|endoftext|>")
    if family.name == "videorefer":
        return cfg.replace(region_token_id=tok.region_id, pad_token_id=pad), tok
    return cfg.replace(image_token_id=tok.token_to_id("<image>"), region_token_id=tok.token_to_id("<REGION>"),
                       pad_token_id=pad), tok


def vl3_tokenizer(src_dir: str, out_dir: str) -> str:
    """A copy of the synthetic tokenizer with VRVL3's special tokens appended (`<image>`,
    `<|stream_start|>`, `<|stream_end|>`, `<REGION>`, as the official `add_tokens`), so that the
    run's `final/hf`, the exported folder and `vrefer-infer` all read the same ids."""
    import shutil

    from tokenizers import AddedToken, Tokenizer

    from vrefer_jax.text.vl3_prompt import SPECIAL_TOKENS

    os.makedirs(out_dir, exist_ok=True)
    tok = Tokenizer.from_file(os.path.join(src_dir, "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS
                            if tok.token_to_id(t) is None])
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    shutil.copyfile(os.path.join(src_dir, "tokenizer_config.json"), os.path.join(out_dir, "tokenizer_config.json"))
    return out_dir


def chance_levels(items) -> dict[str, float]:
    by: dict[str, list[float]] = {}
    for s in items:
        if hasattr(s, "extra"):
            by.setdefault(s.extra["type"], []).append(1.0 / len(s.extra["options"]))
    out = {t: float(np.mean(v)) for t, v in by.items()}
    out["average"] = float(np.mean([x for v in by.values() for x in v]))
    return out


def host_options(cfg) -> dict[str, Any]:
    """Frame options of the evaluation: VideoRefer-7B the model's frame count; VRVL3 its Bench-Q
    protocol (fps 1), for Bench-D too (the synthetic clips are sampled as in training)."""
    from vrefer_jax import families

    family = families.for_config(cfg)
    if family.name == "videorefer":
        return {"num_frames": cfg.num_frames}
    return family.host_options("bench-q")


def evaluate(cfg, params, tok, data_dir: str, out_dir: str, job: SyntheticJob, tag: str) -> dict[str, Any]:
    """Bench-Q accuracy (and Bench-D attribute score) of (cfg, params) on the synthetic eval sets,
    with the prompt protocol of the model's family."""
    from vrefer_jax import families
    from vrefer_jax.evaluation import bench_d, bench_q
    from vrefer_jax.inference.predictor import Predictor, default_generation

    protocol = families.for_config(cfg).bench_protocol
    pred = Predictor(cfg, params, tok, **host_options(cfg))
    os.makedirs(out_dir, exist_ok=True)
    items = bench_q.load(os.path.join(data_dir, "bench_q.json"), job.eval_mode, protocol)
    gen = default_generation(tok, None, max_new_tokens=4, repetition_penalty=1.0)
    t = time.perf_counter()
    bench_q.run(items, pred, os.path.join(out_dir, f"bench_q.{tag}.jsonl"), media_root=data_dir, gen=gen,
                batch_size=job.eval_batch_size)
    rows = {r["id"]: r for r in _read_jsonl(os.path.join(out_dir, f"bench_q.{tag}.jsonl"))}
    q = bench_q.score(rows, items)
    q["seconds"] = time.perf_counter() - t
    res = {"bench_q": q, "by_kind": accuracy_by_kind(rows, os.path.join(data_dir, "bench_q.json"))}
    if job.bench_d_items:
        d_items = bench_d.load(os.path.join(data_dir, "bench_d.json"), job.eval_mode, protocol)[: job.bench_d_items]
        dgen = default_generation(tok, None, max_new_tokens=job.description_tokens, repetition_penalty=1.0)
        bench_d.run(d_items, pred, os.path.join(out_dir, f"bench_d.{tag}.jsonl"), media_root=data_dir, gen=dgen,
                    batch_size=job.eval_batch_size)
        drows = {r["id"]: r for r in _read_jsonl(os.path.join(out_dir, f"bench_d.{tag}.jsonl"))}
        res["bench_d"] = bench_d.score_attributes(drows, d_items)
    return res


def accuracy_by_kind(rows: dict[str, dict], bench_q_path: str) -> dict[str, dict[str, Any]]:
    """Official-parser accuracy per question kind (the synthetic entries' `kind`: colour, shape,
    direction, ...), with the type it belongs to and its chance level."""
    from data_pipeline.synthetic.scene import QUESTION_TYPES
    from vrefer_jax.evaluation.bench_q import official_correct

    with open(bench_q_path) as f:
        entries = json.load(f)
    by: dict[str, dict[str, Any]] = {}
    for e in entries:
        r = rows.get(e["id"])
        if r is None or r.get("pred") is None or "kind" not in e:
            continue
        k = by.setdefault(e["kind"], {"type": e["type"], "n": 0, "correct": 0, "chance": 0.0})
        k["n"] += 1
        k["correct"] += int(official_correct(r["pred"], e["Answer"]))
        k["chance"] += 1.0 / len(e["options"])
    for k in by.values():
        k["accuracy"], k["chance"] = k["correct"] / k["n"], k["chance"] / k["n"]
    return dict(sorted(by.items(), key=lambda kv: (QUESTION_TYPES.index(kv[1]["type"]), kv[0])))


def _read_jsonl(path: str) -> list[dict]:
    from vrefer_jax.evaluation.runner import read_rows
    return list(read_rows(path))


def format_table(trained: dict, ablated: dict, chance: dict) -> str:
    from data_pipeline.synthetic.scene import QUESTION_TYPES

    def acc(res, t):
        pt = res["bench_q"]["official"]["per_type"].get(t)
        return pt["accuracy"] if pt else float("nan")

    lines = ["| question type | n | trained | object tokens zeroed | chance |", "|---|---|---|---|---|"]
    for t in QUESTION_TYPES:
        pt = trained["bench_q"]["official"]["per_type"].get(t)
        if pt is None:
            continue
        lines.append(f"| {t} | {pt['n']} | {acc(trained, t):.3f} | {acc(ablated, t):.3f} | {chance.get(t, float('nan')):.3f} |")
    lines.append(f"| **average** | {sum(v['n'] for v in trained['bench_q']['official']['per_type'].values())} | "
                 f"{trained['bench_q']['official']['accuracy']:.3f} | {ablated['bench_q']['official']['accuracy']:.3f} | "
                 f"{chance['average']:.3f} |")
    if trained.get("by_kind"):
        lines += ["", "| question kind (type) | n | trained | object tokens zeroed | chance |", "|---|---|---|---|---|"]
        for kind, k in trained["by_kind"].items():
            z = ablated.get("by_kind", {}).get(kind, {}).get("accuracy", float("nan"))
            lines.append(f"| {kind} ({k['type'].split()[0]}) | {k['n']} | {k['accuracy']:.3f} | {z:.3f} | {k['chance']:.3f} |")
    s = trained["bench_q"]["strict"]["accuracy"]
    lines.append("")
    lines.append(f"strict parser: accuracy {s:.3f}, unreadable answers {trained['bench_q']['unreadable']}")
    if "bench_d" in trained:
        d, z = trained["bench_d"], ablated.get("bench_d", {})
        lines.append(f"Bench-D attribute score (colour/shape/motion matched, 0-1): trained {d.get('score', float('nan')):.3f}"
                     + (f", object tokens zeroed {z.get('score', float('nan')):.3f}" if z else ""))
    return "\n".join(lines)


def run(workdir: str, resume: bool = True, job: SyntheticJob | None = None) -> dict[str, Any]:
    from data_pipeline import convert as convert_lib
    from data_pipeline import inputs as inputs_lib
    from data_pipeline.synthetic import dataset, scene
    from vrefer_jax.training import trainer

    job = job or SyntheticJob()
    family = _family()
    vl3 = family.name != "videorefer"
    t0 = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    data_dir = os.path.join(workdir, "data")
    tok_path = os.path.join(data_dir, "tokenizer.json")

    # 1. data
    if not (resume and _done(os.path.join(data_dir, "summary.json"))):
        print("[1/5] generating synthetic videos, questions and tokenizer ...", flush=True)
        optional = {k: tuple(v) if isinstance(v, (list, tuple)) else v
                    for k in ("question_kinds", "travel", "min_speed_ratio", "captions_per_video", "named_questions")
                    if (v := getattr(job, k)) is not None}
        summary = dataset.generate(
            data_dir, seed=job.seed, train_videos=job.train_videos, eval_videos=job.eval_videos,
            cfg=scene.SynthConfig(num_frames=job.video_frames, size=job.video_size, mask_frames=job.mask_frames,
                                      eval_mask_frames=job.eval_mask_frames, turns_per_sample=job.turns_per_sample,
                                      fixed_options=job.fixed_options, prompt_protocol=family.bench_protocol,
                                      frame_noise=job.frame_noise, scene_tint=job.scene_tint,
                                      tint_objects=job.tint_objects, **optional),
            vocab_size=job.vocab_size)
        print(f"      {summary['train_samples']} training samples, {summary['bench_q']} Bench-Q, "
              f"{summary['bench_d']} Bench-D items", flush=True)
    if vl3:
        tok_path = vl3_tokenizer(data_dir, os.path.join(data_dir, "vl3_tokenizer"))
    cfg, tok = _model_for(tok_path, family)

    # 2. records
    rec_dir = os.path.join(workdir, "records")
    if vl3:
        print("[2/5] VRVL3 trains from the JSON + media (data_pipeline.vl3.loader): no records", flush=True)
    elif not (resume and _done(os.path.join(rec_dir, "train.report.json"))):
        print("[2/5] converting to TFRecord shards ...", flush=True)
        entries = inputs_lib.load_entries(os.path.join(data_dir, "train.json"))
        ccfg = convert_lib.ConvertConfig(num_frames=cfg.num_frames, image_size=cfg.vision.image_size, image_format="png")
        rep = convert_lib.convert(entries, rec_dir, media_root=data_dir, num_shards=job.convert_shards, config=ccfg,
                                  prefix="train", progress=False)
        print(f"      {rep.get('written', rep)} written", flush=True)

    # 3. training
    print("[3/5] training ...", flush=True)
    train_dir = os.path.join(workdir, "train")
    train_src = os.path.join(data_dir, "train.json") if vl3 else os.path.join(rec_dir, "train-*.tfrecord")
    data = dataclasses.replace(trainer.DataConfig(), train=(train_src,), tokenizer=tok_path)
    if resume and _done(os.path.join(train_dir, "DONE")):
        out = {"history": [json.loads(l) for l in open(os.path.join(train_dir, "metrics.jsonl"))]}
    else:
        out = trainer.train(train_dir, resume=resume, model_cfg=cfg, data_cfg=data, tokenizer=tok)
    losses = [h["loss"] for h in out["history"] if "loss" in h]
    print("      loss curve: " + " ".join(f"{x:.3f}" for x in losses), flush=True)
    skipped = [h["skipped_samples"] for h in out["history"] if "skipped_samples" in h]
    print(f"      samples skipped for exceeding a LoaderConfig cap: {skipped[-1] if skipped else 0}", flush=True)

    # 4. evaluation
    print("[4/5] evaluating (Bench-Q runner, ablation, Bench-D attributes) ...", flush=True)
    from vrefer_jax.checkpoints.store import load_imported

    final = os.path.join(train_dir, "final")
    fcfg, params = load_imported(final)
    eval_dir = os.path.join(workdir, "eval")
    trained = evaluate(fcfg, params, tok, data_dir, eval_dir, job, "trained")
    ablated = evaluate(fcfg.replace(zero_object_tokens=True), params, tok, data_dir, eval_dir, job, "zeroed")
    from vrefer_jax.evaluation import bench_q
    chance = chance_levels(bench_q.load(os.path.join(data_dir, "bench_q.json"), job.eval_mode, family.bench_protocol))
    table = format_table(trained, ablated, chance)

    # 5. export + one question through vrefer-infer
    print("[5/5] exporting to a Hugging Face folder and asking vrefer-infer one question ...", flush=True)
    hf_dir = os.path.join(workdir, "hf_export")
    if vl3:
        family.export_checkpoint(final, hf_dir, dtype="float32", overwrite=True)
        answer = ask_one(hf_dir, data_dir, None, family.bench_protocol, host_options(fcfg))
    else:
        from vrefer_jax.checkpoints.hf_export import export_videorefer
        export_videorefer(params, fcfg, hf_dir, tokenizer_folder=os.path.join(final, "hf"), dtype="float32")
        answer = ask_one(hf_dir, data_dir, fcfg.num_frames)

    result = {"table": table, "trained": trained, "ablated": ablated, "chance": chance, "loss_curve": losses,
              "skipped_samples": skipped[-1] if skipped else 0,
              "answer": answer, "seconds": time.perf_counter() - t0, "host_memory_reused": host_memory.applied()}
    write_json(os.path.join(workdir, "result.json"), dict(result), default=str)
    print("\n" + table)
    print(f"\nvrefer-infer: {answer['question']!r} -> {answer['answer']!r} (ground truth {answer['truth']!r})")
    print(f"\nmain job finished in {result['seconds']:.0f} s; outputs in {workdir}")
    return result


def ask_one(checkpoint: str, data_dir: str, num_frames: int | None, protocol: str = "videorefer",
            options: dict[str, Any] | None = None) -> dict[str, str]:
    """Answer the first Bench-Q question through the `vrefer-infer` CLI (RLE mask files) from the
    exported Hugging Face folder (so the export round trip is exercised too). VideoRefer-7B:
    `num_frames`; VRVL3: the host `options` (fps, max_frames) and its prompt `protocol`."""
    import contextlib
    import io

    from data_pipeline.bench_formats import bench_q_prompt
    from vrefer_jax.inference import cli as infer_cli

    entry = json.load(open(os.path.join(data_dir, "bench_q.json")))[0]
    fidx = str(entry["frame_idx"])
    masks = []
    for k, obj in enumerate(entry["annotation"]):
        path = os.path.join(data_dir, f"ask_mask{k}.json")
        with open(path, "w") as f:
            json.dump(obj[fidx]["segmentation"], f)
        masks += ["--rle", path]
    question = bench_q_prompt(entry["Question"], entry["options"], protocol)  # the prompt the model was trained on
    argv = ["--checkpoint", checkpoint, "--video", os.path.join(data_dir, entry["video"]), "--question", question,
            "--frame", fidx, "--max-new-tokens", "8", *masks]
    if num_frames is not None:
        argv += ["--num-frames", str(num_frames), "--use-stored-vision-tower"]
    for k, v in (options or {}).items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        infer_cli.main(argv)
    return {"question": question, "answer": buf.getvalue().strip(), "truth": entry["Answer"]}


def main(argv: list[str] | None = None) -> int:
    """`vrefer-demo`: the main job; with no argument, `DEFAULT_EXPERIMENT`."""
    ap = argparse.ArgumentParser(prog="vrefer-demo", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    gin_setup.add_arguments(ap)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's per-save chatter
    from vrefer_jax.distributed import maybe_initialize_distributed
    from vrefer_jax.training import trainer  # noqa: F401  (registers the configurables the experiment binds)

    maybe_initialize_distributed()
    try:
        workdir = gin_setup.parse(a, "synthetic_demo", (DEFAULT_EXPERIMENT,))
    except gin_setup.GinSetupError as e:
        print(f"vrefer-demo: {e}", file=sys.stderr)
        return 2
    host_memory.configure()
    run(workdir, resume=a.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
