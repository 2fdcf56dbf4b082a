"""LVIS and PACO region category recognition (VRVL3 `infer_paco_lvis.py` + `eval_paco_lvis.py`).

Items: every (image, category) of the Osprey category JSON (`region_formats.parse_category_file`),
prompt `What is the category of <region>? ...` (LVIS: one word or phrase; PACO: `category:subcategory`
for parts). Prediction rows carry the official output fields `image`, `Answer`, `pred`, `region_num`.

Scores (per item, then the mean over the predicted items):

* SIoU: word-set Jaccard of prediction and answer after the official normalisation (`normalise`:
  `_ : , . ( )` -> spaces, strip, lower-case; words = whitespace split). When both word sets are
  empty the official script divides by zero; here that item scores 0 and is listed (`degenerate`).
* SSim: cosine similarity of the two normalised strings' sentence embeddings. The official model is
  sentence-transformers' `all-MiniLM-L6-v2`; `SentenceEmbedder` loads such a folder from a local
  path with `transformers` (`AutoTokenizer` + `AutoModel`) and pools as sentence-transformers does
  for it: mean of the last hidden states over the attention mask, inputs truncated to the folder's
  `max_seq_length` (`sentence_bert_config.json`, default 256). The final L2 normalisation of that
  model does not change a cosine.

The official mean divides by `n + 1e-10`; we divide by n (a relative difference below 1e-10).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from data_pipeline import region_formats, schema
from vrefer_jax.evaluation import runner

BENCHMARKS = ("lvis", "paco")
_SEPARATORS = ("_", ":", ",", ".", "(", ")")


def load(data: str | Sequence, benchmark: str, protocol: str = "vl3") -> list[runner.Item]:
    """Osprey category JSON (path or list) -> items (`Sample` or the `SampleError` of a bad entry)."""
    return region_formats.parse_category_file(runner.load_json(data), benchmark, protocol)


def row_fields(s: schema.Sample) -> dict[str, Any]:
    e = s.extra
    return {"image": e["image"], "Answer": e["answer"], "region_num": e["region_num"]}


run = functools.partial(runner.run_predictions, row_fn=row_fields)


# ----------------------------------------------------------------------------- scores


def normalise(text: str) -> str:
    """The official `process`: separators to spaces, then strip and lower-case."""
    for ch in _SEPARATORS:
        text = text.replace(ch, " ")
    return text.strip().lower()


def semantic_iou(pred: str, answer: str) -> float | None:
    """|words(pred) & words(answer)| / |words(pred) | words(answer)| of normalised strings; None
    when both are empty (the official script raises ZeroDivisionError)."""
    a, b = set(normalise(pred).split()), set(normalise(answer).split())
    union = a | b
    return len(a & b) / len(union) if union else None


class SentenceEmbedder:
    """Mean-pooled sentence embeddings from a local sentence-transformers BERT folder (e.g.
    all-MiniLM-L6-v2) through `transformers` on CPU (or `device`). `encode(texts)` -> [n, d] float32."""

    def __init__(self, folder: str, device: str = "cpu", batch_size: int = 64):
        try:
            import torch
            import transformers
        except ImportError as e:
            raise ImportError("SSim needs torch and transformers (pip install 'vrefer-jax[eval]')") from e
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"sentence embedding model folder {folder!r} does not exist "
                                    "(give a local all-MiniLM-L6-v2 folder)")
        st_cfg = _read_json(os.path.join(folder, "sentence_bert_config.json")) or {}
        pooling = _read_json(os.path.join(folder, "1_Pooling", "config.json"))
        if pooling is not None and not pooling.get("pooling_mode_mean_tokens", False):
            modes = sorted(k for k, v in pooling.items() if k.startswith("pooling_mode") and v)
            raise ValueError(f"{folder}: pooling {modes} is not mean pooling (the official all-MiniLM-L6-v2 pools by "
                             "the mean over tokens)")
        self._torch = torch
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        self.model = transformers.AutoModel.from_pretrained(folder).to(device).eval()
        self.max_length = int(st_cfg.get("max_seq_length", 256))
        self.lower = bool(st_cfg.get("do_lower_case", False))
        self.device, self.batch_size = device, batch_size

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        out = []
        for b in range(0, len(texts), self.batch_size):
            chunk = [t.lower() if self.lower else t for t in texts[b:b + self.batch_size]]
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
            with torch.no_grad():
                hidden = self.model(**enc).last_hidden_state  # [b, t, d]
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(pooled.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity [n] of [n, d] arrays (a zero vector gives 0, as `util.cos_sim`'s
    normalisation with eps)."""
    na = np.maximum(np.linalg.norm(a, axis=-1), 1e-12)
    nb = np.maximum(np.linalg.norm(b, axis=-1), 1e-12)
    return (a * b).sum(-1) / (na * nb)


def score(rows: Mapping[str, dict] | Sequence[dict], items: Sequence[runner.Item] | None = None,
          embedder: SentenceEmbedder | Any | None = None, benchmark: str = "lvis") -> dict[str, Any]:
    """Mean SSim (when an `embedder` with `encode(texts)` is given) and SIoU over the predicted items,
    per-item figures, `degenerate` (both word sets empty), and the coverage lists (`errors`,
    `missing`, `unknown`)."""
    rows, preds, cov = runner.predicted(rows, items)
    answers = [e["answer"] if "answer" in e else r["Answer"] for _, r, e in preds]
    texts = [r["pred"] for _, r, _ in preds]
    per_item, degenerate = [], []
    for (sid, _, _), p, a in zip(preds, texts, answers):
        iou = semantic_iou(p, a)
        if iou is None:
            degenerate.append({"id": sid, "pred": p, "answer": a})
        per_item.append({"id": sid, "pred": p, "answer": a, "siou": iou or 0.0})
    report: dict[str, Any] = {"benchmark": benchmark, "n": len(preds),
                              "siou": float(np.mean([x["siou"] for x in per_item])) if per_item else 0.0}
    if embedder is not None and preds:
        sims = cosine(embedder.encode([normalise(p) for p in texts]), embedder.encode([normalise(a) for a in answers]))
        for x, s in zip(per_item, sims):
            x["ssim"] = float(s)
        report["ssim"] = float(np.mean(sims))
    elif embedder is None:
        report["ssim"] = None
        report["ssim_skipped"] = "no sentence embedding model given (--embedding_model)"
    else:
        report["ssim"] = 0.0
    return {**report, "per_item": per_item, "degenerate": degenerate, **cov}
