"""Region captioning: Visual Genome (VRVL3 `infer_vg.py`) and HC-STVG (`infer_hc_stvg.py`), scored
with the COCO caption metrics as the official `change2eval_format.py` + `eval_cococap.py` do.

Items: VG, one image region per entry (box -> mask, prompt `Please describe <region> briefly.`);
HC-STVG, one video per entry sampled at fps 4 (the family's `hcstvg` protocol) with the mask on
frame `frame_idx`, prompt `<video>\\nPlease describe the important aspects of the marked object
<region> in the video. Output in one sentense.` Rows carry `Answer` and `pred`, as the official.

Scoring (`caption_scores`), as `COCOEvalCap.evaluate` with one reference and one prediction per
item: captions are PTB-tokenised, then BLEU-1..4 (corpus level, 'closest' reference length),
METEOR 1.5, ROUGE-L (beta 1.2), CIDEr-D (sigma 6, IDF over this evaluation's references) and
SPICE, each by `pycocoevalcap`'s own scorer (install with `pip install 'vrefer-jax[eval]'`).

Java: pycocoevalcap's PTB tokenizer, METEOR and SPICE run Java programs. Without `java` on the PATH:
* tokenisation falls back to `ptb_tokenize_python`, our re-implementation of what the Stanford
  PTBTokenizer 3.4.1 (`-preserveLines -lowerCase`) followed by pycocoevalcap's punctuation filter
  produces on caption text (tests check it against the Java tokenizer on crafted captions when
  Java is there). Known differences: rare constructs (URLs, e-mail addresses, emoticons, `'n'`,
  `'tis`, words glued by `;`) and abbreviations outside a short list. The report names the
  tokenizer used (`tokenizer`: "java" | "python").
* METEOR and SPICE are reported under `skipped` with the reason ("no java"); nothing crashes.
SPICE also needs the Stanford CoreNLP 3.6.0 jars in pycocoevalcap's `spice/lib`, which
pycocoevalcap downloads on first use; we never download: without them SPICE is skipped with that
reason. The official script prints every metric; the reported VRVL3 figures are METEOR and CIDEr.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from data_pipeline import region_formats, schema
from vrefer_jax.evaluation import runner

BENCHMARKS = ("vg", "hcstvg")
METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
# pycocoevalcap's filter, applied to the lower-cased tokens: "-LRB-" etc. never match them, so
# bracket tokens stay ("-lrb-"), as in the official numbers.
PUNCTUATIONS = ("''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...",
                ";")
_PTB_JAR = "stanford-corenlp-3.4.1.jar"
_LINE_BREAKS = str.maketrans({c: " " for c in "\n\r\x0b\x0c\x85\u2028\u2029"})
_SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def load(data: str | Sequence, benchmark: str, protocol: str = "vl3") -> list[runner.Item]:
    """VG / HC-STVG JSON (path or list) -> items; repeated ids are `duplicate_id` error rows."""
    parse = {"vg": region_formats.parse_vg, "hcstvg": region_formats.parse_hcstvg}.get(benchmark)
    if parse is None:
        raise ValueError(f"benchmark must be one of {BENCHMARKS}, got {benchmark!r}")
    return region_formats.parse_all(runner.load_json(data), lambda raw, i: parse(raw, i, protocol))


def row_fields(s: schema.Sample) -> dict[str, Any]:
    e = s.extra
    row = {"Answer": e["answer"]}
    if s.modality == "video":
        row.update(video=s.media, frame_idx=e["frame_idx"])
    else:
        row.update(image=e["image"], box=e["box"])
    return row


run = functools.partial(runner.run_predictions, row_fn=row_fields)


# ----------------------------------------------------------------------------- tokenisation


def java_available() -> bool:
    return shutil.which("java") is not None


def _evalcap_dir() -> str:
    try:
        import pycocoevalcap
    except ImportError as e:
        raise ImportError("caption metrics need pycocoevalcap (pip install 'vrefer-jax[eval]')") from e
    return os.path.abspath(list(pycocoevalcap.__path__)[0])  # a namespace package: no __file__


def _filter(line: str) -> str:
    return " ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS)


def ptb_tokenize_java(captions: Sequence[str]) -> list[str]:
    """pycocoevalcap's `PTBTokenizer`: the Stanford PTBTokenizer over one caption per line
    (newlines inside a caption become spaces), lower-cased, punctuation tokens removed. The input
    file goes to a temporary folder (pycocoevalcap writes it next to its jar, which fails in a
    read-only install)."""
    jar = os.path.join(_evalcap_dir(), "tokenizer", _PTB_JAR)
    # one caption per line: other line breaks would shift the lines (pycocoevalcap only replaces "\n")
    text = "\n".join(c.translate(_LINE_BREAKS) for c in captions)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "captions.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        out = subprocess.run(["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                              "-lowerCase", path], capture_output=True, check=True).stdout.decode("utf-8")
    lines = out.split("\n")
    if lines and lines[-1] == "" and len(lines) == len(captions) + 1:
        lines = lines[:-1]
    if len(lines) != len(captions):
        raise RuntimeError(f"PTBTokenizer returned {len(lines)} lines for {len(captions)} captions")
    return [_filter(line) for line in lines[:len(captions)]]


_ABBREVIATIONS = frozenset("mr mrs ms dr prof st jr sr etc vs inc ltd co corp mt ft fig approx dept est gen gov sgt "
                           "lt col capt rev".split())
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"), "wanna": ("wan", "na"),
                "gimme": ("gim", "me"), "lemme": ("lem", "me")}
_CLITICS = ("n't", "'s", "'re", "'ve", "'ll", "'d", "'m")
_TOKEN = re.compile(r"""
    (?P<ellipsis>\.\.\.+)
  | (?P<dashes>--+)
  | (?P<number>\d+(?:[:,.]\d+)+)
  | (?P<word>[^\W_]+(?:[-/.'&][^\W_]+)*(?:\.(?!\.))?)
  | (?P<qmarks>[?!]+)
  | (?P<other>\S)
""", re.VERBOSE | re.UNICODE)
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}


def _word_tokens(word: str, next_is_digit: bool) -> list[str]:
    out: list[str] = []
    tail: list[str] = []
    if word.endswith(".") and len(word) > 1:
        core = word[:-1]
        keep = ("." in core or (len(core) == 1 and core.isalpha()) or core.lower() in _ABBREVIATIONS
                or (core.lower() == "no" and next_is_digit))
        if not keep:
            word, tail = core, ["."]
    low = word.lower()
    if low in _SPLIT_WORDS:
        a, b = _SPLIT_WORDS[low]
        return [word[:len(a)], word[len(a):]] + tail
    for clitic in _CLITICS:
        if low.endswith(clitic) and len(low) > len(clitic):
            out = [word[:-len(clitic)], word[-len(clitic):]]
            break
    else:
        out = [word]
    return out + tail


def ptb_tokenize_python(caption: str) -> str:
    """Our stand-in for `ptb_tokenize_java` on one caption (see the module docstring)."""
    text = caption.translate(_LINE_BREAKS).translate(str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"',
                                                                 "\u201d": '"'}))
    tokens: list[str] = []
    matches = list(_TOKEN.finditer(text))
    for i, m in enumerate(matches):
        kind, tok = m.lastgroup, m.group()
        if kind == "word":
            nxt = matches[i + 1].group() if i + 1 < len(matches) else ""
            tokens += _word_tokens(tok, nxt[:1].isdigit())
        elif kind == "ellipsis":
            tokens.append("...")
        elif kind == "dashes":
            tokens.append("--")
        elif kind == "other" and tok == '"':
            start = m.start() == 0 or text[m.start() - 1].isspace() or text[m.start() - 1] in "([{"
            tokens.append("``" if start else "''")
        elif kind == "other" and tok in _BRACKETS:
            tokens.append(_BRACKETS[tok])
        else:
            tokens.append(tok)
    return _filter(" ".join(t.lower() for t in tokens))


def tokenize(captions: Sequence[str], method: str = "auto") -> tuple[list[str], str]:
    """(tokenised captions, the tokenizer used). `method`: "java" (pycocoevalcap's), "python"
    (`ptb_tokenize_python`) or "auto" (java when available)."""
    if method not in ("auto", "java", "python"):
        raise ValueError(f"tokenizer must be auto, java or python, got {method!r}")
    if method == "java" or (method == "auto" and java_available()):
        if not java_available():
            raise RuntimeError("tokenizer 'java' asked for, but there is no java on the PATH")
        return ptb_tokenize_java(captions), "java"
    return [ptb_tokenize_python(c) for c in captions], "python"


# ----------------------------------------------------------------------------- metrics


def caption_scores(references: Sequence[Sequence[str]], predictions: Sequence[str], tokenizer: str = "auto",
                   meteor: bool = True, spice: bool = True) -> dict[str, Any]:
    """COCO caption metrics of `predictions[i]` against `references[i]` (each a list of strings).

    Returns `scores` {metric: corpus score} for the metrics that ran, `per_item` {metric: [score]}
    (BLEU per item is pycocoevalcap's sentence-level value), `skipped` {metric: reason},
    `tokenizer` ("java" | "python") and `n`."""
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} reference lists but {len(predictions)} predictions")
    if any(not refs for refs in references):
        raise ValueError("every item needs at least one reference caption")
    root = _evalcap_dir()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    flat = [c for refs in references for c in refs] + list(predictions)
    toks, used = tokenize(flat, tokenizer)
    gts, res, k = {}, {}, 0
    for i, refs in enumerate(references):
        gts[str(i)] = toks[k:k + len(refs)]
        k += len(refs)
    for i in range(len(predictions)):
        res[str(i)] = [toks[k + i]]
    scores: dict[str, float] = {}
    per_item: dict[str, list] = {}
    skipped: dict[str, str] = {}
    if not predictions:
        return {"scores": {}, "per_item": {}, "skipped": {}, "tokenizer": used, "n": 0}
    with contextlib.redirect_stdout(io.StringIO()):
        b, bs = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        scores[f"Bleu_{n + 1}"], per_item[f"Bleu_{n + 1}"] = float(b[n]), [float(x) for x in bs[n]]
    if meteor and java_available():
        from pycocoevalcap.meteor.meteor import Meteor

        try:
            m = Meteor()
            try:
                s, ss = m.compute_score(gts, res)
            finally:  # end the JVM now (its own __del__ only runs at garbage collection)
                m.meteor_p.stdin.close()
                m.meteor_p.kill()
                m.meteor_p.wait()
            scores["METEOR"], per_item["METEOR"] = float(s), [float(x) for x in ss]
        except (OSError, ValueError) as e:  # the JVM did not start or died (no float on its stdout)
            skipped["METEOR"] = f"the METEOR jar failed: {type(e).__name__}: {e}"
    else:
        skipped["METEOR"] = "not asked" if not meteor else "no java on the PATH"
    s, ss = Rouge().compute_score(gts, res)
    scores["ROUGE_L"], per_item["ROUGE_L"] = float(s), [float(x) for x in ss]
    s, ss = Cider().compute_score(gts, res)
    scores["CIDEr"], per_item["CIDEr"] = float(s), [float(x) for x in ss]
    missing_jars = [j for j in _SPICE_JARS if not os.path.isfile(os.path.join(root, "spice", "lib", j))]
    if not spice:
        skipped["SPICE"] = "not asked"
    elif not java_available():
        skipped["SPICE"] = "no java on the PATH"
    elif missing_jars:
        skipped["SPICE"] = (f"needs {', '.join(missing_jars)} in {os.path.join(root, 'spice', 'lib')} "
                            "(pycocoevalcap downloads them on first use; we do not)")
    else:
        from pycocoevalcap.spice.spice import Spice

        try:
            with contextlib.redirect_stdout(io.StringIO()):
                s, ss = Spice().compute_score(gts, res)
            scores["SPICE"] = float(s)
            per_item["SPICE"] = [float(x["All"]["f"]) for x in ss]
        except (subprocess.CalledProcessError, OSError) as e:
            skipped["SPICE"] = f"the SPICE jar failed: {e}"
    return {"scores": scores, "per_item": per_item, "skipped": skipped, "tokenizer": used, "n": len(predictions)}


def score(rows: Mapping[str, dict] | Sequence[dict], items: Sequence[runner.Item] | None = None,
          benchmark: str = "vg", tokenizer: str = "auto", meteor: bool = True, spice: bool = True) -> dict[str, Any]:
    """Caption metrics over the predicted items (benchmark order), the metrics skipped and why,
    per-item figures, and the coverage lists."""
    _, preds, cov = runner.predicted(rows, items)
    refs = []
    for _, r, e in preds:
        answer = e["answer"] if "answer" in e else r["Answer"]
        refs.append(list(answer) if isinstance(answer, list) else [answer])
    res = caption_scores(refs, [r["pred"] for _, r, _ in preds], tokenizer=tokenizer, meteor=meteor, spice=spice)
    per_item = [{"id": sid, **{m: v[i] for m, v in res["per_item"].items()}} for i, (sid, _, _) in enumerate(preds)]
    return {"benchmark": benchmark, "n": res["n"], **res["scores"], "skipped": res["skipped"],
            "tokenizer": res["tokenizer"], "per_item": per_item, **cov}
