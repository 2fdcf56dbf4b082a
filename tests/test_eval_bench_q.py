"""Bench-Q evaluation: the official parser's numbers, the strict parser, resumable sharded runs, CLI."""

import itertools
import json
import os
import re

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from data_pipeline import schema
from vrefer_jax.evaluation import bench_q, cli, runner
from vrefer_jax.shard_ranges import shard_bounds
from vrefer_jax import families

OPTIONS = ["(A) A helmet", "(B) A hat", "(C) Sunglasses", "(D) A watch"]


# ----------------------------------------------------------------------------- official reference


def reference_official(pred_rows):
    """The official `eval_videorefer_bench_q.py` rules, written out independently: returns
    ({type: (count, right)}, (count, right)) or raises where the official script raises."""
    total, right = {}, {}
    for d in pred_rows:
        gt = d["Answer"]
        g = re.search(r"\(([A-Z])\)", gt)
        if g:
            gt = g.group(1)
        p = re.search(r"\(([A-Z])\)", d["pred"]) or re.search(r"([A-Z])\)", d["pred"])
        ans = p.group(1) if p else d["pred"].replace(".", "")[0]  # IndexError on "" like the official
        total[d["type"]] = total.get(d["type"], 0) + 1
        right[d["type"]] = right.get(d["type"], 0) + (ans.lower() == gt.lower())
    return ({t: (total[t], right[t]) for t in total}, (sum(total.values()), sum(right.values())))


CRAFTED = ["(A)", "(B)", "(C) Sunglasses", "A.", "B.", "C", "D", "a", "b", "c.", "(b)", "The answer is B",
           "The answer is (D).", "Answer: C", "B) A hat", "A) x (C) y", "A or B", "(A) and (B)", "...B", ". C",
           "A hat", "Sunglasses", "d)", "x) y", "  (A)", "E", "(E)", "Option C)", "B, I think", "[B]", "A,B",
           "The correct option is (A) A helmet.", "C\n", "\nD"]


def _rows():
    rng = np.random.default_rng(0)
    rows = []
    for i, (pred, ans) in enumerate(itertools.product(CRAFTED, OPTIONS)):
        rows.append({"id": f"q{i}", "pred": pred, "Answer": ans, "options": OPTIONS,
                     "type": bench_q.TYPES[int(rng.integers(5))]})
    return rows


def test_official_parser_matches_reference():
    rows = _rows()
    per_type, (n, right) = reference_official(rows)
    rep = bench_q.score(rows)
    assert rep["official"]["n"] == n and rep["official"]["correct"] == right
    assert rep["official"]["accuracy"] == pytest.approx(right / n)
    for t, (tn, tr) in per_type.items():
        got = rep["official"]["per_type"][t]
        assert (got["n"], got["correct"]) == (tn, tr), t
    assert list(rep["official"]["per_type"]) == [t for t in bench_q.TYPES if t in per_type]
    print(f"official: {right}/{n} correct over {len(CRAFTED)} crafted outputs x 4 answers")


def test_official_letter_cases():
    cases = {"(A)": "A", "A.": "A", "The answer is B": "T", "b": "b", "(b)": "(", "B) A hat": "B",
             "A) x (C) y": "C", "...B": "B", ". C": " ", "": None, "...": None, "d)": "d"}
    for pred, want in cases.items():
        assert bench_q.official_letter(pred) == want, pred
    assert bench_q.official_correct("b", "(B) A hat")  # case-insensitive
    assert not bench_q.official_correct("The answer is B", "(B) A hat")
    assert bench_q.official_gt("no letter") == "no letter"


def test_official_crash_outputs_are_listed():
    rows = [{"id": "x", "pred": "", "Answer": "(A) a", "type": "Basic Questions", "options": OPTIONS},
            {"id": "y", "pred": "..", "Answer": "(A) a", "type": "Basic Questions", "options": OPTIONS},
            {"id": "z", "pred": "(A)", "Answer": "(A) a", "type": "Basic Questions", "options": OPTIONS}]
    with pytest.raises(IndexError):
        reference_official(rows[:1])
    rep = bench_q.score(rows)
    assert [c["id"] for c in rep["official_crash"]] == ["x", "y"]
    assert rep["official"]["correct"] == 1 and rep["official"]["n"] == 3


def test_strict_parser():
    ok = {"A": "A", "b": "B", "(C)": "C", "D.": "D", "[B]": "B", "(A) A helmet": "A", "The answer is B": "B",
          "The answer is (D).": "D", "Answer: C": "C", "B) A hat": "B", "Sunglasses": "C", "a hat": "B",
          "The correct option is (A) A helmet.": "A", "  (A)  ": "A", "Option C)": "C"}
    bad = ["", "A or B", "(A) and (B)", "A) x (C) y", "E", "(E)", "I think so", "A. B.", "answer is b",
           "The answer is", "hat or watch"]
    for pred, want in ok.items():
        assert bench_q.strict_letter(pred, OPTIONS) == want, pred
    for pred in bad:
        assert bench_q.strict_letter(pred, OPTIONS) is None, pred
    rows = [{"id": str(i), "pred": p, "Answer": "(B) A hat", "type": "Basic Questions", "options": OPTIONS}
            for i, p in enumerate(["B", "A or B", "", "(B)"])]
    rep = bench_q.score(rows)
    assert rep["unreadable"] == 2 and [u["pred"] for u in rep["unreadable_items"]] == ["A or B", ""]
    assert rep["strict"]["correct"] == 2 and rep["strict"]["n"] == 4


# ----------------------------------------------------------------------------- benchmark fixture


def _rle(m):
    r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": list(r["size"]), "counts": r["counts"].decode()}


def make_bench(root, n=7):
    """n Bench-Q entries over two 6-frame JPEG folders (official layout, no `id`: ids are `#i`)."""
    for v in ("vid0", "vid1"):
        d = os.path.join(root, "JPEGImages", v)
        os.makedirs(d)
        for t in range(6):
            Image.fromarray(np.full((24, 32, 3), 40 * t, np.uint8)).save(os.path.join(d, f"{t:05d}.jpg"))
    m = np.zeros((24, 32), bool)
    m[4:12, 6:20] = True
    entries = []
    for i in range(n):
        two = i % 3 == 2
        ann = [{"1": {"segmentation": _rle(m)}, "3": {"segmentation": _rle(m)}}]
        q = "What is <object0><region> wearing?"
        if two:
            ann.append({"3": {"segmentation": _rle(~m)}, "4": {"segmentation": _rle(m)}})
            q = "Is <object0><region> left of <object1><region>?"
        entries.append({"video": f"JPEGImages/vid{i % 2}", "Question": q, "options": OPTIONS,
                        "Answer": OPTIONS[i % 4], "type": bench_q.TYPES[i % 5], "frame_idx": 3, "annotation": ann})
    return entries


class FakePredictor:
    """Scripted answers; checks the samples are runnable; can die after `die_after` samples."""

    def __init__(self, answers=None, die_after=None):
        self.answers, self.die_after, self.seen, self.calls = answers or {}, die_after, [], []

    def answer(self, samples, media_root, gen=None, batch_size=1):
        self.calls.append(len(samples))
        out = []
        for s in samples:
            if self.die_after is not None and len(self.seen) >= self.die_after:
                raise KeyboardInterrupt("killed")
            assert isinstance(s, schema.Sample)
            assert os.path.isdir(os.path.join(media_root, s.media))
            assert s.conversations[0]["value"].startswith("<video>\n") and s.objects
            self.seen.append(s.sample_id)
            out.append(self.answers.get(s.sample_id, "(A)"))
        return out


def test_run_resumes_after_kill(tmp_path):
    entries = make_bench(str(tmp_path / "media"))
    items = bench_q.load(entries, "single")
    out = str(tmp_path / "pred.jsonl")
    with pytest.raises(KeyboardInterrupt):
        bench_q.run(items, FakePredictor(die_after=4), out, media_root=str(tmp_path / "media"), batch_size=2)
    first = runner.read_rows(out)
    assert [r["id"] for r in first] == ["#0", "#1", "#2", "#3"]  # two full batches were flushed
    with open(out, "a") as f:
        f.write('{"id": "#4", "pr')  # a line cut short by the kill
    fake = FakePredictor()
    res = bench_q.run(items, fake, out, media_root=str(tmp_path / "media"), batch_size=2)
    assert fake.seen == ["#4", "#5", "#6"] and res.resumed == 4 and res.written == 3
    rows = runner.read_rows(out)
    assert [r["id"] for r in rows] == [f"#{i}" for i in range(7)]
    assert rows[2]["type"] == bench_q.TYPES[2] and rows[2]["Answer"] == OPTIONS[2] and rows[2]["frame_idx"] == 3
    again = FakePredictor()
    res = bench_q.run(items, again, out, media_root=str(tmp_path / "media"))
    assert again.seen == [] and res.written == 0 and res.resumed == 7
    with pytest.raises(ValueError, match="mode"):
        bench_q.run(bench_q.load(entries, "multi"), again, out, media_root=str(tmp_path / "media"))


def test_single_mode_missing_mask_is_an_error_row(tmp_path):
    entries = make_bench(str(tmp_path / "media"), n=3)
    entries[1]["frame_idx"] = 1  # object 0 has frame 1; entry 2's second object lacks frame 1
    entries[2]["frame_idx"] = 1
    items = bench_q.load(entries, "single")
    assert isinstance(items[2], schema.SampleError) and items[2].reason == "missing_segmentation"
    multi = bench_q.load(entries, "multi")
    assert all(isinstance(s, schema.Sample) for s in multi)
    assert [len(o.frames) for o in multi[2].objects] == [2, 2]
    out = str(tmp_path / "p.jsonl")
    fake = FakePredictor()
    bench_q.run(items, fake, out, media_root=str(tmp_path / "media"))
    assert fake.seen == ["#0", "#1"]
    rep = bench_q.score(runner.read_predictions(out), items)
    assert rep["official"]["n"] == 2 and rep["errors"][0]["reason"] == "missing_segmentation"
    assert rep["missing"] == []


def test_sharded_runs_merge(tmp_path):
    entries = make_bench(str(tmp_path / "media"), n=7)
    items = bench_q.load(entries, "multi")
    out = str(tmp_path / "preds" / "bq.jsonl")
    answers = {f"#{i}": ["(A)", "B", "The answer is C", "", "d"][i % 5] for i in range(7)}
    seen = []
    for k in range(3):
        fake = FakePredictor(answers)
        bench_q.run(items, fake, out, media_root=str(tmp_path / "media"), shard_index=k, num_shards=3)
        seen.append(fake.seen)
    assert seen == [["#0", "#1", "#2"], ["#3", "#4", "#5"], ["#6"]]
    assert shard_bounds(7, 2, 3) == (6, 7) and shard_bounds(2, 2, 3) == (2, 2)
    files = runner.shard_files(out)
    assert len(files) == 3 and not os.path.exists(out)
    rep = bench_q.score(runner.read_predictions(files), items)
    rows = [{"pred": answers[s.sample_id], "Answer": s.extra["answer"], "type": s.extra["type"]} for s in items]
    _, (n, right) = reference_official([r for r in rows if r["pred"]])
    assert rep["official"]["n"] == 7 and rep["official"]["correct"] == right
    assert rep["unreadable"] == 1 and len(rep["official_crash"]) == 1
    # the official scorer reads the merged file's fields as they are
    merged = [json.loads(line) for f in files for line in open(f)]
    assert all({"Answer", "pred", "type", "video"} <= set(r) for r in merged)


def test_cli_bench_q_and_score(tmp_path, monkeypatch, capsys):
    media = str(tmp_path / "media")
    entries = make_bench(media, n=5)
    data = tmp_path / "bench_q.json"
    data.write_text(json.dumps(entries))
    fakes = []

    def load(args):
        # the frames a VideoRefer checkpoint is configured with: the official scripts' 8
        assert cli.host_options(families.get("videorefer"), cli._bench(args), args) == {"num_frames": 8}
        assert args.checkpoint == "ckpt"
        fakes.append(FakePredictor({"#1": "(A)", "#2": "C"}))
        return fakes[-1]

    monkeypatch.setattr(cli, "load_predictor", load)
    out = str(tmp_path / "out" / "bq.jsonl")
    base = ["bench-q", "--checkpoint", "ckpt", "--data", str(data), "--media_root", media, "--out", out]
    assert cli.main(base + ["--limit", "2"]) == 0
    assert cli.main(base) == 0
    assert fakes[0].seen == ["#0", "#1"] and fakes[1].seen == ["#2", "#3", "#4"]
    report = json.load(open(str(tmp_path / "out" / "bq.score.json")))
    assert report["official"]["n"] == 5 and report["official"]["correct"] == 3  # #0, #2, #4
    capsys.readouterr()
    assert cli.main(["score", "--benchmark", "bench-q", "--out", out, "--data", str(data),
                     "--report", str(tmp_path / "r.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["official"]["accuracy"] == pytest.approx(0.6)


def test_synthetic_bench_q_end_to_end(tmp_path):
    from data_pipeline.synthetic import dataset, scene

    root = str(tmp_path / "syn")
    dataset.generate(root, seed=1, train_videos=0, eval_videos=3, tokenizer=False,
                       cfg=scene.SynthConfig(num_frames=6, size=32))
    items = bench_q.load(os.path.join(root, "bench_q.json"), "single")
    assert all(isinstance(s, schema.Sample) for s in items)
    truth = {s.sample_id: s.extra["answer"] for s in items}  # e.g. "(B) Red": right by both parsers
    bench_q.run(items, FakePredictor(truth), str(tmp_path / "p.jsonl"), media_root=root, batch_size=4)
    rep = bench_q.score(runner.read_predictions(str(tmp_path / "p.jsonl")), items)
    assert rep["official"]["accuracy"] == 1.0 and rep["strict"]["accuracy"] == 1.0 and rep["unreadable"] == 0
    assert set(rep["official"]["per_type"]) <= set(bench_q.TYPES)


def test_cli_frame_options_follow_the_family():
    """VRVL3 samples by fps: Bench-Q at 1, Bench-D at 4 (its scripts); --fps overrides; --num_frames,
    a VideoRefer-7B option, is refused for it (and --fps for VideoRefer-7B)."""
    vl3, vr = families.get("videorefer_videollama3"), families.get("videorefer")
    parse = lambda *a: cli.build_parser().parse_args(list(a) + ["--data", "d", "--media_root", "m",  # noqa: E731
                                                                  "--out", "o", "--checkpoint", "c"])
    assert cli.host_options(vl3, "bench-q", parse("bench-q")) == {"fps": 1}
    assert cli.host_options(vl3, "bench-d", parse("bench-d")) == {"fps": 4}
    assert cli.host_options(vl3, "bench-d", parse("bench-d", "--fps", "2")) == {"fps": 2.0}
    assert cli.host_options(vr, "bench-d", parse("bench-d", "--num_frames", "16")) == {"num_frames": 16}
    with pytest.raises(SystemExit, match="--num_frames does not apply"):
        cli.host_options(vl3, "bench-q", parse("bench-q", "--num_frames", "8"))
    with pytest.raises(SystemExit, match="--fps does not apply"):
        cli.host_options(vr, "bench-q", parse("bench-q", "--fps", "1"))
