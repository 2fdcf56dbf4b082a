"""Region benchmarks (VRVL3's image / video region scripts): readers, scorers against independent
re-implementations written here, the judge-based scorers against a loopback OpenAI-compatible
server, the runner and CLI end to end (fake predictor), and LVIS with the real VRVL3 predictor."""

import collections
import http.server
import json
import math
import os
import shutil
import threading

import numpy as np
import pytest
from PIL import Image

from data_helpers import box, rle
from data_pipeline import region_formats, schema
from vrefer_jax.evaluation import captioning, category, cli, dlc_bench, judge, ref_l4, runner


# ----------------------------------------------------------------------------- fixtures


def _polygon(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def make_images(root, n=2, h=40, w=56):
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        name = f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(os.path.join(root, name))
        names.append(name)
    return names


def lvis_entries(names, h=40, w=56):
    """Osprey-format entries: image 0 with two categories (polygon, RLE), image 1 with one."""
    return [{"file_name": names[0], "height": h, "width": w, "categories": ["dog_house", "person"],
             "annotations": [{"segmentation": _polygon(4, 4, 20, 16)}, {"segmentation": rle(box(h, w, 20, 30, 36, 50))}]},
            {"file_name": names[1 % len(names)], "height": h, "width": w, "categories": ["red car"],
             "annotations": [{"segmentation": rle(box(h, w, 2, 2, 30, 30))}], "region_num": [1]}]


class ImagePredictor:
    """Scripted answers for image region samples; checks each sample is runnable as the official
    script would run it."""

    def __init__(self, answers=None, tag="<image>"):
        self.answers, self.tag, self.seen = answers or {}, tag, []

    def answer(self, samples, media_root, gen=None, batch_size=1):
        out = []
        for s in samples:
            assert isinstance(s, schema.Sample) and len(s.objects) == 1
            assert os.path.exists(os.path.join(media_root, s.media))
            assert s.conversations[0]["value"] == f"{self.tag}\n" + s.extra["prompt"]
            self.seen.append(s.sample_id)
            out.append(self.answers.get(s.sample_id, "a thing"))
        return out


@pytest.fixture(scope="module")
def tiny_st(tmp_path_factory):
    """A tiny random BERT in the sentence-transformers folder layout (mean pooling, max_seq_length 8)."""
    import torch
    import transformers

    d = tmp_path_factory.mktemp("minilm")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "dog", "house", "person", "red", "car", "a", "the",
             "blue", "hand", "cat", "kennel", "man", "vehicle", "of", "wheel"]
    (d / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = transformers.BertTokenizer(vocab_file=str(d / "vocab.txt"))
    tok.save_pretrained(str(d))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32)
    transformers.BertModel(cfg).save_pretrained(str(d))
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 8, "do_lower_case": False}))
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 16,
                                                              "pooling_mode_mean_tokens": True,
                                                              "pooling_mode_cls_token": False}))
    return str(d)


def reference_ssim(folder, a, b):
    """Direct torch: each text alone (as `SentenceTransformer.encode` on one string), truncated to
    8 tokens, mean over the tokens, cosine."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder).eval()

    def emb(t):
        enc = tok(t, truncation=True, max_length=8, return_tensors="pt")
        with torch.no_grad():
            return model(**enc).last_hidden_state[0].mean(0)

    return float(torch.nn.functional.cosine_similarity(emb(a), emb(b), dim=0))


# ----------------------------------------------------------------------------- LVIS / PACO


def reference_siou(pred, answer):
    def words(s):
        for ch in "_:,.()":
            s = s.replace(ch, " ")
        return set(s.strip().lower().split())

    a, b = words(pred), words(answer)
    return len(a & b) / len(a | b)


SIOU_CASES = [("Dog house", "dog_house", 1.0), ("red car.", "car", 0.5), ("person:hand", "person (hand)", 1.0),
              ("A kennel, of a dog", "dog_house", 1 / 5), ("cat", "dog", 0.0), ("  The MAN ", "man", 0.5),
              ("wheel(car)", "car:wheel", 1.0)]


def test_siou_matches_reference_and_hand_values():
    for pred, answer, want in SIOU_CASES:
        got = category.semantic_iou(pred, answer)
        assert got == pytest.approx(reference_siou(pred, answer), abs=0) and got == pytest.approx(want), (pred, answer)
    assert category.normalise("Dog_House: (A).B,c") == "dog house   a  b c"
    assert category.semantic_iou("...", "(.)") is None  # the official divides by zero here
    rows = [{"id": "a", "pred": "...", "Answer": ":"}, {"id": "b", "pred": "red car", "Answer": "car"}]
    rep = category.score(rows)
    assert [d["id"] for d in rep["degenerate"]] == ["a"] and rep["siou"] == pytest.approx(0.25)
    assert rep["ssim"] is None and "embedding" in rep["ssim_skipped"]


def test_ssim_matches_direct_torch(tiny_st):
    emb = category.SentenceEmbedder(tiny_st, batch_size=3)
    rows = [{"id": str(i), "pred": p, "Answer": a} for i, (p, a, _) in enumerate(SIOU_CASES)]
    rows.append({"id": "long", "pred": "a red car of a blue man of the dog house hand", "Answer": "vehicle"})
    rep = category.score(rows, embedder=emb)
    errs = []
    for r, item in zip(rows, rep["per_item"]):
        want = reference_ssim(tiny_st, category.normalise(r["pred"]), category.normalise(r["Answer"]))
        errs.append(abs(item["ssim"] - want))
    print(f"SSim max abs error vs direct torch: {max(errs):.2e}")
    assert max(errs) <= 1e-5
    assert rep["ssim"] == pytest.approx(np.mean([x["ssim"] for x in rep["per_item"]]), abs=1e-12)
    assert rep["per_item"][0]["ssim"] == pytest.approx(1.0, abs=1e-6)  # "dog house" both sides
    bad = os.path.join(os.path.dirname(tiny_st), "cls_pool")
    shutil.copytree(tiny_st, bad)
    with open(os.path.join(bad, "1_Pooling", "config.json"), "w") as f:
        json.dump({"pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True}, f)
    with pytest.raises(ValueError, match="pooling_mode_cls_token"):
        category.SentenceEmbedder(bad)
    with pytest.raises(FileNotFoundError, match="all-MiniLM"):
        category.SentenceEmbedder(os.path.join(bad, "nope"))


def test_category_reader_rejects_bad_entries_with_reasons():
    good = lvis_entries(["a.png"])
    entries = [good[0], "not an object", {"file_name": "x.png", "height": 0, "width": 5, "categories": ["a"],
                                          "annotations": []},
               {"file_name": "x.png", "height": 40, "width": 56, "categories": ["a", "b", 3],
                "annotations": [{"segmentation": [[1, 2, 3]]}]},
               {"file_name": "x.png", "height": 40, "width": 56, "categories": [], "annotations": []},
               {"height": 40, "width": 56, "categories": ["a"], "annotations": [{"segmentation": None}]}]
    items = region_formats.parse_category_file(entries, "paco")
    got = [(it.sample_id, it.reason if isinstance(it, schema.SampleError) else "ok") for it in items]
    assert got == [("0.0", "ok"), ("0.1", "ok"), ("1", "bad_sample"), ("2", "bad_size"), ("3.0", "bad_segmentation"),
                   ("3.1", "missing_segmentation"), ("3.2", "bad_benchmark_entry"), ("4", "bad_benchmark_entry"),
                   ("5", "bad_benchmark_entry")]
    s = items[0]
    assert s.modality == "image" and s.extra["answer"] == "dog_house" and s.height == 40
    assert s.conversations[0]["value"] == "<image>\n" + region_formats.PACO_PROMPT
    assert "[<region>]" in region_formats.parse_category_file(good, "lvis", "videorefer")[0].extra["prompt"]
    with pytest.raises(ValueError, match="benchmark"):
        region_formats.parse_category_file(good, "coco")


def test_lvis_end_to_end_through_runner_and_cli(tmp_path, tiny_st, monkeypatch, capsys):
    media = str(tmp_path / "img")
    names = make_images(media)
    entries = lvis_entries(names)
    entries.append({"file_name": "missing.png", "height": 40, "width": 56, "categories": ["x"],
                    "annotations": [{"segmentation": [[1, 1, 2]]}]})  # an error row
    data = tmp_path / "lvis.json"
    data.write_text(json.dumps(entries))
    answers = {"0.0": "Dog house.", "0.1": "a man (person)", "1.0": "blue car"}
    items = category.load(str(data), "lvis")
    out = str(tmp_path / "lvis.jsonl")
    fake = ImagePredictor(answers)
    res = category.run(items, fake, out, media_root=media, batch_size=2)
    assert (res.written, res.errors) == (3, 1) and fake.seen == ["0.0", "0.1", "1.0"]
    rows = runner.read_predictions(out)
    assert rows["1.0"]["Answer"] == "red car" and rows["1.0"]["region_num"] == 1 and rows["0.0"]["image"] == names[0]
    rep = category.score(rows, items, category.SentenceEmbedder(tiny_st))
    want_siou = np.mean([reference_siou(answers[k], a) for k, a in (("0.0", "dog_house"), ("0.1", "person"),
                                                                     ("1.0", "red car"))])
    assert rep["n"] == 3 and rep["siou"] == pytest.approx(want_siou) and rep["siou"] == pytest.approx((1 + 1 / 3 + 1 / 3) / 3)
    want_ssim = np.mean([reference_ssim(tiny_st, category.normalise(answers[k]), category.normalise(a))
                         for k, a in (("0.0", "dog_house"), ("0.1", "person"), ("1.0", "red car"))])
    assert abs(rep["ssim"] - want_ssim) <= 1e-5
    assert [e["reason"] for e in rep["errors"]] == ["bad_segmentation"] and rep["missing"] == []

    # the CLI: run (fake predictor) + score, and a rerun of score from the files
    monkeypatch.setattr(cli, "load_predictor", lambda args: ImagePredictor(answers))
    out2 = str(tmp_path / "cli" / "lvis.jsonl")
    assert cli.main(["region", "--benchmark", "lvis", "--checkpoint", "c", "--data", str(data), "--media_root", media,
                     "--out", out2, "--embedding_model", tiny_st]) == 0
    report = json.load(open(tmp_path / "cli" / "lvis.score.json"))
    assert report["siou"] == pytest.approx(rep["siou"]) and report["ssim"] == pytest.approx(rep["ssim"], abs=1e-6)
    capsys.readouterr()
    assert cli.main(["score", "--benchmark", "lvis", "--out", out2, "--data", str(data)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["siou"] == pytest.approx(rep["siou"]) and printed["ssim"] is None


# ----------------------------------------------------------------------------- boxes, VG, Ref-L4, HC-STVG, DLC readers


def test_box_masks_follow_the_official_slicing():
    m = region_formats.box_mask([2.9, 1.2, 3.7, 2.5], 6, 8)  # int(): x 2, y 1, w 3, h 2
    want = np.zeros((6, 8), bool)
    want[1:3, 2:5] = True
    assert (m == want).all()
    m = region_formats.box_mask([-3, -2, 6, 4], 6, 8)  # starts clamped at 0, ends y+h=2, x+w=3
    assert m.sum() == 2 * 3 and m[:2, :3].all()
    m = region_formats.box_mask([5, 4, 100, 100], 6, 8)  # clipped at the border
    assert m.sum() == 2 * 3 and m[4:, 5:].all()
    assert region_formats.box_mask([2, 2, 0, 3], 6, 8).sum() == 0
    r = region_formats.box_rle([2, 1, 3, 2], 6, 8)
    from data_pipeline import masks as masks_lib

    dec = masks_lib.decode_segmentation(masks_lib.parse_segmentation(r), 6, 8)
    assert (dec == region_formats.box_mask([2, 1, 3, 2], 6, 8)).all()


def test_vg_refl4_hcstvg_readers(tmp_path):
    vg = [{"image": ["vg/1.jpg"], "height": 30, "width": 40, "caption": "a red car", "boxes": [[1, 2, 10, 8], [0, 0, 1, 1]]},
          {"image": "vg/2.jpg", "height": 30, "width": 40, "caption": "x", "boxes": [[1, 2, "a", 8]]},
          {"image": [], "height": 30, "width": 40, "caption": "x", "boxes": [[1, 2, 3, 4]]},
          {"image": "vg/3.jpg", "height": 30, "width": 40, "caption": "", "boxes": [[1, 2, 3, 4]]},
          {"image": "vg/3.jpg", "height": 30, "width": 40, "caption": "y", "boxes": [[1, 2, float("nan"), 4]]}]
    items = captioning.load(vg, "vg")
    assert [getattr(it, "reason", "ok") for it in items] == ["ok", "bad_box", "bad_media", "bad_benchmark_entry", "bad_box"]
    s = items[0]
    assert s.media == "vg/1.jpg" and s.extra["box"] == [1, 2, 10, 8] and s.extra["answer"] == "a red car"
    assert s.conversations[0]["value"] == "<image>\nPlease describe <region> briefly."

    lines = [json.dumps({"id": 7, "file_name": "objects365/a.jpg", "height": 30, "width": 40, "caption": "a cup",
                         "bbox": [1.5, 2.5, 5.2, 4.9]}),
             json.dumps({"id": 8, "file_name": "coco/b.jpg", "height": 30, "width": 40, "caption": "x", "bbox": [1, 1, 2, 2]}),
             "{not json",
             json.dumps({"id": 7, "file_name": "objects365/c.jpg", "height": 30, "width": 40, "caption": "dup",
                         "bbox": [1, 1, 2, 2]}),
             json.dumps({"id": 9, "file_name": "objects365/d.jpg", "height": 30, "width": 40, "caption": "z", "bbox": [1, 1]})]
    path = tmp_path / "ref-l4-val.json"  # JSON Lines despite the name, as the official file
    path.write_text("\n".join(lines) + "\n")
    items = ref_l4.load(str(path))
    assert [(it.sample_id, getattr(it, "reason", "ok")) for it in items] == [
        ("7", "ok"), ("#1", "bad_json_line"), ("#2", "duplicate_id"), ("9", "bad_box")]
    runner.check_unique_ids(items)  # every entry keeps a row of its own
    assert items[0].extra["box"] == [1, 2, 5, 4] and items[0].conversations[0]["value"].endswith("in brief.")
    assert len(ref_l4.load(str(path), subset="all")) == 5

    hc = [{"video": "v/1.mp4", "frame_idx": 3, "mask": rle(box(20, 30, 2, 2, 10, 10)), "caption": "a man walks"},
          {"video": "v/2.mp4", "frame_idx": "x", "mask": None, "caption": "c"},
          {"video": "v/3.mp4", "frame_idx": 1, "caption": "c"},
          {"video": "v/4.mp4", "frame_idx": 1, "mask": {"size": [20, 30], "counts": ""}, "caption": "c"}]
    items = captioning.load(hc, "hcstvg")
    assert [getattr(it, "reason", "ok") for it in items] == ["ok", "bad_benchmark_entry", "missing_segmentation", "empty_rle"]
    s = items[0]
    assert s.modality == "video" and s.objects[0].frames == (3,) and s.extra["frame_idx"] == 3
    assert s.conversations[0]["value"] == "<video>\n" + region_formats.HCSTVG_PROMPT


def test_dlc_reader():
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "height": 30, "width": 40},
                       {"id": 2, "file_name": "b.jpg", "height": 30, "width": 40}, {"file_name": "c.jpg"}],
            "annotations": [{"id": 11, "image_id": 2, "segmentation": _polygon(1, 1, 9, 9)},
                            {"id": 10, "image_id": 1, "segmentation": rle(box(30, 40, 1, 1, 5, 5))},
                            {"id": 12, "image_id": 1, "segmentation": [[1, 2]]},
                            {"id": 13, "image_id": 99, "segmentation": None}, {"image_id": 1},
                            {"id": 10, "image_id": 2, "segmentation": None}]}
    items = dlc_bench.load(coco)
    got = [(it.sample_id, getattr(it, "reason", "ok")) for it in items]
    # errors found before the image walk come first; then images in file order, their annotations in file order
    assert got == [("image#2", "bad_benchmark_entry"), ("13", "bad_benchmark_entry"), ("ann#4", "bad_benchmark_entry"),
                   ("ann#5", "duplicate_id"), ("10", "ok"), ("12", "bad_segmentation"), ("11", "ok")]
    runner.check_unique_ids(items)
    assert items[4].conversations[0]["value"] == "<image>\n" + region_formats.DLC_PROMPT


# ----------------------------------------------------------------------------- caption metrics


def _ngrams(words, n):
    return collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def reference_bleu(refs, preds, n_max=4):
    """Corpus BLEU with one reference per item: clipped n-gram precisions, geometric mean, brevity
    penalty exp(1 - r/c) when c < r."""
    out = []
    c = sum(len(p.split()) for p in preds)
    r = sum(len(x[0].split()) for x in refs)
    for n in range(1, n_max + 1):
        logs = []
        for k in range(1, n + 1):
            match = total = 0
            for ref, pred in zip(refs, preds):
                pc, rc = _ngrams(pred.split(), k), _ngrams(ref[0].split(), k)
                match += sum(min(v, rc[g]) for g, v in pc.items())
                total += max(len(pred.split()) - k + 1, 0)
            logs.append(math.log(match / total))
        bp = 1.0 if c >= r else math.exp(1 - r / c)
        out.append(bp * math.exp(sum(logs) / n))
    return out


def reference_rouge_l(ref, pred, beta=1.2):
    a, b = pred.split(), ref.split()
    dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a)):
        for j in range(len(b)):
            dp[i + 1][j + 1] = dp[i][j] + 1 if a[i] == b[j] else max(dp[i][j + 1], dp[i + 1][j])
    lcs = dp[-1][-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return (1 + beta ** 2) * p * r / (r + beta ** 2 * p)


def reference_cider_d(refs, preds, sigma=6.0):
    """CIDEr-D from its definition: tf-idf n-gram vectors (idf = log(N) - log(max(1, df)) over the
    items' references), candidate counts clipped by the reference's, cosine, Gaussian length
    penalty, mean over n = 1..4, x10, mean over references and items."""
    N = len(refs)
    df = collections.Counter()
    for rs in refs:
        df.update({g for r in rs for n in range(1, 5) for g in _ngrams(r.split(), n)})

    def vec(text):
        v = []
        for n in range(1, 5):
            v.append({g: tf * (math.log(N) - math.log(max(1.0, df[g]))) for g, tf in _ngrams(text.split(), n).items()})
        return v

    scores = []
    for rs, p in zip(refs, preds):
        vp = vec(p)
        total = 0.0
        for r in rs:
            vr = vec(r)
            delta = len(p.split()) - len(r.split())
            s = 0.0
            for n in range(4):
                num = sum(min(w, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, w in vp[n].items())
                na = math.sqrt(sum(w * w for w in vp[n].values()))
                nb = math.sqrt(sum(w * w for w in vr[n].values()))
                if na and nb:
                    s += num / (na * nb) * math.exp(-(delta ** 2) / (2 * sigma ** 2))
            total += s / 4 * 10
        scores.append(total / len(rs))
    return float(np.mean(scores)), scores


CAPTION_REFS = [["a man in a red shirt is walking a dog"], ["two dogs are running on the grass"],
                ["a woman holding a blue umbrella in the rain"], ["the car is parked next to a tree"]]
CAPTION_PREDS = ["A man in a red shirt walks his dog.", "Two dogs run on green grass!",
                 "a woman with an umbrella, in the rain", "A tree next to a car that is parked."]


def test_bleu_rouge_cider_match_independent_implementations():
    pytest.importorskip("pycocoevalcap")
    res = captioning.caption_scores(CAPTION_REFS, CAPTION_PREDS, tokenizer="python", meteor=False, spice=False)
    assert res["tokenizer"] == "python" and res["skipped"] == {"METEOR": "not asked", "SPICE": "not asked"}
    refs = [[captioning.ptb_tokenize_python(r) for r in rs] for rs in CAPTION_REFS]
    preds = [captioning.ptb_tokenize_python(p) for p in CAPTION_PREDS]
    assert preds[0] == "a man in a red shirt walks his dog" and preds[2] == "a woman with an umbrella in the rain"
    bleu = reference_bleu(refs, preds)
    rouge = [reference_rouge_l(r[0], p) for r, p in zip(refs, preds)]
    cider, cider_items = reference_cider_d(refs, preds)
    s = res["scores"]
    errs = {f"Bleu_{n + 1}": abs(s[f"Bleu_{n + 1}"] - bleu[n]) for n in range(4)}
    errs["ROUGE_L"] = abs(s["ROUGE_L"] - np.mean(rouge))
    errs["CIDEr"] = abs(s["CIDEr"] - cider)
    errs["CIDEr items"] = max(abs(a - b) for a, b in zip(res["per_item"]["CIDEr"], cider_items))
    print("caption metrics:", {k: round(v, 4) for k, v in s.items()}, "max abs errors:", errs)
    assert max(errs.values()) <= 1e-6
    # hand value: a perfect copy of every reference
    perfect = captioning.caption_scores(CAPTION_REFS, [r[0] for r in CAPTION_REFS], tokenizer="python",
                                        meteor=False, spice=False)["scores"]
    assert perfect["Bleu_4"] == pytest.approx(1.0, abs=1e-6) and perfect["ROUGE_L"] == pytest.approx(1.0)
    # every n-gram of a reference occurs in one item only here, so idf = log 4 for all: CIDEr-D = 10
    assert perfect["CIDEr"] == pytest.approx(10.0)


# Typical region captions (VG / HC-STVG / model outputs) on which the Python tokenizer must agree
# with the Java one.
PTB_CAPTIONS = [
    "A man in a red shirt walks his dog.", "The woman's umbrella is blue, isn't it?", "Two dogs (brown) run.",
    "He can't see the \"old\" car; it's parked.", "A well-known 3.5 m tall U.S. statue...", "the kids' toys",
    "A man wearing a hat, glasses and a coat - walking", "The bus--a red one--stops!", "I'm sure they're here, we've seen it",
    "Mr. Smith and Dr. Who etc. are here.", "The cat cannot jump 1,000 times at 10:30 a.m.", "50% of $5 is #1",
    "A person standing on the left side of the frame", "an e-mail and/or a 1/2 cup", "Wow!! Really?", "x+y=z",
    "The man\u2019s \u201cnew\u201d bike", "It is 5.", "the end etc.", "a b", "", "Ends with a period.The next one"]


def test_python_ptb_tokenizer_matches_java():
    pytest.importorskip("pycocoevalcap")
    if not captioning.java_available():
        pytest.skip("no java: the Java tokenizer cannot be compared")
    java = captioning.ptb_tokenize_java(PTB_CAPTIONS)
    py = [captioning.ptb_tokenize_python(c) for c in PTB_CAPTIONS]
    diffs = [(c, j, p) for c, j, p in zip(PTB_CAPTIONS, java, py) if j != p]
    assert not diffs, diffs
    toks, used = captioning.tokenize(PTB_CAPTIONS[:3])
    assert used == "java" and toks == java[:3]


def test_meteor_with_java_and_skips_without(monkeypatch):
    pytest.importorskip("pycocoevalcap")
    if captioning.java_available():
        res = captioning.caption_scores([["a man walking a dog"], ["two dogs on grass"], ["a red car"]],
                                        ["a man walking a dog", "a cat sleeping inside", "a red automobile"],
                                        spice=True)
        per = res["per_item"]["METEOR"]
        print("METEOR per item:", per, "corpus:", res["scores"]["METEOR"], "SPICE:", res["skipped"].get("SPICE"))
        assert res["tokenizer"] == "java" and per[0] > 0.9 and per[1] < 0.2 and 0 < res["scores"]["METEOR"] < 1
        assert "SPICE" in res["scores"] or "stanford-corenlp-3.6.0" in res["skipped"]["SPICE"]
    monkeypatch.setattr(captioning.shutil, "which", lambda name: None)
    res = captioning.caption_scores([["a red car"]], ["a red car"])
    assert res["tokenizer"] == "python" and res["skipped"] == {"METEOR": "no java on the PATH",
                                                               "SPICE": "no java on the PATH"}
    assert res["scores"]["CIDEr"] == 0.0 and res["scores"]["Bleu_1"] == pytest.approx(1.0)  # idf log(1) = 0
    with pytest.raises(RuntimeError, match="no java"):
        captioning.tokenize(["x"], "java")


def test_vg_runner_and_score(tmp_path):
    pytest.importorskip("pycocoevalcap")
    media = str(tmp_path / "img")
    names = make_images(media, n=2)
    vg = [{"image": [names[i % 2]], "height": 40, "width": 56, "caption": CAPTION_REFS[i][0],
           "boxes": [[2 + i, 3, 20, 15]]} for i in range(4)]
    items = captioning.load(vg, "vg")
    out = str(tmp_path / "vg.jsonl")
    captioning.run(items, ImagePredictor({f"#{i}": p for i, p in enumerate(CAPTION_PREDS)}), out, media_root=media)
    rep = captioning.score(runner.read_predictions(out), items, "vg", tokenizer="python", meteor=False, spice=False)
    want = captioning.caption_scores(CAPTION_REFS, CAPTION_PREDS, tokenizer="python", meteor=False, spice=False)
    assert rep["n"] == 4 and rep["CIDEr"] == pytest.approx(want["scores"]["CIDEr"])
    assert rep["per_item"][1]["id"] == "#1" and rep["missing"] == []


# ----------------------------------------------------------------------------- judge server


class Server:
    """OpenAI-compatible /v1/chat/completions on 127.0.0.1; `respond(prompt, seen)` gives the reply
    text for a user prompt (`seen`: how often that prompt was asked before)."""

    def __init__(self, respond):
        self.requests, self.bodies, self.seen = 0, [], collections.Counter()
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests += 1
                outer.bodies.append(body)
                prompt = body["messages"][-1]["content"]
                text = respond(prompt, outer.seen[prompt])
                outer.seen[prompt] += 1
                data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _client(url, cache, **kw):
    cfg = judge.JudgeConfig(base_url=url, model="judge-x", backoff=0.0, workers=3, **kw)
    return judge.JudgeClient(cfg, cache, sleep=lambda s: None)


# ----------------------------------------------------------------------------- DLC-Bench


def test_parse_choice_follows_dam_rules():
    ch = ["Red", "Not mentioned", "Blue"]
    cases = {"A. Red": 0, "red": 0, "b": 1, "  C  ": 2, "The car is blue": 2, "red or blue, mostly blue": 2,
             "b. something": 1, "not": 1, "re": 0, "c\nbecause": 2, "d. what": None, "": None, "green": None,
             "It is not mentioned": 1, "red, not mentioned": 1, "e": 1, "x": None}
    for reply, want in cases.items():
        assert dlc_bench.parse_choice(reply, ch) == want, reply
    # "e" lies inside all three choices: the longest one; a tie in position: the longest choice
    assert dlc_bench.parse_choice("x big dog", ["big", "big dog"]) == 1
    assert dlc_bench.parse_choice("x big dog", ["big dog", "big"]) == 0


DLC_QA = {
    "1": [{"question": "What colour is the car?", "choices": [["Red", 1], ["Not mentioned", 0], ["Blue", -1]],
           "type": "positive"},
          {"question": "Is the car old?", "choices": [["Old", 1], ["Not mentioned", 0]], "type": "positive"},
          {"question": "Does it mention a driver?", "choices": [["Not mentioned", 1], ["A driver", -1]],
           "type": "negative"}],
    "2": [{"question": "Are they round?", "choices": [["Round", 1], ["Not mentioned", 0]], "type": "positive"}],
    "3": [{"question": "What colour is the dog?", "choices": [["Brown", 1], ["Not mentioned", 0]], "type": "positive"},
          {"question": "Does it mention a leash?", "choices": [["Not mentioned", 1], ["A leash", -1]],
           "type": "negative"}],
    "4": [{"question": "Q", "choices": [["A", 1]], "type": "positive"}],
    "5": [{"question": "Q", "choices": [["A", 1]], "type": "sideways"}],
}
DLC_NAMES = {"1": "car", "2": "glasses", "3": "dog", "4": "cat", "5": "cup"}


def _dlc_respond(prompt, seen):
    if "likely to be" in prompt:
        return "No" if "NOTRECOG" in prompt else "Yes"
    if "What colour is the car?" in prompt:
        return "A. Red"
    if "Is the car old?" in prompt:
        return "I am not sure" if seen == 0 else "B. Not mentioned"
    if "Does it mention a driver?" in prompt:
        return "Not mentioned"
    if "Are they round?" in prompt:
        return "b"
    if "What colour is the dog?" in prompt:
        return "A"
    return "B"  # the leash: choice 1 = -1


def test_dlc_judge_scores_caps_lists_and_caches(tmp_path):
    pytest.importorskip("inflect")
    server = Server(_dlc_respond)
    try:
        rows = [{"id": "1", "pred": "A red car parked."}, {"id": "2", "pred": "Some glasses."},
                {"id": "3", "pred": "NOTRECOG a cat."}, {"id": "9", "pred": "not in qa"}]
        cache = str(tmp_path / "c.jsonl")
        client = _client(server.url, cache)
        rep = dlc_bench.score(rows, client, DLC_QA, DLC_NAMES)
        # item 1: pos (1 + 0) / 2, neg 1; item 2: pos 0, no negatives; item 3: recognition failed,
        # pos min(0, 1) = 0, neg min(0, -1) = -1
        assert rep["n"] == 3 and rep["n_neg"] == 2
        assert rep["avg_pos"] == pytest.approx(1 / 6) and rep["avg_neg"] == pytest.approx(0.0)
        assert rep["average"] == pytest.approx(1 / 12)
        assert rep["recognition_failed"] == ["3"] and rep["missing"] == ["4"] and rep["unknown"] == ["9"]
        assert [(u["id"], u["question"]) for u in rep["unparsed"]] == [("1", 2)]
        assert rep["unparsed"][0]["reply"] == "I am not sure"
        assert [b["id"] for b in rep["bad_qa"]] == ["5"]
        assert server.requests == 9 and client.requests == 9
        prompts = [b["messages"][0]["content"] for b in server.bodies]
        assert all(b["temperature"] == 0.0 and b["model"] == "judge-x" for b in server.bodies)
        assert any("likely to be a car," in p for p in prompts) and any("likely to be a dog," in p for p in prompts)
        assert any("Are the objects in the description likely to be glasses" in p for p in prompts)
        assert any("A. Red\nB. Not mentioned\nC. Blue" in p and "A red car parked." in p for p in prompts)
        print("DLC pos/neg/avg:", rep["avg_pos"], rep["avg_neg"], rep["average"], "requests:", server.requests)

        client2 = _client(server.url, cache)  # a later run: only the unparsed reply is asked again (and now parses)
        rep2 = dlc_bench.score(rows, client2, DLC_QA, DLC_NAMES)
        assert client2.requests == 1 and rep2["unparsed"] == [] and rep2["avg_pos"] == pytest.approx(1 / 6)
        client3 = _client(server.url, cache)
        dlc_bench.score(rows, client3, DLC_QA, DLC_NAMES)
        assert client3.requests == 0
    finally:
        server.close()


def test_dlc_cli_run_and_score(tmp_path, monkeypatch):
    pytest.importorskip("inflect")
    server = Server(_dlc_respond)
    try:
        media = str(tmp_path / "DLC-Bench" / "images")
        names = make_images(media, n=2)
        coco = {"images": [{"id": i, "file_name": n, "height": 40, "width": 56} for i, n in enumerate(names)],
                "annotations": [{"id": 1, "image_id": 0, "segmentation": _polygon(2, 2, 20, 20)},
                                {"id": 2, "image_id": 1, "segmentation": rle(box(40, 56, 5, 5, 30, 30))},
                                {"id": 3, "image_id": 1, "segmentation": _polygon(30, 10, 50, 30)}]}
        root = tmp_path / "DLC-Bench"
        (root / "annotations.json").write_text(json.dumps(coco))
        (root / "qa.json").write_text(json.dumps({k: DLC_QA[k] for k in ("1", "2", "3")}))
        (root / "class_names.json").write_text(json.dumps(DLC_NAMES))
        preds = {"1": "A red car parked.", "2": "Some glasses.", "3": "NOTRECOG a cat."}
        monkeypatch.setattr(cli, "load_predictor", lambda args: ImagePredictor(preds))
        monkeypatch.setenv(judge.ENV_BASE_URL, server.url)
        out = str(tmp_path / "dlc.jsonl")
        assert cli.main(["region", "--benchmark", "dlc", "--checkpoint", "c", "--data", str(root / "annotations.json"),
                         "--media_root", media, "--out", out]) == 0
        rep = json.load(open(tmp_path / "dlc.score.json"))
        assert rep["n"] == 3 and rep["average"] == pytest.approx(1 / 12) and rep["missing"] == []
        assert os.path.exists(tmp_path / "dlc.judge_cache.jsonl")
    finally:
        server.close()


# ----------------------------------------------------------------------------- Ref-L4 CLAIR


def _clair_respond(prompt, seen):
    if "REGEX" in prompt:
        return "Score: 0.65, Reason: mostly the same"
    if "NEVER" in prompt:
        return "I cannot tell."
    if "ONCEBAD" in prompt and seen == 0:
        return "hmm"
    if "ONCEBAD" in prompt:
        return 'Here: {"score": 40, "reason": "partly"}'
    return '{"score": 80, "reason": "close"}'


def test_parse_clair():
    assert ref_l4.parse_clair('x {"score": "72.5", "reason": "r"} y') == (72.5, "r", "json")
    assert ref_l4.parse_clair('{"score": 0.5}') == (0.5, "Unknown", "json")  # JSON: no rescaling
    assert ref_l4.parse_clair("score 0.5") == (50.0, "Unknown", "regex")
    assert ref_l4.parse_clair('{"score": 90, "reason": "a {b} c"}')[0] == 90.0  # JSON broken by "}": regex finds 90
    assert ref_l4.parse_clair("Reason: fine. 3 of 4") == (3.0, "fine. 3 of 4", "regex")
    assert ref_l4.parse_clair("no number") == (None, None, None)


def test_clair_scores_retries_and_cache(tmp_path):
    server = Server(_clair_respond)
    try:
        rows = [{"id": "a", "pred": "A red car", "Answer": "red car"}, {"id": "b", "pred": "REGEX", "Answer": "x"},
                {"id": "c", "pred": "NEVER", "Answer": "y"}, {"id": "d", "pred": "ONCEBAD", "Answer": "z"}]
        cache = str(tmp_path / "clair.jsonl")
        client = _client(server.url, cache)
        rep = ref_l4.score(rows, client)
        assert rep["clair"] == pytest.approx((0.8 + 0.65 + 0.0 + 0.4) / 4) and rep["n"] == 4
        assert [x["score"] for x in rep["per_item"]] == pytest.approx([0.8, 0.65, 0.0, 0.4])
        assert [u["id"] for u in rep["unparsed"]] == ["c"] and "5 tries" in rep["unparsed"][0]["reason"]
        assert [r["id"] for r in rep["regex_parsed"]] == ["b"]
        assert server.requests == 1 + 1 + 5 + 2 == client.requests
        first = next(b["messages"][0]["content"] for b in server.bodies if "A red car" in b["messages"][0]["content"])
        assert "Candidate set:\n- A red car\n" in first and "Reference set:\n- red car\n" in first
        assert all(b["temperature"] == 0.0 and len(b["messages"]) == 1 for b in server.bodies)
        print("CLAIR:", rep["clair"], "requests:", server.requests)
        client2 = _client(server.url, cache)  # everything is final in the cache (c: its 5 tries are used up)
        assert ref_l4.score(rows, client2)["clair"] == pytest.approx(rep["clair"]) and client2.requests == 0
        # the official iteration over a string reference: one line per character
        before = server.requests
        ref_l4.score(rows[:1], _client(server.url, None), char_references=True)
        assert "Reference set:\n- r\n- e\n- d\n-  \n- c\n" in server.bodies[before]["messages"][0]["content"]
    finally:
        server.close()


# ----------------------------------------------------------------------------- the real VRVL3 predictor


def test_lvis_with_the_real_vl3_predictor(tmp_path):
    """Two LVIS images (a polygon mask and an RLE mask) and a VG box through the shared runner with
    a tiny random VRVL3: the official prompt with VRVL3's bracketed region tokens, one row each."""
    import argparse

    import jax

    from test_vl3_prompt import _bpe
    from vrefer_jax import families
    from vrefer_jax.config import TextConfig
    from vrefer_jax.inference.predictor import Predictor
    from vrefer_jax.inference.sampling import GenerationConfig
    from vrefer_jax.text import vl3_prompt
    from vrefer_jax.vl3_config import NaViTConfig, VL3Config

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    _bpe().save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}))
    tok = vl3_prompt.load_vl3_tokenizer(str(tok_dir))
    cfg = VL3Config(
        vision=NaViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        text=TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=True),
        mm_max_length=48, image_token_id=tok.token_to_id("<image>"), region_token_id=tok.token_to_id("<REGION>"),
        pad_token_id=tok.pad_id)
    fam = families.get("videorefer_videollama3")
    # random parameters from the abstract shapes (a traced `init` costs ~30 s on 2 CPU cores)
    rng = np.random.default_rng(0)
    params = jax.tree.map_with_path(
        lambda path, a: (np.ones(a.shape, a.dtype) if "scale" in str(path[-1]) else
                         np.zeros(a.shape, a.dtype) if "bias" in str(path[-1]) else
                         (0.05 * rng.standard_normal(a.shape)).astype(a.dtype)), fam.abstract_params(cfg))
    gen = GenerationConfig(max_new_tokens=4, eos_token_ids=(tok.eos_id,), pad_token_id=tok.pad_id)
    predictor = Predictor(cfg, params, tok, generation=gen)
    args = argparse.Namespace(num_frames=None, fps=None, max_frames=None)
    predictor.configure(**cli.host_options(fam, "lvis", args))
    assert cli.host_options(fam, "hcstvg", args) == {"fps": 4}

    media = str(tmp_path / "img")
    names = make_images(media, n=2, h=42, w=70)
    entries = [{"file_name": names[0], "height": 42, "width": 70, "categories": ["dog"],
                "annotations": [{"segmentation": _polygon(4, 4, 30, 20)}]},
               {"file_name": names[1], "height": 42, "width": 70, "categories": ["car"],
                "annotations": [{"segmentation": rle(box(42, 70, 10, 30, 40, 66))}]}]
    items = category.load(entries, "lvis", fam.bench_protocol)
    p = predictor.prepare(items[0], media)
    text = tok.decode(p.input_ids, skip_special_tokens=False)
    assert "<image>\nWhat is the category of [<REGION>" in text and "]? Using only one word or phrase." in text
    assert "[[" not in text
    out = str(tmp_path / "lvis.jsonl")
    res = category.run(items, predictor, out, media_root=media, batch_size=2)
    rows = runner.read_rows(out)
    assert (res.written, res.errors) == (2, 0) and all(isinstance(r["pred"], str) for r in rows)
    assert category.score(rows, items)["n"] == 2

    # a 3x3-pixel VG box (float masks would break the official token count): one region token row
    vg = captioning.load([{"image": [names[0]], "height": 42, "width": 70, "caption": "x", "boxes": [[10, 10, 3, 3]]}],
                         "vg", fam.bench_protocol)
    p = predictor.prepare(vg[0], media)
    assert int((p.input_ids == cfg.region_token_id).sum()) >= 1 and not p.warnings
