"""DLC-Bench (Describe Anything's detailed localized captioning benchmark; VRVL3 `dam/infer_dam.py`
and DAM's `eval.py`).

Items: every annotation of DLC-Bench's COCO `annotations.json` (`region_formats.parse_dlc`), prompt
`Please describe the region <region> in the image in detail. Do not describe anything else.` Rows
carry `id` (= the annotation id, the key of `qa.json`) and `pred`. (The official VRVL3 inference
script calls the generator `mm_infer` without iterating it and so writes generator objects; ours
writes the text.)

Scoring (`score`), DAM's protocol through an OpenAI-compatible judge (`judge.JudgeClient`):
for each key of `qa.json`, the judge answers, from the predicted description alone, first a
recognition question ("is the object likely a <class name> or similar?", Yes = correct, No =
incorrect; plural class names, by `inflect`, get the plural wording) and then each of the key's
multiple-choice questions (choices `[text, score]`, type `positive` or `negative`), one request per
question, choices lettered `A.`, `B.`, ... The reply is mapped to a choice by DAM's rules
(`parse_choice`). A failed recognition caps every score of the item at 0 (`min(0, score)`).
Per item: positive score = mean over its positive questions, negative score = mean over its
negative ones (items without negatives are left out of the negative mean). Reported: mean positive,
mean negative, their average.

Differences from DAM's script, on purpose: temperature 0 and a cache (`judge.py`); our own wording
of the judge prompt and recognition question (pass DAM's texts through `DLCPrompts` /
`--dlc_prompts` to reproduce them exactly); DAM raises on a missing prediction, an unparseable
recognition answer or an out-of-range letter, we list them instead: a missing prediction is under
`missing`, an unparseable recognition answer counts as failed recognition, an unparseable or
out-of-range choice scores 0 (DAM's rule for no match), and every such reply is listed in
`unparsed` (a reply that cannot be parsed is asked again on later runs, `judge.JudgeClient.ask`).
The official VRVL3 script hard-codes `gpt-4-0409` as judge (DAM's default is Llama-3.1-8B-Instruct).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from data_pipeline import region_formats, schema
from vrefer_jax.evaluation import judge as judge_lib
from vrefer_jax.evaluation import runner

LETTERS = "abcde"

DEFAULT_TEMPLATE = """\
Answer a multiple-choice question using only the text description of an object in an image given below. Rules:
1. Give no reasoning and make no corrections. Output exactly one of the choices for the question, and do not \
repeat the question.
2. The description does not have to match a choice word for word: pick the choice closest to what it says.

The description:
{description}

Using the description above, answer this question with one of its choices:
{question}
"""
RECOGNITION_SINGULAR = ("Is the object in the description likely to be {a_name}, or an object of a similar kind? "
                        "It need not be an exact match.")
RECOGNITION_PLURAL = ("Are the objects in the description likely to be {name}, or objects of a similar kind? "
                      "It need not be an exact match.")


@dataclasses.dataclass(frozen=True)
class DLCPrompts:
    """The judge's texts. `template` takes `{description}` and `{question}` (the question line(s) and
    the lettered choices); the recognition questions take `{name}` / `{a_name}` (name with its
    indefinite article)."""

    template: str = DEFAULT_TEMPLATE
    recognition_singular: str = RECOGNITION_SINGULAR
    recognition_plural: str = RECOGNITION_PLURAL

    @classmethod
    def from_file(cls, path: str) -> DLCPrompts:
        """A JSON object with any of the three fields."""
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown DLC prompt fields {sorted(unknown)}")
        return cls(**data)


def load(data: str | Mapping, protocol: str = "vl3") -> list[runner.Item]:
    """DLC-Bench `annotations.json` (path or loaded) -> items."""
    return region_formats.parse_dlc(runner.load_json(data), protocol)


def row_fields(s: schema.Sample) -> dict[str, Any]:
    return {"image": s.extra["image"]}


run = functools.partial(runner.run_predictions, row_fn=row_fields)


# ----------------------------------------------------------------------------- questions


def _inflect():
    try:
        import inflect
    except ImportError as e:
        raise ImportError("DLC-Bench scoring needs inflect (pip install 'vrefer-jax[eval]')") from e
    return inflect.engine()


def is_plural(name: str, engine=None) -> bool:
    """DAM's rule: `inflect` finds a singular form ("bus" excepted)."""
    if name == "bus":
        return False
    return (engine or _inflect()).singular_noun(name) is not False


def recognition_question(name: str, prompts: DLCPrompts = DLCPrompts(), engine=None) -> dict[str, Any]:
    engine = engine or _inflect()
    text = (prompts.recognition_plural.format(name=name) if is_plural(name, engine)
            else prompts.recognition_singular.format(name=name, a_name=engine.a(name)))
    return {"question": text, "choices": [["Yes", "correct"], ["No", "incorrect"]], "type": "recognition"}


def question_text(q: Mapping[str, Any]) -> str:
    """The question and its lettered choices (`A. text` per line)."""
    lines = [q["question"]] + [f"{LETTERS[i].upper()}. {c[0]}" for i, c in enumerate(q["choices"])]
    return "\n".join(lines)


def messages(description: str, q: Mapping[str, Any], prompts: DLCPrompts = DLCPrompts()) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompts.template.format(description=description, question=question_text(q))}]


def parse_choice(reply: str, choices: Sequence[str]) -> int | None:
    """The chosen index by DAM's `parse_pred` rules, or None (no match, an empty reply, or a letter
    beyond the choices, where DAM raises). On the lower-cased, stripped reply: an exact choice, `x.
    choice` or the bare letter x; else the one choice contained in it; else a leading `x.`; else,
    of several contained choices, the one found latest (the longest on a tie); else the longest
    choice containing the reply; else a lone letter (alone or before a newline)."""
    pred = reply.strip().lower()
    if not pred:
        return None
    opts = [c.strip().lower() for c in choices]
    found = []
    for i, c in enumerate(opts):
        if pred in (c, f"{LETTERS[i]}. {c}", LETTERS[i]):
            return i
        if c in pred:
            found.append((i, pred.index(c), len(c)))
    if len(found) == 1:
        return found[0][0]

    def letter(x: str) -> int | None:
        k = LETTERS.index(x)
        return k if k < len(opts) else None

    if pred[0] in LETTERS and len(pred) > 1 and pred[1] == ".":
        return letter(pred[0])
    if found:
        last = max(pos for _, pos, _ in found)
        return max((f for f in found if f[1] == last), key=lambda f: f[2])[0]
    inside = [(i, len(c)) for i, c in enumerate(opts) if pred in c]
    if inside:
        return max(inside, key=lambda x: x[1])[0]  # first of the longest, as Python's max
    if pred[0] in LETTERS and (len(pred) == 1 or pred[1] == "\n"):
        return letter(pred[0])
    return None


def _check_qa(key: str, qs: Any) -> str | None:
    if not isinstance(qs, list) or not qs:
        return "expected a non-empty list of questions"
    for n, q in enumerate(qs):
        if not isinstance(q, Mapping) or not isinstance(q.get("question"), str):
            return f"question {n}: expected an object with a `question` string"
        if q.get("type") not in ("positive", "negative"):
            return f"question {n}: type must be positive or negative, got {q.get('type')!r}"
        ch = q.get("choices")
        if not isinstance(ch, list) or not 1 <= len(ch) <= len(LETTERS) or not all(
                isinstance(c, (list, tuple)) and len(c) == 2 and isinstance(c[0], str)
                and isinstance(c[1], (int, float)) and not isinstance(c[1], bool) for c in ch):
            return f"question {n}: choices must be 1-5 [text, score] pairs"
    if not any(q["type"] == "positive" for q in qs):
        return "no positive question (DAM divides by their number)"
    return None


# ----------------------------------------------------------------------------- scoring


def score(rows: Mapping[str, dict] | Sequence[dict], client: judge_lib.JudgeClient, qa: str | Mapping,
          class_names: str | Mapping, items: Sequence[runner.Item] | None = None,
          prompts: DLCPrompts = DLCPrompts(), log=None) -> dict[str, Any]:
    """Judge every predicted description of a `qa.json` key (see the module docstring).

    Returns `avg_pos`, `avg_neg`, `average` ((pos + neg) / 2), `n` (items scored), `n_neg` (items
    with negatives), per-item details (`per_item`: recognition, positive / negative scores, every
    question's reply and chosen index), `unparsed` (every reply that named no valid choice, and
    transport failures), `missing` (qa keys without a prediction), `bad_qa` (malformed qa entries),
    `no_class_name`, `unknown` (predicted ids not in qa.json) and the runner's coverage lists."""
    qa = runner.load_json(qa)
    names = runner.load_json(class_names)
    rows, preds, cov = runner.predicted(rows, items)
    pred_of = {sid: r["pred"] for sid, r, _ in preds}
    engine = _inflect()
    bad_qa, no_name, missing, jobs, plans = [], [], [], [], []
    for key, qs in qa.items():
        key = str(key)
        problem = _check_qa(key, qs)
        if problem:
            bad_qa.append({"id": key, "reason": problem})
            continue
        if key not in names:
            no_name.append(key)
            continue
        if key not in pred_of:
            missing.append(key)
            continue
        questions = [recognition_question(str(names[key]), prompts, engine), *qs]
        plans.append((key, questions))
        for n, q in enumerate(questions):
            jobs.append((key, n, messages(pred_of[key], q, prompts), [c[0] for c in q["choices"]]))

    def one(job):
        key, n, msgs, choices = job
        try:
            reply = client.ask(msgs, accept=lambda r: parse_choice(r, choices) is not None)
        except judge_lib.JudgeError as e:
            return None, str(e)
        return reply, None

    answers = dict(zip(((k, n) for k, n, _, _ in jobs),
                       judge_lib.map_concurrent(one, jobs, client.cfg.workers, log)))
    per_item, unparsed = [], []
    for key, questions in plans:
        recognised, pos, neg, details = None, [], [], []
        for n, q in enumerate(questions):
            reply, error = answers[(key, n)]
            idx = parse_choice(reply, [c[0] for c in q["choices"]]) if reply is not None else None
            if idx is None:
                unparsed.append({"id": key, "question": n, "type": q["type"], "reply": reply,
                                 "reason": ("no judge reply: " + error) if error else "no choice matched"})
            value = q["choices"][idx][1] if idx is not None else 0
            if q["type"] == "recognition":
                recognised = value == "correct"
            else:
                if not recognised:
                    value = min(0, value)
                (pos if q["type"] == "positive" else neg).append(value)
            details.append({"question": q["question"], "type": q["type"], "reply": reply, "choice": idx,
                            "value": value})
        per_item.append({"id": key, "recognition": recognised, "score_pos": sum(pos) / len(pos),
                         "score_neg": sum(neg) / len(neg) if neg else None, "questions": details})
    pos_scores = [x["score_pos"] for x in per_item]
    neg_scores = [x["score_neg"] for x in per_item if x["score_neg"] is not None]
    avg_pos = sum(pos_scores) / len(pos_scores) if pos_scores else 0.0
    avg_neg = sum(neg_scores) / len(neg_scores) if neg_scores else 0.0
    qa_keys = {str(k) for k in qa}
    return {"benchmark": "dlc", "judge_model": client.cfg.model, "n": len(per_item), "n_neg": len(neg_scores),
            "avg_pos": avg_pos, "avg_neg": avg_neg, "average": (avg_pos + avg_neg) / 2,
            "recognition_failed": [x["id"] for x in per_item if not x["recognition"]],
            "unparsed": unparsed, "bad_qa": bad_qa, "no_class_name": no_name, "per_item": per_item,
            "judge_requests": client.requests, **cov, "missing": sorted(set(cov["missing"]) | set(missing)),
            "unknown": sorted(set(cov["unknown"]) | (set(pred_of) - qa_keys))}


def default_side_files(annotations: str) -> tuple[str, str]:
    """DLC-Bench's `qa.json` and `class_names.json` next to `annotations.json`."""
    d = os.path.dirname(os.path.abspath(annotations))
    return os.path.join(d, "qa.json"), os.path.join(d, "class_names.json")
