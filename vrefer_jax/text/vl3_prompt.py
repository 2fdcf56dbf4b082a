"""VRVL3 (VideoRefer-VideoLLaMA3) prompts and labels, on the host (numpy, no jax).

Reference: `shared/reference/videorefer_vl3_reference.md` §9 (text side), §10 (every length is known on
the host), §13 (benchmark prompts). The flow for one sample:

  1. `expand_regions`: the k-th user placeholder `<region>` -> "[" + "<REGION>" * m_k + "]" (m_k = the
     region's token count, from its mask; §8.2, §9.3).
  2. `build_user_content`: the instruction split at its modal tag into content items (§9.3).
  3. `render`: the VRVL3 ChatML template (no system prompt; §9.2). A video item is one
     `Time {t}s:<image>` per frame, joined by ",", then "\\n"; an image item is `<image>\\n`.
  4. `tokenize_with_visuals`: `<image>` is one special id; the i-th one becomes `tokens_per_image[i]`
     copies (frame / image i's visual tokens AFTER pruning, so the ids are final: §10), and the batch
     fields `visual_index` / `region_index` (see `vrefer_jax.vl3_batch`) are filled.

`training_example` (each message templated and tokenised separately, labels of §9.4) and
`inference_prompt` (the conversation + generation prompt) run the four steps. The tokenizer must hold
the VRVL3 added tokens (`SPECIAL_TOKENS`; `load_vl3_tokenizer` adds the missing ones, in order).

Deviations from the official code, each where the official code crashes, silently mislabels or cannot
be reached by VideoRefer data: a placeholder / count mismatch raises instead of leaving `<region>` text
or raising IndexError; a "system" message is rendered as system (the official training code would make
it an assistant turn); "text" samples reject modal tags; history turns keep their roles at inference
(`mm_infer` turns every message into a user turn); stream messages and timed images are not supported.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from vrefer_jax.config import IGNORE_INDEX
from vrefer_jax.text.chat import IM_END, IM_START
from vrefer_jax.text.tokenizer import HFTokenizer, Tokenizer

IMAGE_TOKEN = "<image>"  # one per image / frame in the rendered text; a run of visual rows in the ids
VIDEO_TAG = "<video>"  # user-facing tag only: never reaches the tokenizer
REGION_TOKEN = "<REGION>"  # one id per region token
REGION_PLACEHOLDER = "<region>"  # user-facing placeholder, expanded by `expand_regions`
STREAM_START_TOKEN, STREAM_END_TOKEN = "<|stream_start|>", "<|stream_end|>"
# Added at training time in this order (ids 151665..151668 on Qwen2.5's vocabulary, §9.1).
SPECIAL_TOKENS = (IMAGE_TOKEN, STREAM_START_TOKEN, STREAM_END_TOKEN, REGION_TOKEN)
GENERATION_PROMPT = f"{IM_START}assistant\n"
MODAL_TAGS = {"image": IMAGE_TOKEN, "video": VIDEO_TAG, "text": None}
ROLES = ("system", "user", "assistant")

Message = Mapping[str, Any]


def load_vl3_tokenizer(path: str, **overrides: Any) -> HFTokenizer:
    """A Qwen2.5 tokenizer folder / `tokenizer.json` with `SPECIAL_TOKENS` appended where missing (as
    the official `add_tokens(..., special_tokens=True)`), and without VideoRefer-7B's `<region>` token."""
    overrides.setdefault("extra_special_tokens", SPECIAL_TOKENS)
    return HFTokenizer.from_file(path, **overrides)


# ----------------------------------------------------------------------------- strings


def time_label(t: float) -> str:
    """`"Time {t rounded to 0.1}s:"`, exactly as the template's `t | round(1) | string`.

    Jinja's `round` is the builtin `round(t, 1)`, so the result depends on the value's type, and so
    does this function (pass timestamps with the type the loader produced):
      * Python float: rounded from the exact binary value, ties to even: 0.25 -> "0.2", 0.75 -> "0.8",
        1.05 -> "1.1" (1.05 is stored as 1.05000000000000004...), 1.0 -> "1.0", 12.25 -> "12.2".
      * numpy float (the official mp4 loader's `np.arange` timestamps): numpy rounds `t * 10` half to
        even and divides, so 1.05 -> "1.0" (0.25 -> "0.2", 0.75 -> "0.8" as above).
      * int: unchanged, printed without a decimal point: 2 -> "2".
    The rounded value is printed with `str` (shortest repr: "0.2", "1.0", "1e+16").
    """
    if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t):
        raise ValueError(f"timestamps: expected finite numbers, got {t!r}")
    return f"Time {str(round(t, 1))}s:"


def expand_regions(text: str, token_counts: Sequence[int]) -> str:
    """Replace the k-th `<region>` by "[" + "<REGION>" * token_counts[k] + "]", in order.

    The number of placeholders must equal `len(token_counts)` (ValueError naming both); counts >= 0."""
    counts = _check_counts(token_counts)
    n = text.count(REGION_PLACEHOLDER)
    if n != len(counts):
        raise ValueError(f"the text has {n} {REGION_PLACEHOLDER} placeholders but {len(counts)} region token "
                         f"counts were given")
    return _expand_placeholders(text, counts)


def _expand_placeholders(text: str, counts: Sequence[int]) -> str:
    chunks = text.split(REGION_PLACEHOLDER)
    out = [chunks[0]]
    for m, chunk in zip(counts, chunks[1:]):
        out += ["[" + REGION_TOKEN * m + "]", chunk]
    return "".join(out)


def _check_counts(token_counts: Iterable[int]) -> list[int]:
    counts = [int(m) for m in token_counts]
    if any(m < 0 for m in counts):
        raise ValueError(f"region token counts must be >= 0, got {counts}")
    return counts


def _modal_tag(modal: str) -> str | None:
    if modal not in MODAL_TAGS:
        raise ValueError(f"modal {modal!r}: expected one of {tuple(MODAL_TAGS)}")
    return MODAL_TAGS[modal]


def _visual_item(modal: str, num_frames: int | None, timestamps: Sequence[float] | None) -> dict:
    if modal == "image":
        if timestamps is not None:
            raise ValueError("timestamps: an image item carries no time")
        return {"type": "image"}
    if num_frames is None or int(num_frames) < 1:
        raise ValueError(f"num_frames: a video needs >= 1 frame, got {num_frames}")
    item: dict[str, Any] = {"type": "video", "num_frames": int(num_frames)}
    if timestamps is not None:
        if len(timestamps) != int(num_frames):
            raise ValueError(f"timestamps: {len(timestamps)} values for num_frames={num_frames}")
        for t in timestamps:
            time_label(t)  # validates
        item["time"] = list(timestamps)
    return item


def _split_content(text: str, modal: str, num_frames: int | None, timestamps: Sequence[float] | None) -> list[dict]:
    """Split at the modal tag: stripped, non-empty text chunks and one visual item per tag (§9.3)."""
    tag = _modal_tag(modal)
    if tag is None:
        for t in (IMAGE_TOKEN, VIDEO_TAG):
            if t in text:
                raise ValueError(f"modal 'text': the instruction contains {t}")
        return [{"type": "text", "text": text.strip()}] if text.strip() else []
    if modal == "video" and IMAGE_TOKEN in text:
        raise ValueError(f"modal 'video': the instruction contains a literal {IMAGE_TOKEN}")
    items: list[dict] = []
    for k, chunk in enumerate(text.split(tag)):
        if k:
            items.append(_visual_item(modal, num_frames, timestamps))
        if chunk.strip():
            items.append({"type": "text", "text": chunk.strip()})
    return items


def _with_tag(text: str, tag: str | None, text_first: bool) -> str:
    if tag is None or tag in text:
        return text
    return text + tag if text_first else tag + text


def build_user_content(
    instruction: str,
    modal: str,
    num_frames: int | None = None,
    timestamps: Sequence[float] | None = None,
    text_first: bool = False,
) -> list[dict]:
    """One user instruction -> ordered content items (§9.3):
    `{"type": "text", "text"}`, `{"type": "image"}`, `{"type": "video", "num_frames", "time"?}`.

    `modal` is "image", "video" or "text". The instruction is split at its tag (`<image>` / `<video>`);
    each chunk is stripped and dropped if empty; each tag becomes one image / video item (a video item
    renders all `num_frames` frames, with `timestamps` if given). Without a tag one is added: before
    the text (`text_first=False`, the official auto-prepend) or after it (`text_first=True`). A tag
    already present decides the order by itself: Bench-D's `"... <region> in the video.\\n<video>"`
    gives text then frames.
    """
    return _split_content(_with_tag(instruction, _modal_tag(modal), text_first), modal, num_frames, timestamps)


def _render_item(item: Mapping[str, Any]) -> str:
    kind = item.get("type")
    if kind == "text":
        return item["text"]
    if kind == "image":
        return IMAGE_TOKEN + "\n"
    if kind == "video":
        n, times = int(item["num_frames"]), item.get("time")
        frames = [(time_label(times[i]) if times is not None else "") + IMAGE_TOKEN for i in range(n)]
        return ",".join(frames) + "\n"
    raise ValueError(f"content item type {kind!r}: expected 'text', 'image' or 'video'")


def render(messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """The VRVL3 ChatML template (§9.2), no default system prompt:
    `<|im_start|>{role}\\n` + content + `<|im_end|>\\n` per message, content a string or a list of
    items (`build_user_content`); then `<|im_start|>assistant\\n` if `add_generation_prompt`."""
    parts = []
    for m in messages:
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ValueError(f"message role {role!r}: expected one of {ROLES}")
        body = content if isinstance(content, str) else "".join(_render_item(i) for i in content)
        parts.append(f"{IM_START}{role}\n{body}{IM_END}\n")
    if add_generation_prompt:
        parts.append(GENERATION_PROMPT)
    return "".join(parts)


# ----------------------------------------------------------------------------- ids


def _special_id(tokenizer: Tokenizer, token: str, given: int | None, field: str) -> int:
    """The tokenizer's single id for `token`; `given` (the model config's) must agree with it."""
    i = tokenizer.token_to_id(token)
    if i is None or tokenizer.encode(token) != [i]:
        raise ValueError(f"{field}: the tokenizer does not encode {token} as one token "
                         f"(load it with load_vl3_tokenizer)")
    if given is not None and int(given) != i:
        raise ValueError(f"{field}={given} but the tokenizer's {token} is {i}")
    return i


def _expand(
    raw: np.ndarray,
    tokens_per_image: Sequence[int],
    image_token_id: int,
    region_token_id: int,
    region_token_num: int,
    region_token_counts: Sequence[int] | None,
    labels: np.ndarray | None = None,
) -> tuple[np.ndarray, ...]:
    """raw ids (one `<image>` id per image / frame) -> (ids, visual_index, region_index[, labels])."""
    if region_token_num < 1:
        raise ValueError(f"region_token_num must be >= 1, got {region_token_num}")
    tpi = [int(n) for n in tokens_per_image]
    img = np.flatnonzero(raw == image_token_id)
    if len(img) != len(tpi):
        raise ValueError(f"tokens_per_image: the prompt has {len(img)} {IMAGE_TOKEN} tokens (images / frames) "
                         f"but {len(tpi)} counts were given")
    if any(n < 0 for n in tpi):
        raise ValueError(f"tokens_per_image must be >= 0, got {tpi}")
    reps = np.ones(len(raw), np.int64)
    reps[img] = tpi
    ids = np.repeat(raw, reps).astype(np.int32)
    is_vis = ids == image_token_id
    visual_index = np.where(is_vis, np.cumsum(is_vis) - 1, -1).astype(np.int32)

    rows = np.flatnonzero(ids == region_token_id)
    # One region per maximal run of consecutive <REGION> rows (expand_regions brackets each region).
    runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1) if len(rows) else []
    if region_token_counts is None:
        counts = [len(r) for r in runs]
    else:
        counts = _check_counts(region_token_counts)
        if sum(counts) != len(rows):
            raise ValueError(f"region_token_counts: the prompt has {len(rows)} {REGION_TOKEN} tokens but the "
                             f"counts {counts} sum to {sum(counts)}")
        if [m for m in counts if m] != [len(r) for r in runs]:
            raise ValueError(f"region_token_counts {counts} do not match the runs of {REGION_TOKEN} tokens in "
                             f"the prompt {[len(r) for r in runs]}")
    if any(m > region_token_num for m in counts):
        raise ValueError(f"region_token_counts {counts}: a region has more than region_token_num="
                         f"{region_token_num} tokens")
    region_index = np.full(len(ids), -1, np.int32)
    it = iter(runs)
    for k, m in enumerate(counts):
        if m:
            region_index[next(it)] = k * region_token_num + np.arange(m)
    out = (ids, visual_index, region_index)
    if labels is not None:
        lab = np.repeat(labels, reps).astype(np.int32)
        lab[is_vis] = IGNORE_INDEX  # visual rows are never targets
        out += (lab,)
    return out


def tokenize_with_visuals(
    tokenizer: Tokenizer,
    rendered: str,
    tokens_per_image: Sequence[int],
    image_token_id: int | None = None,
    *,
    region_token_num: int,
    region_token_id: int | None = None,
    region_token_counts: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rendered text -> (input_ids, visual_index, region_index), each [L] int32 (`vl3_batch` fields).

    `<image>` is tokenised as one special id and the i-th is replaced by `tokens_per_image[i]` copies
    (image / frame i's visual tokens after pruning; 0 = fully pruned frame). visual_index: the running
    index 0..V-1 of each visual row, -1 elsewhere. region_index: `k * region_token_num + j` on the
    j-th `<REGION>` row of region k, -1 elsewhere. Each region is one maximal run of consecutive
    `<REGION>` rows; `region_token_counts`, if given, must match the runs (0-count regions, which have
    no run, keep their place in the numbering).
    `image_token_id` / `region_token_id` (the model config's) must match the tokenizer's.
    """
    image_token_id = _special_id(tokenizer, IMAGE_TOKEN, image_token_id, "image_token_id")
    region_token_id = _special_id(tokenizer, REGION_TOKEN, region_token_id, "region_token_id")
    raw = np.asarray(tokenizer.encode(rendered), np.int64)
    return _expand(raw, tokens_per_image, image_token_id, region_token_id, region_token_num, region_token_counts)


# ----------------------------------------------------------------------------- conversations


def _check_conversation(conversation: Sequence[Message]) -> list[dict]:
    if not conversation:
        raise ValueError("conversation: empty")
    msgs = []
    for i, m in enumerate(conversation):
        if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"conversation[{i}]: expected {{'role': one of {ROLES}, 'content': str}}, got {m!r}")
        msgs.append({"role": m["role"], "content": m["content"]})
    first = next((m["role"] for m in msgs if m["role"] != "system"), None)
    if first != "user":
        raise ValueError(f"conversation: the first non-system message must be a user turn, got {first!r} "
                         "(drop leading assistant turns first, e.g. with text.chat.conversations_to_messages)")
    return msgs


def _prepare(
    conversation: Sequence[Message],
    modal: str,
    num_frames: int | None,
    timestamps: Sequence[float] | None,
    region_token_counts: Sequence[int],
    text_first: bool,
) -> list[dict]:
    """Regions expanded over all turns in order (§9.5), the modal tag added to the first user turn if
    no user turn has it, user turns split into items; other turns stay strings."""
    msgs = _check_conversation(conversation)
    counts = _check_counts(region_token_counts)
    n = sum(m["content"].count(REGION_PLACEHOLDER) for m in msgs)
    if n != len(counts):
        raise ValueError(f"the conversation has {n} {REGION_PLACEHOLDER} placeholders but {len(counts)} region "
                         "token counts were given")
    start = 0
    for m in msgs:
        k = m["content"].count(REGION_PLACEHOLDER)
        m["content"] = _expand_placeholders(m["content"], counts[start:start + k])
        start += k
    tag = _modal_tag(modal)
    users = [m for m in msgs if m["role"] == "user"]
    if tag is not None and not any(tag in m["content"] for m in users):
        users[0]["content"] = _with_tag(users[0]["content"], tag, text_first)
    for m in msgs:
        if m["role"] == "user":
            m["content"] = _split_content(m["content"], modal, num_frames, timestamps)
        elif IMAGE_TOKEN in m["content"]:
            raise ValueError(f"a {m['role']} message contains {IMAGE_TOKEN}: visual tokens go in user turns")
    return msgs


def training_example(
    tokenizer: Tokenizer,
    conversation: Sequence[Message],
    *,
    modal: str,
    tokens_per_image: Sequence[int],
    region_token_num: int,
    num_frames: int | None = None,
    timestamps: Sequence[float] | None = None,
    region_token_counts: Sequence[int] = (),
    text_first: bool = False,
    image_token_id: int | None = None,
    region_token_id: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A conversation `[{"role", "content"}]` -> (input_ids, labels, visual_index, region_index), [L] int32.

    Contents are raw strings with `<region>` placeholders (expanded by `region_token_counts`, over all
    turns in order) and the modal tag (added to the first user turn if absent). Each message is
    rendered and tokenised on its own and the ids concatenated (§9.4). Labels: IGNORE_INDEX on system
    and user messages; on an assistant message IGNORE_INDEX on the generation prefix
    (`<|im_start|>assistant\\n`, its token length from the tokenizer: 3 for Qwen) and on the final
    "\\n"; the answer tokens and `<|im_end|>` are supervised. Visual rows are never supervised.
    Other arguments as `build_user_content` / `tokenize_with_visuals`.
    """
    image_token_id = _special_id(tokenizer, IMAGE_TOKEN, image_token_id, "image_token_id")
    region_token_id = _special_id(tokenizer, REGION_TOKEN, region_token_id, "region_token_id")
    msgs = _prepare(conversation, modal, num_frames, timestamps, region_token_counts, text_first)
    if not any(m["role"] == "assistant" for m in msgs):
        raise ValueError("conversation: no assistant message, nothing to supervise")
    prefix = len(tokenizer.encode(GENERATION_PROMPT))
    ids, labels = [], []
    for m in msgs:
        part = np.asarray(tokenizer.encode(render([m])), np.int64)
        lab = np.full(len(part), IGNORE_INDEX, np.int64)
        if m["role"] == "assistant":
            lab[prefix:-1] = part[prefix:-1]
        ids.append(part)
        labels.append(lab)
    ids_, vis, reg, lab_ = _expand(np.concatenate(ids), tokens_per_image, image_token_id, region_token_id,
                                   region_token_num, region_token_counts, labels=np.concatenate(labels))
    return ids_, lab_, vis, reg


def render_inference(
    conversation: str | Sequence[Message],
    *,
    modal: str,
    num_frames: int | None = None,
    timestamps: Sequence[float] | None = None,
    region_token_counts: Sequence[int] = (),
    text_first: bool = False,
) -> str:
    """The inference prompt text: an instruction (one user turn) or a conversation ending with a user
    turn, prepared as in `training_example`, rendered with the generation prompt (official `mm_infer`)."""
    if isinstance(conversation, str):
        conversation = [{"role": "user", "content": conversation}]
    msgs = _prepare(conversation, modal, num_frames, timestamps, region_token_counts, text_first)
    if msgs[-1]["role"] != "user":
        raise ValueError(f"conversation: the last message must be a user turn, got {msgs[-1]['role']!r}")
    return render(msgs, add_generation_prompt=True)


def inference_prompt(
    tokenizer: Tokenizer,
    conversation: str | Sequence[Message],
    *,
    modal: str,
    tokens_per_image: Sequence[int],
    region_token_num: int,
    num_frames: int | None = None,
    timestamps: Sequence[float] | None = None,
    region_token_counts: Sequence[int] = (),
    text_first: bool = False,
    image_token_id: int | None = None,
    region_token_id: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`render_inference` tokenised: (input_ids, visual_index, region_index), [L] int32, ending with
    `<|im_start|>assistant\\n`."""
    text = render_inference(conversation, modal=modal, num_frames=num_frames, timestamps=timestamps,
                            region_token_counts=region_token_counts, text_first=text_first)
    return tokenize_with_visuals(tokenizer, text, tokens_per_image, image_token_id,
                                 region_token_num=region_token_num, region_token_id=region_token_id,
                                 region_token_counts=region_token_counts)
