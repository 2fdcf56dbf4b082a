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


def save_tiny_tokenizer(d):
    """Write the tests' small Qwen2-like tokenizer (with `<region>`) to folder `d`; returns `str(d)`
    for `HFTokenizer.from_file` (also usable from a subprocess given the folder)."""
    import json
    import os

    from test_text import QWEN2_TEMPLATE, _train_qwen_like

    _train_qwen_like().save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": QWEN2_TEMPLATE, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, f)
    return str(d)


def tiny_record(sample_id, index=0, source="s", masks_per_object=(1,), question=None, size=8):
    """A converted video record without media: 4 grey size x size PNG frames, one region frame, and an
    object per entry of `masks_per_object` with that many box masks (all on the region frame)."""
    from data_pipeline import records, video

    frame = video.encode_image(np.full((size, size, 3), 100, np.uint8), "png")
    m = masks.encode_mask(box(size, size, 1, 1, size - 3, size - 3))
    objs = tuple(records.ObjectMasks((1,) * n, (0,) * n, ((size, size),) * n, (m,) * n, (False,) * n)
                 for n in masks_per_object)
    if question is None:
        question = " ".join(["<region>"] * len(objs)) + f" number {index}?"
    return records.Record(
        sample_id=sample_id, source=source, index=index, modality="video", media="x.mp4",
        conversations=tuple(conv(question, "It is.")), extra={}, orig_size=(size, size), num_source_frames=4,
        stored_size=size, aspect="square", image_format="png", frame_indices=(0, 1, 2, 3), frames=(frame,) * 4,
        region_frame_indices=(1,), region_frames=(frame,), objects=objs)


def write_records(path, recs):
    """Records -> one TFRecord shard `path` with its offset index."""
    from data_pipeline import records

    with records.TFRecordWriter(path, records.index_path_for(path)) as w:
        for r in recs:
            w.write(r.to_bytes())
    return path


def write_level_video(path, n, codec="libx264", w=64, h=48, fps=10, gop=6, bframes=0, step=8):
    """A video whose frame i is a flat grey of level step*i (mod 256), so `frame_level` reads the
    index back from a decoded frame (step 8: up to 32 frames; step 4: 64)."""
    import os

    import av

    os.makedirs(os.path.dirname(str(path)) or ".", exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height = w, h
        s.pix_fmt = "rgb8" if codec == "gif" else "yuv420p"
        if codec != "gif":
            s.codec_context.gop_size = gop
        if bframes:
            s.codec_context.max_b_frames = bframes
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), step * i % 256, np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def frame_level(frame, step=8):
    """The index `write_level_video` encoded in a decoded [H, W, 3] frame (centre crop mean / step)."""
    return int(round(float(frame[8:-8, 8:-8].mean()) / step))
