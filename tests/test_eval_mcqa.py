"""General video MCQA: readers for the MVBench / VideoMME / Perception Test layouts, the official
prompts and answer parsing, scoring, runs through the shared runner and the CLI."""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from data_helpers import conv, frame_level, write_level_video
from data_pipeline import convert, schema
from data_pipeline import video as video_lib
from vrefer_jax.evaluation import cli, mcqa, mvbench, perception_test, runner, videomme
from vrefer_jax import families

SUFFIX = "Answer with the option's letter from the given choices directly and only give the best option."


class FakePredictor:
    def __init__(self, answers, reject=()):
        self.answers, self.seen, self.reject = answers, [], set(reject)

    def answer(self, samples, media_root, gen=None, batch_size=1):
        for s in samples:
            assert isinstance(s, schema.Sample) and not s.objects and s.modality == "video"
            if s.sample_id in self.reject:
                raise schema.SampleError("unreadable_media", s.sample_id, "video", "cannot decode")
            assert os.path.exists(os.path.join(media_root, s.media)), s.media
        self.seen += [s.sample_id for s in samples]
        return [self.answers.get(s.sample_id, "A") for s in samples]


# ----------------------------------------------------------------------------- official references (from reading)


def ref_mvbench(output, letters, options):
    output = output.replace("answer", "").replace("Answer", "")
    hits = re.findall(f"[\\(,\\ ]*[{letters[0]}-{letters[-1]}][\\),\\ ]*", output)
    try:
        if len(hits) == 0:
            idx = None
            for i, opt in enumerate(options):
                if opt.lower() in output.lower():
                    idx = i
                    break
            assert idx is not None
            return idx
        return list(letters).index(hits[0].strip().strip("()"))
    except (AssertionError, ValueError):
        return 2


def ref_videomme(output, options):
    letters = ["A", "B", "C", "D"]
    words = {str(i): w for i, w in enumerate("zero one two three four five six seven eight nine".split())}
    output = output.replace("answer", "").replace("Answer", "")
    hits = re.findall(r"[\(\ \[]*([A-D])[\)\.\ \]]*", output)
    if hits:
        return letters[letters.index(hits[0].strip().strip("()"))]
    for i, opt in enumerate(options):
        if opt.lower() in output.lower() or words.get(opt, opt).lower() in output.lower():
            return letters[i]
    return "C"


def ref_videomme_extract(s):
    s = s.strip()
    for p in ["The best answer is", "The correct answer is", "The answer is", "The answer",
              "The best option isThe correct option is", "Best answer:Best option:"]:
        s = s.replace(p, "")
    if len(s.split()) > 10 and not re.search("[ABCD]", s):
        return ""
    m = re.search(r"[ABCD]", s)
    return "" if m is None else m[0]


def ref_perception(output, options):
    output = output.replace("answer", "").replace("Answer", "")
    hits = re.findall(r"\(*[A-C]\)*", output)
    try:
        assert len(hits) >= 1
        return ["(A)", "(B)", "(C)"].index("(" + hits[0].strip().strip("()") + ")")
    except (AssertionError, ValueError):
        low = [x.lower() for x in options]
        return low.index(output.lower()) if output.lower() in low else 2


OUTPUTS = ["A", "(B)", "C.", " D ", "b", "The answer is B", "Answer: (C)", "(A), (B)", ", C", "A,", "E", "(E)",
           "red", "It is red", "Blue", "three", "3", "I don't know", "", "Bob", "answer", "[D]", "A) x", "(a)",
           "The best answer is D.", "Dogs", "green ball", "C)", "((A))", "option 2"]


def test_parsers_match_references():
    letters, options = ["A", "B", "C", "D"], ["red", "blue", "green ball", "3"]
    for out in OUTPUTS:
        assert mvbench.pred_idx(out, letters, options)[0] == ref_mvbench(out, letters, options), out
        assert videomme.response(out, options)[0] == ref_videomme(out, options), out
        assert videomme.extract(out) == ref_videomme_extract(out), out
        assert perception_test.pred_idx(out, options[:3])[0] == ref_perception(out, options[:3]), out
    assert mvbench.pred_idx("A,", letters, options) == (2, False)  # "A," is not a letter: index 2
    assert mvbench.pred_idx("It is red", letters, options) == (0, True)
    assert videomme.response("three", options) == ("D", True)  # "3" -> "three"
    assert videomme.response("xyz", options) == ("C", False)
    assert videomme.extract("The best option isThe correct option is B") == "B"
    assert perception_test.pred_idx("Answer blue", options[:3]) == (2, False)  # " blue" is no option
    assert perception_test.pred_idx("blue", options[:3]) == (1, True)


# ----------------------------------------------------------------------------- MVBench


def _touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").close()


TASKS = {"Action Sequence": ("action_sequence.json", "star/Charades_v1_480/", "video", True),
         "Episodic Reasoning": ("episodic_reasoning.json", "tvqa/frames_fps3_hq/", "frame", True),
         "Moving Count": ("moving_count.json", "clevrer/video_validation/", "video", False)}


def _mvbench(tmp_path):
    qdir, vdir = tmp_path / "json", tmp_path / "video"
    qdir.mkdir()
    (qdir / "action_sequence.json").write_text(json.dumps([
        {"video": "a1.mp4", "question": "What did the person do first?", "candidates": ["Sat.", "Ran.", "Ate."],
         "answer": "Ran.", "start": 1.5, "end": 7.0},
        {"video": "a2.mp4", "question": "Then?", "candidates": ["x", "y"], "answer": "y", "start": 0, "end": 3}]))
    (qdir / "episodic_reasoning.json").write_text(json.dumps([
        {"video": "ep1", "question": "Who speaks?", "candidates": ["Amy", "Bo", "Cy", "Di"], "answer": "Di",
         "start": 2, "end": 9}]))
    (qdir / "moving_count.json").write_text(json.dumps([
        {"video": "c1.mp4", "question": "How many?", "candidates": ["1", "2", "3"], "answer": "3"}]))
    for p in ("star/Charades_v1_480/a1.mp4", "star/Charades_v1_480/a2.mp4", "clevrer/video_validation/c1.mp4"):
        _touch(str(vdir / p))
    os.makedirs(vdir / "tvqa/frames_fps3_hq/ep1")
    return str(qdir), str(vdir)


def test_mvbench_reader_and_score(tmp_path):
    qdir, vdir = _mvbench(tmp_path)
    items = mvbench.load(qdir, TASKS)
    assert [s.sample_id for s in items] == ["Action Sequence/0", "Action Sequence/1", "Episodic Reasoning/0",
                                            "Moving Count/0"]
    s = items[0]
    assert s.conversations[0]["value"] == ("<video>\nQuestion: What did the person do first?\nOptions:\n"
                                           "(A) Sat.\n(B) Ran.\n(C) Ate.\n" + SUFFIX)
    assert s.media == "star/Charades_v1_480/a1.mp4" and s.extra["answer_idx"] == 1 and s.extra["bound"] == [1.5, 7.0]
    assert items[2].extra["data_type"] == "frame" and items[3].extra["bound"] is None
    out = str(tmp_path / "mv.jsonl")
    fake = FakePredictor({"Action Sequence/0": "(B) Ran.", "Action Sequence/1": "A", "Episodic Reasoning/0": "Di",
                          "Moving Count/0": "I am not sure"})
    mcqa.run(items, fake, out, media_root=vdir, batch_size=2)
    rep = mcqa.score(runner.read_predictions(out), items)
    # B right; A wrong; "Di" -> D by the letter regex, right; no letter/option -> fallback index 2, right
    assert (rep["n"], rep["correct"]) == (4, 3)
    assert rep["per"]["task_type"]["Action Sequence"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert [f["id"] for f in rep["fallback_items"]] == ["Moving Count/0"]
    assert mcqa.score(runner.read_predictions(out))["correct"] == 3  # rows alone carry what scoring needs


def ref_clip_indices(num_source, fps, bound, n):
    """The official `process_video` frame choice with clip bounds, from reading: candidates
    max(int(s*fps)-1, 0) .. min(int(e*fps)-1, N-1), then 'v1' sampling over the candidates."""
    first, last = (0, num_source - 1) if bound is None else (max(int(bound[0] * fps) - 1, 0),
                                                             min(int(bound[1] * fps) - 1, num_source - 1))
    cands = list(range(first, last + 1))
    seg = float(len(cands) - 1) / n
    return [cands[int(np.round((seg * i + seg * (i + 1)) / 2 + 1e-6))] for i in range(n)]


def test_mvbench_clip_bounds_choose_the_frames(tmp_path):
    """Bounded tasks sample inside [start, end] seconds: mp4 at its fps, frame folders at 3 fps;
    checked on the decoded pixels, not only the indices."""
    qdir, vdir = _mvbench(tmp_path)
    write_level_video(os.path.join(vdir, "star/Charades_v1_480/a1.mp4"), 60, fps=10, step=4)  # 6 s
    write_level_video(os.path.join(vdir, "clevrer/video_validation/c1.mp4"), 60, fps=10, step=4)
    ep = os.path.join(vdir, "tvqa/frames_fps3_hq/ep1")
    for i in range(40):
        Image.fromarray(np.full((48, 64, 3), 4 * i, np.uint8)).save(os.path.join(ep, f"{i:05d}.png"))
    items = {s.sample_id: s for s in mvbench.load(qdir, TASKS)}
    cfg = convert.ConvertConfig(num_frames=8, image_size=32, image_format="png")
    cases = {"Action Sequence/0": (60, 10.0, [1.5, 7.0]), "Episodic Reasoning/0": (40, 3.0, [2, 9]),
             "Moving Count/0": (60, 10.0, None)}
    for sid, (n, fps, bound) in cases.items():
        rec = convert.build_record(items[sid], vdir, cfg)
        want = ref_clip_indices(n, fps, bound, 8)
        assert list(rec.frame_indices) == want, sid
        levels = [frame_level(np.pad(video_lib.decode_image(f), ((8, 8), (8, 8), (0, 0)), mode="edge"), 4)
                  for f in rec.frames]
        assert levels == want, sid
        if bound is not None:  # 1.5..7 s at 10 fps: frames 14..59 (the end clipped); 2..9 s at 3 fps: 5..26
            lo, hi = max(int(bound[0] * fps) - 1, 0), min(int(bound[1] * fps) - 1, n - 1)
            assert lo <= min(want) and max(want) <= hi and min(want) - lo <= 3 and hi - max(want) <= 3, sid
    bad = schema.parse_sample({"id": "x", "video": "star/Charades_v1_480/a1.mp4", "conversations": conv("q?")}, 0,
                              extra={"bound": [20, 30]})
    with pytest.raises(schema.SampleError, match="bad_clip_bound"):
        convert.build_record(bad, vdir, cfg)


# ----------------------------------------------------------------------------- VideoMME


def _videomme(tmp_path):
    vdir = tmp_path / "videomme"
    _touch(str(vdir / "abc.mp4"))
    _touch(str(vdir / "def.mkv"))
    recs = [
        {"video_id": "001", "youtube_id": "abc", "url": "https://www.youtube.com/watch?v=abc", "duration": "short",
         "domain": "Knowledge", "sub_category": "Astronomy",
         "questions": [{"question_id": "001-1", "task_type": "Counting Problem", "question": "How many planets?",
                        "choices": ["A. 7.", "B. 8.", "C. 9.", "D. 10."], "answer": "B"},
                       {"question_id": "001-2", "task_type": "OCR Problems", "question": "Title?",
                        "choices": ["A. Sun", "B. Moon", "C. Mars", "D. Venus"], "answer": "C"}]},
        {"video_id": "002", "youtube_id": "def", "url": "https://www.youtube.com/watch?v=def", "duration": "long",
         "domain": "Sports Competition", "sub_category": "Football",
         "questions": [{"question_id": "002-1", "task_type": "Action Recognition", "question": "Who scores?",
                        "choices": ["A. Red team.", "B. Blue team.", "C. Nobody.", "D. Both."], "answer": "A"}]},
        {"video_id": "003", "youtube_id": "gone", "url": "https://www.youtube.com/watch?v=gone", "duration": "medium",
         "domain": "Life Record", "sub_category": "Food",
         "questions": [{"question_id": "003-1", "task_type": "Object Recognition", "question": "Food?",
                        "choices": ["A. a.", "B. b.", "C. c.", "D. d."], "answer": "D"}]}]
    path = tmp_path / "videomme.json"
    path.write_text(json.dumps(recs))
    return str(path), str(vdir)


VIDEOMME_Q1 = ("Select the best answer to the following multiple-choice question based on the video. Respond with only "
               "the letter (A, B, C, or D) of the correct option.\nHow many planets?\nA. 7.\nB. 8.\nC. 9.\nD. 10.\n"
               + SUFFIX + " The best answer is: ")


def test_videomme_reader_and_score(tmp_path):
    data, vdir = _videomme(tmp_path)
    items = videomme.load(data, vdir)
    assert [runner.item_id(s) for s in items] == ["001-1", "001-2", "002-1", "003-1"]
    assert isinstance(items[3], schema.SampleError) and items[3].reason == "media_not_found"
    assert items[2].media == "def.mkv"
    assert items[0].extra["prompt"] == VIDEOMME_Q1
    assert items[0].extra["options"] == ["7", "8", "9", "10"]
    assert items[1].extra["options"] == ["Su", "Moo", "Mar", "Venu"]  # the official cut drops the last character
    subs = videomme.load(data, vdir, subtitles={"abc": "Hello there."})
    assert subs[0].extra["prompt"].startswith("This video's subtitles are listed below:\nHello there.\nSelect")
    assert subs[2].extra["prompt"].startswith("This video's subtitles are listed below:\n\nSelect")
    out = str(tmp_path / "vm.jsonl")
    fake = FakePredictor({"001-1": "The answer is B.", "001-2": "Mars", "002-1": "blue team"})
    mcqa.run(items, fake, out, media_root=vdir)
    assert fake.seen == ["001-1", "001-2", "002-1"]
    rep = mcqa.score(runner.read_predictions(out), items)
    # B right; "Mars" -> C by option text, right; "blue team" -> no A-D letter, option "Blue team" -> B, wrong
    assert (rep["n"], rep["correct"]) == (3, 2)
    assert rep["per"]["duration"]["short"]["accuracy"] == 1.0 and rep["per"]["duration"]["long"]["accuracy"] == 0.0
    assert rep["errors"][0]["id"] == "003-1" and rep["fallback"] == 0


SRT = """1
00:00:00,000 --> 00:00:01,500
Hello
there.

2
00:00:02,000 --> 00:00:03,000
Second line.

3
00:00:03,000 --> 00:00:04,950
Third.
"""
CUES = [(0, 1500, "Hello there."), (2000, 3000, "Second line."), (3000, 4950, "Third.")]  # ms, as written above


def ref_videomme_subtitles(total, fps, n):
    """The official script's subtitle lines, from reading: its `get_seq_frames` frame ids, each
    frame time in ms (pysubs2 rounds frames * 1000 / fps), the first cue strictly around it."""
    seg = float(total - 1) / n
    ids = [(int(np.round(seg * i)) + int(np.round(seg * (i + 1)))) // 2 for i in range(n)]
    lines = []
    for f in ids:
        t = int(round(f * 1000 / fps))
        text = next((c for a, b, c in CUES if a < t < b), "")
        if text.strip():
            lines.append(text)
    return "\n".join(lines)


def test_videomme_subtitles_from_srt(tmp_path):
    data, vdir = _videomme(tmp_path)
    write_level_video(os.path.join(vdir, "abc.mp4"), 50, fps=10)  # 5 s
    sdir = tmp_path / "subtitle"
    sdir.mkdir()
    (sdir / "abc.srt").write_text(SRT)
    text = videomme.read_subtitles(os.path.join(vdir, "abc.mp4"), str(sdir / "abc.srt"), 16)
    assert text == ref_videomme_subtitles(50, 10.0, 16)
    # Frames 1..13 fall in cue 1 (both lines joined by a space), 16 and 19 in the gap, then cues 2 and 3.
    assert text.split("\n")[:6] == ["Hello there."] * 5 + ["Second line."] and "Third." in text
    assert videomme.subtitle_frame_ids(50, 16)[:8] == [1, 4, 7, 10, 13, 16, 19, 22]
    assert videomme.read_subtitles(os.path.join(vdir, "abc.mp4"), str(sdir / "none.srt")) == ""
    items = videomme.load(data, vdir, subtitle_folder=str(sdir))
    assert items[0].extra["prompt"] == f"This video's subtitles are listed below:\n{text}\n" + VIDEOMME_Q1
    assert items[2].extra["prompt"].startswith("This video's subtitles are listed below:\n\nSelect")  # no .srt
    assert isinstance(items[3], schema.SampleError)
    with pytest.raises(ValueError, match="video_folder"):
        videomme.load(data, None, subtitle_folder=str(sdir))
    args = cli.build_parser().parse_args(["mcqa", "--benchmark", "videomme", "--checkpoint", "c", "--data", data,
                                          "--media_root", vdir, "--out", "o.jsonl", "--subtitle_folder", str(sdir)])
    assert cli._items("videomme", args)[0].extra["prompt"] == items[0].extra["prompt"]


# ----------------------------------------------------------------------------- Perception Test


def test_perception_test_reader_submission_and_score(tmp_path, monkeypatch):
    vdir = tmp_path / "pt"
    _touch(str(vdir / "video_1.mp4"))
    data = {"video_1": {"metadata": {"video_id": "video_1"}, "mc_question": [
        {"id": 0, "question": "What is on the table?", "options": ["a cup", "a book", "a pen"], "answer_id": 1,
         "area": "memory"},
        {"id": 1, "question": "How many?", "options": ["one", "two", "three"], "answer_id": 0, "area": "abstraction"}]}}
    path = tmp_path / "pt.json"
    path.write_text(json.dumps(data))
    items = perception_test.load(str(path), str(vdir))
    assert [s.sample_id for s in items] == ["video_1/0", "video_1/1"]
    assert items[0].extra["prompt"] == ("Question: What is on the table?\nOptions:\n(A) a cup\n(B) a book\n(C) a pen\n"
                                        + SUFFIX)
    monkeypatch.setattr(cli, "load_predictor", lambda a: FakePredictor({"video_1/0": "(B)", "video_1/1": "Three"}))
    out = str(tmp_path / "o" / "pt.jsonl")
    assert cli.main(["mcqa", "--benchmark", "perception_test", "--checkpoint", "c", "--data", str(path),
                     "--media_root", str(vdir), "--out", out]) == 0
    sub = json.load(open(tmp_path / "o" / "pt.submission.json"))
    assert sub == {"video_1": [{"id": 0, "answer_id": 1, "answer": "a book"},
                               {"id": 1, "answer_id": 2, "answer": "three"}]}
    rep = json.load(open(tmp_path / "o" / "pt.score.json"))
    assert (rep["n"], rep["correct"]) == (2, 1) and rep["per"]["area"]["memory"]["accuracy"] == 1.0


def test_video_ids_outside_the_video_folder_are_refused(tmp_path):
    """A video id from the data that leaves the video folder is not looked up there (issue #15):
    its questions are `media_outside_root` errors, even when the file it names exists."""
    vdir = tmp_path / "pt"
    _touch(str(vdir / "video_1.mp4"))
    _touch(str(tmp_path / "elsewhere" / "v.mp4"))
    q = {"id": 0, "question": "?", "options": ["a", "b", "c"], "answer_id": 0}
    data = {k: {"metadata": {"video_id": vid}, "mc_question": [q]}
            for k, vid in (("1", "video_1"), ("2", "../elsewhere/v"), ("3", str(tmp_path / "elsewhere" / "v")))}
    items = perception_test.load(data, str(vdir))
    assert isinstance(items[0], schema.Sample)
    assert [(e.reason, e.field) for e in items[1:]] == [("media_outside_root", "metadata.video_id")] * 2
    recs = [{"video_id": "9", "url": "https://www.youtube.com/watch?v=../elsewhere/v", "questions": [
        {"question_id": "9-1", "question": "?", "choices": ["A. a", "B. b", "C. c", "D. d"], "answer": "A"}]}]
    (item,) = videomme.load(recs, str(vdir), subtitle_folder=str(tmp_path / "subs"))
    assert (item.reason, item.sample_id, item.field) == ("media_outside_root", "9-1", "url")


def test_cli_mcqa_sharded_then_score(tmp_path, monkeypatch, capsys):
    qdir, vdir = _mvbench(tmp_path)
    monkeypatch.setattr(mvbench, "TASKS", TASKS)
    frames = []

    def load(args):
        frames.append(cli.host_options(families.get("videorefer"), cli._bench(args), args)["num_frames"])
        return FakePredictor({"Action Sequence/0": "B"})

    monkeypatch.setattr(cli, "load_predictor", load)
    out = str(tmp_path / "mv.jsonl")
    for k in range(2):
        assert cli.main(["mcqa", "--benchmark", "mvbench", "--checkpoint", "c", "--data", qdir, "--media_root", vdir,
                         "--out", out, "--shard_index", str(k), "--num_shards", "2"]) == 0
    assert frames == [16, 16] and len(runner.shard_files(out)) == 2
    capsys.readouterr()
    assert cli.main(["score", "--benchmark", "mvbench", "--out", out, "--data", qdir]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["n"] == 4 and rep["missing"] == [] and rep["correct"] == 1  # only "B" is right


def test_rejected_sample_gets_an_error_row(tmp_path):
    qdir, vdir = _mvbench(tmp_path)
    items = mvbench.load(qdir, TASKS)
    out = str(tmp_path / "mv.jsonl")
    fake = FakePredictor({}, reject={"Action Sequence/1"})
    res = mcqa.run(items, fake, out, media_root=vdir, batch_size=3)
    assert res.written == 3 and res.errors == 1
    assert fake.seen == ["Action Sequence/0", "Episodic Reasoning/0", "Moving Count/0"]
    rows = runner.read_predictions(out)
    assert rows["Action Sequence/1"]["error"]["reason"] == "unreadable_media"
    rep = mcqa.score(rows, items)
    assert rep["n"] == 3 and rep["errors"][0]["id"] == "Action Sequence/1"
