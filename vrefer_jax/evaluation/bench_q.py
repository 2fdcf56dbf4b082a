"""VideoRefer-Bench-Q: predictions and scoring (reference §5.1).

Prediction rows carry the fields the official scorer reads (`Answer`, `pred`, `type`, `video`), so a
merged file also works with the official `eval_videorefer_bench_q.py`.

Two answer parsers:

* `official_letter`: the rules of the official `eval_videorefer_bench_q.py` (`main`), reproduced:
  the first `(X)` with X an upper-case A-Z; else the first `X)`; else the first character of the
  output after deleting every `.` (even when that character is not a letter). The official script
  crashes (IndexError) when nothing is left (empty output, or only dots); here that gives None,
  scored wrong and listed under `official_crash`. Comparison with the ground truth is
  case-insensitive; the ground truth is the first `(X)` of `Answer`, or the whole `Answer` when it
  has none.
* `strict_letter`: a letter only when the output names exactly one option unambiguously (see its
  docstring); the outputs it cannot read are counted and listed.

Accuracy is reported per question type and overall. The official "average" is a micro-average
over all questions (total right / total count), not a mean over the five types; `macro_over_types`
is given alongside for information only.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

from data_pipeline import bench_formats, schema
from vrefer_jax.evaluation import runner

TYPES = ("Basic Questions", "Sequential Questions", "Relationship Questions", "Reasoning Questions",
         "Future Predictions")

_PAREN = re.compile(r"\(([A-Z])\)")
_CLOSE = re.compile(r"([A-Z])\)")


def load(data: str | Sequence, mode: str = "single", protocol: str = "videorefer") -> list[runner.Item]:
    """Bench-Q JSON (path or list) -> items (`Sample` or the `SampleError` of a bad entry);
    `protocol`: the prompt of the model family's script (`bench_formats.PROTOCOLS`)."""
    return runner.parse_all(runner.load_json(data),
                            lambda raw, i: bench_formats.parse_bench_q(raw, i, mode, protocol))


def row_fields(s: schema.Sample) -> dict[str, Any]:
    """Fields stored beside `pred` (official names for the official scorer)."""
    e = s.extra
    return {"video": s.media, "Question": e["question"], "options": e["options"], "Answer": e["answer"],
            "type": e["type"], "mode": e["mode"], "frame_idx": e["frame_idx"]}


# `runner.run_predictions` with this benchmark's prediction-row fields.
run = functools.partial(runner.run_predictions, row_fn=row_fields)


# ----------------------------------------------------------------------------- parsers


def official_gt(answer: str) -> str:
    """Ground-truth letter as the official scorer takes it (whole `Answer` if it has no `(X)`)."""
    m = _PAREN.search(answer)
    return m.group(1) if m else answer


def official_letter(pred: str) -> str | None:
    """The official prediction parse; None where the official script raises IndexError."""
    for pat in (_PAREN, _CLOSE):
        m = pat.search(pred)
        if m:
            return m.group(1)
    rest = pred.replace(".", "")
    return rest[0] if rest else None


def official_correct(pred: str, answer: str) -> bool:
    letter = official_letter(pred)
    return letter is not None and letter.lower() == official_gt(answer).lower()


def option_letters(options: Sequence[str]) -> list[str]:
    """The option letters: each option's leading `(X)`, else A, B, C... by position."""
    out = []
    for i, o in enumerate(options):
        m = re.match(r"\s*\(([A-Za-z])\)", o)
        out.append(m.group(1).upper() if m else chr(ord("A") + i))
    return out


_WHOLE = re.compile(r"[\(\[]?\s*([A-Za-z])\s*[\)\]]?[.:]?")
_MARKERS = (
    re.compile(r"\(([A-Z])\)"),                                       # (B)
    re.compile(r"(?<![A-Za-z(])([A-Z])[).:](?=\s|$)"),                # B)  B.  B:
    re.compile(r"\b(?i:answer|option|choice)\s*(?i:is)?\s*:?\s*\(?([A-Z])\b(?!')"),  # answer is B
)


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^a-z0-9 ]", " ", text.lower())).strip()


def strict_letter(pred: str, options: Sequence[str]) -> str | None:
    """An option letter only when the output is unambiguous, else None.

    Accepted: the whole output is one letter, optionally bracketed and/or followed by `.`/`:`
    (`B`, `b`, `(B)`, `B.`); or the upper-case letter markers found (`(B)`, a standalone `B)`,
    `B.`, `B:`, `answer is B`) all name the same option letter; or, with no marker, the output is
    exactly one option's text (with or without its `(X)`). Two different letters, a letter that
    is not an option, or free text give None.
    """
    letters = option_letters(options)
    s = pred.strip()
    if not s:
        return None
    m = _WHOLE.fullmatch(s)
    if m:
        x = m.group(1).upper()
        return x if x in letters else None
    found = {x.upper() for pat in _MARKERS for x in pat.findall(s)}
    if found:
        return found.pop() if len(found) == 1 and next(iter(found)) in letters else None
    texts = [_norm(re.sub(r"^\s*\([A-Za-z]\)\s*", "", o)) for o in options]
    hit = [letters[i] for i, t in enumerate(texts) if t and t == _norm(s)]
    return hit[0] if len(hit) == 1 else None


# ----------------------------------------------------------------------------- scoring


def _acc(counts: Mapping[str, list[int]]) -> dict[str, dict]:
    return {t: {"n": n, "correct": c, "accuracy": c / n if n else 0.0} for t, (n, c) in counts.items()}


def _summary(per_type: dict[str, list[int]]) -> dict[str, Any]:
    n = sum(v[0] for v in per_type.values())
    c = sum(v[1] for v in per_type.values())
    accs = [v[1] / v[0] for v in per_type.values() if v[0]]
    return {"per_type": _acc(per_type), "n": n, "correct": c, "accuracy": c / n if n else 0.0,
            "macro_over_types": sum(accs) / len(accs) if accs else 0.0}


def _type_order(types: Sequence[str]) -> list[str]:
    seen = list(dict.fromkeys(types))
    return [t for t in TYPES if t in seen] + [t for t in seen if t not in TYPES]


def score(rows: Mapping[str, dict] | Sequence[dict], items: Sequence[runner.Item] | None = None) -> dict[str, Any]:
    """Score prediction rows (by id, or a list). With `items` (the benchmark), ground truth comes
    from the data and ids without a prediction are reported as `missing`.

    Returns `official` and `strict` blocks (`per_type` {type: n, correct, accuracy}, `accuracy` =
    micro-average over questions as the official script prints, `macro_over_types`), the strict
    parser's `unreadable` count and items, `official_crash` (outputs the official script would
    crash on), `errors` (entries that could not be run) and `missing` / `unknown` ids.
    """
    if not isinstance(rows, Mapping):
        rows = {str(r["id"]): r for r in rows}
    if items is not None:
        gt = {s.sample_id: s.extra for s in items if isinstance(s, schema.Sample)}
        cov = runner.coverage(items, rows)
        order = [runner.item_id(it) for it in items if runner.item_id(it) in rows]
    else:
        gt, cov = {}, {"missing": [], "errors": [r["error"] for r in rows.values() if r.get("error")], "unknown": []}
        order = list(rows)
    scored = []
    for sid in order:
        r = rows[sid]
        if r.get("pred") is None or (items is not None and sid not in gt):
            continue
        e = gt.get(sid)
        answer = e["answer"] if e else r["Answer"]
        options = e["options"] if e else r.get("options") or []
        qtype = (e["type"] if e else r.get("type")) or "unknown"
        scored.append((sid, r["pred"], answer, options, qtype))
    types = _type_order([q for *_, q in scored])
    off = {t: [0, 0] for t in types}
    strict = {t: [0, 0] for t in types}
    unreadable, crash = [], []
    for sid, pred, answer, options, qtype in scored:
        off[qtype][0] += 1
        strict[qtype][0] += 1
        off[qtype][1] += official_correct(pred, answer)
        if official_letter(pred) is None:
            crash.append({"id": sid, "pred": pred})
        letter = strict_letter(pred, options)
        if letter is None:
            unreadable.append({"id": sid, "pred": pred})
        else:
            strict[qtype][1] += letter == official_gt(answer).upper()
    return {"benchmark": "videorefer-bench-q", "official": _summary(off), "strict": _summary(strict),
            "unreadable": len(unreadable), "unreadable_items": unreadable, "official_crash": crash,
            "average_is": "micro over questions (official)", **cov}
