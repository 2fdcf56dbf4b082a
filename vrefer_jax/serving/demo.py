"""The web demo (Gradio), served by `vrefer-serve --demo` at `/demo`, in the server's process.

Upload a video or an image, pick a frame with the slider, and mark objects on it:
* box: click two opposite corners on the frame;
* brush: paint over the object in the brush editor, then "Add brushed mask";
* SAM (with `--sam-model FOLDER`, a local transformers `SamModel`): click on the object.
Single-frame mode makes every mask a new object (`<object0>`, `<object1>`, ...); multi-frame mode adds
masks on other frames to the current object until "New object". The masks are drawn over the frames.
Then ask in the chat, naming objects as `<object0>`...; answers stream in, and follow-up questions
keep the conversation (earlier turns are sent as history). Requests go through the same engine as
the HTTP API (`Service.ask_sync`), so demo users are batched with API clients.
"""

# No `from __future__ import annotations` here: Gradio reads the `gr.SelectData` annotation of the
# click handler at run time to pass the click position.
import functools
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_pipeline import masks as masks_lib
from data_pipeline import video as video_lib
from vrefer_jax.serving import engine as engine_lib
from vrefer_jax.serving import requests as rq

log = logging.getLogger(__name__)

COLOURS = np.array([(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
                    (240, 50, 230), (210, 245, 60)], np.float32)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# ----------------------------------------------------------------------------- pure helpers (tested alone)


def new_state() -> dict:
    """media: {path, modality, num_frames}; objects: [{frame: [H, W] bool}]; current: the object
    masks are added to in multi-frame mode; corner: the first box corner clicked (frame, x, y)."""
    return {"media": None, "objects": [], "current": -1, "corner": None}


@functools.lru_cache(maxsize=4)
def _reader(path: str):
    return video_lib.open_video(path)


def media_info(path: str) -> dict:
    modality = "image" if path.lower().endswith(IMAGE_EXTS) else "video"
    n = 1 if modality == "image" else _reader(path).num_frames
    return {"path": path, "modality": modality, "num_frames": n}


def read_frame(media: dict, index: int) -> np.ndarray:
    """[H, W, 3] uint8 frame `index` of the media."""
    if media["modality"] == "image":
        return video_lib.read_image(media["path"])
    return _reader(media["path"]).get([int(index)])[int(index)]


def add_mask(state: dict, frame: int, mask: np.ndarray, multi_frame: bool) -> dict:
    """A new object (single-frame mode, or none yet), else the mask joins the current object."""
    if not mask.any():
        raise ValueError("the mask is empty: draw on the frame first")
    state = dict(state, objects=[dict(o) for o in state["objects"]])
    if multi_frame and 0 <= state["current"] < len(state["objects"]):
        state["objects"][state["current"]][int(frame)] = mask
    else:
        state["objects"].append({int(frame): mask})
        state["current"] = len(state["objects"]) - 1
    return state


def box_mask(shape: tuple[int, int], p0: tuple[float, float], p1: tuple[float, float]) -> np.ndarray:
    """[H, W] bool box between two clicked corners (pixels, inclusive)."""
    h, w = shape
    x0, x1 = sorted((int(round(p0[0])), int(round(p1[0]))))
    y0, y1 = sorted((int(round(p0[1])), int(round(p1[1]))))
    m = np.zeros((h, w), bool)
    m[max(y0, 0):min(y1 + 1, h), max(x0, 0):min(x1 + 1, w)] = True
    return m


def overlay(frame: np.ndarray, state: dict, index: int) -> np.ndarray:
    """The frame with every object's mask on it tinted and labelled `<objectK>`, and a pending box
    corner marked."""
    out = frame.astype(np.float32)
    labels = []
    for k, obj in enumerate(state["objects"]):
        m = obj.get(int(index))
        if m is None or m.shape != frame.shape[:2]:
            continue
        c = COLOURS[k % len(COLOURS)]
        out[m] = 0.55 * out[m] + 0.45 * c
        ys, xs = np.nonzero(m)
        labels.append((k, int(xs.min()), int(ys.min())))
    img = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    size = max(10, frame.shape[1] // 40)  # labels and marks readable on any frame size
    font = ImageFont.load_default(size=size)
    for k, x, y in labels:
        draw.text((x + 3, y + 2), f"<object{k}>", fill=(255, 255, 255), font=font, stroke_width=max(1, size // 8),
                  stroke_fill=tuple(int(v) for v in COLOURS[k % len(COLOURS)]))
    corner = state.get("corner")
    if corner and corner[0] == int(index):
        x, y, r = corner[1], corner[2], size // 2
        draw.ellipse((x - r, y - r, x + r, y + r), outline=(255, 255, 0), width=max(2, size // 6))
    return np.asarray(img)


def describe(state: dict) -> str:
    if not state["objects"]:
        return "No objects yet: click two corners of a box on the frame, or brush a mask."
    rows = [f"`<object{k}>`: frame{'s' if len(o) > 1 else ''} {', '.join(str(f) for f in sorted(o))}"
            for k, o in enumerate(state["objects"])]
    return "Objects (name them in your question): " + "; ".join(rows)


def build_request(state: dict, history: list[dict], question: str) -> dict:
    """The chat so far + the new question -> a `request_files` request (masks as RLE)."""
    media = state["media"]
    objects = []
    for obj in state["objects"]:
        frames = {str(f): {"rle": {"size": list(m.shape), "counts": masks_lib.encode_mask(m).decode("ascii")}}
                  for f, m in sorted(obj.items())}
        objects.append({"frames": frames})
    turns = [m for m in history if m.get("role") in ("user", "assistant")]
    pairs = [{"question": _text(q["content"]), "answer": _text(a["content"])}
             for q, a in zip(turns[0::2], turns[1::2]) if _text(a["content"]).strip()]
    req = {"id": f"demo-{uuid.uuid4().hex[:12]}", media["modality"]: "upload" + ("" if media["modality"] == "video"
                                                                                  else ".png"),
           "question": question, "objects": objects}
    if pairs:
        req["history"] = pairs
    return req


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # Gradio 6 message content: a list of {"type": "text", "text": ...}
        return "".join(c.get("text", "") if isinstance(c, dict) else str(c) for c in content)
    if isinstance(content, dict):
        return content.get("text", "")
    return str(content)


def brushed_mask(editor_value: Any, shape: tuple[int, int]) -> np.ndarray:
    """The painted pixels of an ImageEditor value (any layer's alpha > 0) at the frame size."""
    layers = (editor_value or {}).get("layers") or []
    m = np.zeros(shape, bool)
    for layer in layers:
        a = np.asarray(layer)
        if a.ndim == 3 and a.shape[-1] == 4:
            painted = a[..., 3] > 0
        else:
            painted = a.reshape(a.shape[0], a.shape[1], -1).any(-1)
        if painted.shape != shape:
            painted = np.asarray(Image.fromarray(painted).resize((shape[1], shape[0]), Image.NEAREST))
        m |= painted
    return m


class SamClicker:
    """Click-to-mask with a local transformers `SamModel` folder (nothing is downloaded)."""

    def __init__(self, folder: str):
        from transformers import SamModel, SamProcessor

        self.model = SamModel.from_pretrained(folder, local_files_only=True).eval()
        self.processor = SamProcessor.from_pretrained(folder, local_files_only=True)

    def mask(self, frame: np.ndarray, x: float, y: float) -> np.ndarray:
        import torch

        inputs = self.processor(Image.fromarray(frame), input_points=[[[float(x), float(y)]]], return_tensors="pt")
        with torch.no_grad():
            out = self.model(**inputs, multimask_output=False)
        masks = self.processor.image_processor.post_process_masks(
            out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])
        return masks[0][0, 0].numpy().astype(bool)


# ----------------------------------------------------------------------------- the Blocks


def build(service, sam_model: str | None = None):
    import gradio as gr

    sam = SamClicker(sam_model) if sam_model else None
    modes = ["box (click two corners)", "brush"] + (["SAM (click the object)"] if sam else [])

    def show(state, index):
        if state["media"] is None:
            return None, None
        frame = read_frame(state["media"], index)
        return overlay(frame, state, index), {"background": frame, "layers": [], "composite": frame}

    def on_upload(path):
        state = new_state()
        if not path:
            return state, gr.update(maximum=1, value=0), None, None, describe(state), "Upload a video or an image."
        try:
            state["media"] = media_info(path)
        except video_lib.MediaError as e:
            return state, gr.update(maximum=1, value=0), None, None, describe(state), f"Cannot read it: {e}"
        n = state["media"]["num_frames"]
        view, editor = show(state, 0)
        return (state, gr.update(maximum=max(n - 1, 1), value=0, interactive=n > 1), view, editor, describe(state),
                f"{state['media']['modality']} with {n} frame(s)")

    def on_frame(state, index):
        view, editor = show(state, index)
        return view, editor

    def on_click(state, index, mode, frame_mode, evt: gr.SelectData):
        if state["media"] is None:
            return state, None, describe(state), "Upload a video or an image first."
        x, y = evt.index[0], evt.index[1]
        frame = read_frame(state["media"], index)
        multi = frame_mode == "multi-frame"
        try:
            if mode.startswith("SAM") and sam is not None:
                state = add_mask(state, index, sam.mask(frame, x, y), multi)
                msg = f"SAM mask added at ({x}, {y})"
            elif mode.startswith("box"):
                corner = state.get("corner")
                if corner is None or corner[0] != int(index):
                    state = dict(state, corner=(int(index), x, y))
                    msg = f"first corner at ({x}, {y}); click the opposite corner"
                else:
                    state = add_mask(dict(state, corner=None), index, box_mask(frame.shape[:2], corner[1:], (x, y)),
                                     multi)
                    msg = f"box added on frame {index}"
            else:
                msg = "brush mode: paint in the brush editor, then 'Add brushed mask'"
        except ValueError as e:
            msg = str(e)
        return state, overlay(frame, state, index), describe(state), msg

    def on_brush(state, index, editor_value, frame_mode):
        if state["media"] is None:
            return state, None, describe(state), "Upload a video or an image first."
        frame = read_frame(state["media"], index)
        try:
            state = add_mask(state, index, brushed_mask(editor_value, frame.shape[:2]), frame_mode == "multi-frame")
            msg = f"brushed mask added on frame {index}"
        except ValueError as e:
            msg = str(e)
        return state, overlay(frame, state, index), describe(state), msg

    def on_new_object(state):
        return dict(state, current=-1), "the next mask starts a new object"

    def on_clear(state, index):
        state = dict(state, objects=[], current=-1, corner=None)
        view, _ = show(state, index)
        return state, view, describe(state), "objects cleared"

    def on_send(question, history, state, max_new_tokens) -> Iterator:
        history = list(history or [])
        if state["media"] is None or not (question or "").strip():
            yield history, question, "Upload media and type a question."
            return
        req = build_request(state, history, question)
        history = history + [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        yield history, "", "waiting for a batch..."
        t0, answer = time.monotonic(), ""
        try:
            events = service.ask_sync(req, rq.GenerationFields(max_new_tokens=int(max_new_tokens)),
                                      media_file=state["media"]["path"])
            for ev in events:
                if isinstance(ev, engine_lib.Delta):
                    answer += ev.text
                    history[-1] = {"role": "assistant", "content": answer}
                    yield history, "", "streaming..."
                elif isinstance(ev, engine_lib.Finished):
                    history[-1] = {"role": "assistant", "content": ev.text}
                    yield history, "", (f"answered: {ev.completion_tokens} tokens in {time.monotonic() - t0:.1f} s "
                                        f"({ev.finish_reason})")
                elif isinstance(ev, engine_lib.Failed):
                    history[-1] = {"role": "assistant", "content": f"[error] {ev.message}"}
                    yield history, "", f"error {ev.status}: {ev.code}"
        except rq.ApiError as e:
            history[-1] = {"role": "assistant", "content": f"[error] {e.message}"}
            yield history, "", f"error {e.status}: {e.code}"

    with gr.Blocks(title="VideoRefer demo") as blocks:
        state = gr.State(new_state())
        gr.Markdown("## VideoRefer: point at objects in a video and ask\n"
                    "Upload, pick a frame, mark objects (box: two clicks; brush; SAM if enabled), then ask about "
                    "`<object0>`, `<object1>`, ... Answers stream in.")
        with gr.Row():
            with gr.Column(scale=3):
                upload = gr.File(label="video or image", file_types=["video", "image"], type="filepath",
                                 elem_id="media-upload")
                frame_idx = gr.Slider(0, 1, value=0, step=1, label="frame", elem_id="frame-slider", interactive=False)
                view = gr.Image(label="frame (click to mark)", interactive=False, elem_id="frame-view",
                                type="numpy")
                with gr.Row():
                    mode = gr.Radio(modes, value=modes[0], label="marking", elem_id="mark-mode")
                    frame_mode = gr.Radio(["single-frame", "multi-frame"], value="single-frame", label="objects",
                                          elem_id="frame-mode")
                with gr.Accordion("brush", open=False):
                    editor = gr.ImageEditor(label="paint the object", type="numpy", elem_id="brush-editor",
                                            brush=gr.Brush(colors=["#ff0000"], default_size=12))
                    brush_btn = gr.Button("Add brushed mask", elem_id="add-brush")
                with gr.Row():
                    new_btn = gr.Button("New object", elem_id="new-object")
                    clear_btn = gr.Button("Clear objects", elem_id="clear-objects")
                objects_md = gr.Markdown(describe(new_state()), elem_id="objects")
            with gr.Column(scale=2):
                chat = gr.Chatbot(label="chat", elem_id="chat", height=420)
                question = gr.Textbox(label="question", placeholder="What is <object0> doing?", elem_id="question")
                with gr.Row():
                    send = gr.Button("Ask", variant="primary", elem_id="ask")
                    max_new = gr.Slider(1, service.cfg.max_new_tokens, value=service.cfg.default_max_new_tokens,
                                        step=1, label="max new tokens", elem_id="max-new")
                status = gr.Markdown("", elem_id="status")

        upload.change(on_upload, [upload], [state, frame_idx, view, editor, objects_md, status])
        frame_idx.change(on_frame, [state, frame_idx], [view, editor])
        view.select(on_click, [state, frame_idx, mode, frame_mode], [state, view, objects_md, status])
        brush_btn.click(on_brush, [state, frame_idx, editor, frame_mode], [state, view, objects_md, status])
        new_btn.click(on_new_object, [state], [state, status])
        clear_btn.click(on_clear, [state, frame_idx], [state, view, objects_md, status])
        ask = dict(fn=on_send, inputs=[question, chat, state, max_new], outputs=[chat, question, status],
                   concurrency_limit=None)  # many users at once: the engine batches them
        send.click(**ask)
        question.submit(**ask)
    return blocks


def mount(app, service, sam_model: str | None = None, path: str = "/demo"):
    """Serve the demo at `path` of the API's FastAPI app (same process, same engine)."""
    import gradio as gr

    return gr.mount_gradio_app(app, build(service, sam_model), path=path)


__all__ = ["build", "mount", "new_state", "media_info", "read_frame", "add_mask", "box_mask", "overlay",
           "build_request", "brushed_mask", "SamClicker", "describe"]
