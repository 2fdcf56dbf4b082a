"""Small builders shared by the data tests: box masks, their RLE, one-turn conversations."""

import numpy as np

from data_pipeline import masks


def box(h, w, y0, x0, y1, x1):
    """[h, w] bool mask, True on rows y0:y1 and columns x0:x1."""
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def rle(m):
    """Compressed COCO RLE dict with string counts, as the official JSON stores it."""
    return {"size": list(m.shape), "counts": masks.encode_mask(m).decode()}


def conv(question, answer="ok", tag="<video>"):
    """One human/gpt turn in the official conversation format."""
    return [{"from": "human", "value": f"{tag}\n{question}"}, {"from": "gpt", "value": answer}]
