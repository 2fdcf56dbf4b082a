"""Ref-L4 region captioning with the CLAIR score (VRVL3 `infer_refl4.py`, `clair/clair.py`,
`clair/merge_score.py`).

Items: the Objects365 entries of Ref-L4 (`region_formats.parse_refl4`, `subset="objects365"` as the
official filter; "all" for every entry), box -> mask, prompt `Please describe <region> in brief.`
Rows carry `image`, `Answer` (the reference caption) and `pred`.

CLAIR (`score`): an LLM (OpenAI-compatible endpoint, `judge.JudgeClient`) is shown the candidate
set (the prediction) and the reference set, one `- caption` line each, and asked how likely, on
0-100, they describe the same image, as JSON `{"score", "reason"}`. `parse_clair` reads the reply
as the official: the text from the first `{` to the next `}` as JSON with a numeric `score`; failing
that, the first number in the reply (`\\d*\\.?\\d+`; a value below 1 is multiplied by 100). A reply
with no number is asked again, up to 5 requests in all (the official loop), then the item scores
0 and is listed. Item score = score / 100; CLAIR = the mean over the predicted items.

Differences from the official, on purpose: temperature 0 and a cache (`judge.py`); our own wording
of the prompt (pass the official text with `--clair_prompt`: `{candidates}` and `{references}`
placeholders); every fallback-parsed, failed or transport-failed item is listed. The official
script iterates the reference as a list; Ref-L4's `caption` is a string, so it sends one line per
*character*; we send the caption as one line (`char_references=True` reproduces the official).
The official METEOR / CIDEr figures for Ref-L4 come from a further GPT condensation of the
predictions (`refl4/gpt.py`) that the released shell script does not run; it is not reproduced.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from data_pipeline import region_formats, schema
from vrefer_jax.evaluation import judge as judge_lib
from vrefer_jax.evaluation import runner

TRIES = 5
DEFAULT_PROMPT = """\
You are judging whether a set of candidate captions describes the same image as a set of reference captions.
Candidate set:
{candidates}
Reference set:
{references}
On a precise scale from 0 to 100, how likely is it that the candidate set describes the same image as the \
reference set? Answer in JSON format, with a key "score" whose value is a number from 0 to 100, and a key \
"reason" whose value is a string.
"""
_NUMBER = re.compile(r"\d*\.?\d+")
_REASON = re.compile(r"(?i)reason.*")


def load(data: str | Sequence, protocol: str = "vl3", subset: str = "objects365") -> list[runner.Item]:
    """Ref-L4 file (JSON Lines or a JSON list; path or loaded list) -> items of `subset`."""
    entries = region_formats.load_json_or_lines(data) if isinstance(data, str) else list(data)
    kept = [e for e in entries if region_formats.refl4_selected(e, subset)]
    return region_formats.parse_all(kept, lambda raw, i: region_formats.parse_refl4(raw, i, protocol))


def row_fields(s: schema.Sample) -> dict[str, Any]:
    e = s.extra
    return {"image": e["image"], "Answer": e["answer"], "box": e["box"]}


run = functools.partial(runner.run_predictions, row_fn=row_fields)


def clair_messages(candidates: Sequence[str], references: Sequence[str], prompt: str = DEFAULT_PROMPT) -> list[dict]:
    cand = "".join(f"- {c}\n" for c in candidates)
    refs = "".join(f"- {t}\n" for t in references)
    return [{"role": "user", "content": prompt.format(candidates=cand, references=refs)}]


def parse_clair(reply: str) -> tuple[float | None, str | None, str | None]:
    """(score 0-100 or None, reason, how: "json" | "regex" | None) by the official rules."""
    try:
        inner = reply.split("{")[1].split("}")[0]
        data = json.loads("{" + inner + "}")
        value = float(data["score"])
        reason = data.get("reason", "Unknown")
        return value, str(reason), "json"
    except (IndexError, ValueError, KeyError, TypeError, AttributeError):
        pass
    nums = _NUMBER.findall(reply)
    if not nums:
        return None, None, None
    value = float(nums[0])
    if value < 1:
        value *= 100
    m = _REASON.findall(reply)
    reason = m[0].strip()[len("reason"):].replace(":", "").strip() if m else "Unknown"
    return value, reason, "regex"


def references_of(answer: Any, char_references: bool = False) -> list[str]:
    if isinstance(answer, list):
        return [str(a) for a in answer]
    return list(str(answer)) if char_references else [str(answer)]


def clair_item(client: judge_lib.JudgeClient, pred: str, references: Sequence[str],
               prompt: str = DEFAULT_PROMPT) -> dict[str, Any]:
    """One item's CLAIR: up to `TRIES` requests until a reply parses (later runs reuse the cache
    and do not ask beyond `TRIES` in all)."""
    msgs = clair_messages([pred], references, prompt)
    accept = lambda r: parse_clair(r)[0] is not None  # noqa: E731
    reply, error = None, None
    for _ in range(TRIES):
        try:
            reply = client.ask(msgs, accept=accept, attempts=TRIES)
        except judge_lib.JudgeError as e:
            error = str(e)
            break
        if accept(reply):
            break
    value, reason, how = parse_clair(reply) if reply is not None else (None, None, None)
    return {"score": (value if value is not None else 0.0) / 100, "reason": reason, "parsed_by": how,
            "reply": reply, **({"error": error} if error else {})}


def score(rows: Mapping[str, dict] | Sequence[dict], client: judge_lib.JudgeClient,
          items: Sequence[runner.Item] | None = None, prompt: str = DEFAULT_PROMPT, char_references: bool = False,
          log=None) -> dict[str, Any]:
    """CLAIR over the predicted items: `clair` (mean of score/100), `clair_100`, per-item scores,
    `unparsed` (0 after the failed tries, or no reply), `regex_parsed` (scores read by the
    fallback), and the coverage lists."""
    _, preds, cov = runner.predicted(rows, items)
    jobs = [(sid, r["pred"], references_of(e["answer"] if "answer" in e else r["Answer"], char_references))
            for sid, r, e in preds]
    judged = judge_lib.map_concurrent(lambda j: {"id": j[0], **clair_item(client, j[1], j[2], prompt)}, jobs,
                                      client.cfg.workers, log)
    unparsed = [{"id": j["id"], "reply": j["reply"],
                 "reason": ("no judge reply: " + j["error"]) if "error" in j else f"no score after {TRIES} tries"}
                for j in judged if j["parsed_by"] is None]
    regex = [{"id": j["id"], "score": j["score"], "reply": j["reply"]} for j in judged if j["parsed_by"] == "regex"]
    mean = sum(j["score"] for j in judged) / len(judged) if judged else 0.0
    return {"benchmark": "refl4", "judge_model": client.cfg.model, "n": len(judged), "clair": mean,
            "clair_100": 100 * mean, "unparsed": unparsed, "regex_parsed": regex, "per_item": judged,
            "judge_requests": client.requests, **cov}
