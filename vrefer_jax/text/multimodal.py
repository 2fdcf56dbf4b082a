"""Prompt ids with multimodal placeholders, training label masks, inference prompts.

Mirrors the official `tokenizer_multimodal_token` (mm_utils.py), `preprocess` (train.py) and the
text part of `mm_infer` (videorefer/__init__.py).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

from vrefer_jax.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX, VIDEO_TOKEN_INDEX
from vrefer_jax.text.chat import DEFAULT_SYSTEM, conversations_to_messages, render_chat
from vrefer_jax.text.tokenizer import Tokenizer

MODAL_INDEX = {"<image>": IMAGE_TOKEN_INDEX, "<video>": VIDEO_TOKEN_INDEX}
_MODAL_OF = {"image": "<image>", "video": "<video>", "text": ""}


def tokenize_multimodal(tokenizer: Tokenizer, text: str, modal_token: str | None = "<video>") -> list[int]:
    """Text -> ids with one placeholder id per `modal_token` occurrence (-201 video, -200 image).

    The string is split at `modal_token` and each chunk is tokenised on its own (so e.g. the "\\n"
    after `<video>` starts a fresh chunk); chunks are joined by the placeholder. `None` or "" means
    plain tokenisation (text-only samples); any other tag in the text stays text, as officially.
    """
    if not modal_token:
        return tokenizer.encode(text)
    if modal_token not in MODAL_INDEX:
        raise ValueError(f"unsupported modal token {modal_token!r}; expected one of {tuple(MODAL_INDEX)}")
    index = MODAL_INDEX[modal_token]
    ids: list[int] = []
    for k, chunk in enumerate(text.split(modal_token)):
        if k:
            ids.append(index)
        ids.extend(tokenizer.encode(chunk))
    return ids


def build_training_example(
    tokenizer: Tokenizer,
    conversations: Sequence[Mapping[str, str]],
    modal_token: str | None = "<video>",
    default_system: str | None = DEFAULT_SYSTEM,
) -> tuple[list[int], list[int]]:
    """Official records -> `(input_ids, labels)`, the official `preprocess` (after
    `preprocess_multimodal`).

    `modal_token` is "<video>" / "<image>" for a video / image sample (the tag is moved to the front
    of its turn and becomes one placeholder id) and None for a text-only sample. Labels copy the ids
    and set IGNORE_INDEX on the system turn, every user turn and every `<|im_start|>assistant\\n`
    header; each reply with its `<|im_end|>` and following "\\n" stays supervised. Positions come,
    as officially, from the token lengths of the rendered prefix up to the k-th generation prompt
    (`instruction_k`) and through the k-th reply (`conversation_k`).
    """
    messages = conversations_to_messages(conversations, modal_token)
    if not messages:
        raise ValueError("empty conversation")
    if len(messages) % 2:
        raise ValueError(f"conversation must alternate human/gpt turns in pairs, got {len(messages)} turns")

    def n_tokens(text: str) -> int:
        return len(tokenize_multimodal(tokenizer, text, modal_token))

    full = render_chat(messages, default_system=default_system)
    input_ids = tokenize_multimodal(tokenizer, full, modal_token)
    labels = list(input_ids)
    cur = 0
    for k in range(1, len(messages), 2):
        instruction = render_chat(messages[: k], add_generation_prompt=True, default_system=default_system)
        conversation = render_chat(messages[: k + 1], default_system=default_system)
        for j in range(cur, min(n_tokens(instruction), len(labels))):
            labels[j] = IGNORE_INDEX
        cur = n_tokens(conversation)
    return input_ids, labels


def render_inference_prompt(
    question: str | Sequence[Mapping[str, str]],
    modal: str = "video",
    system_message: str | None = None,
) -> str:
    """The prompt text of official `mm_infer`.

    `question` is a string (one user turn) or a message list whose first content gets the tag.
    User content is `"<video>\\n" + question` ("<image>\\n" for images, "\\n" for modal="text").
    VideoRefer-7B (`videorefer_qwen2`) passes no system message, so the template's default one is
    used; `system_message` adds an explicit one (what the official code does for LLaMA-type models).
    """
    if modal not in _MODAL_OF:
        raise ValueError(f"unsupported modal {modal!r}; expected one of {tuple(_MODAL_OF)}")
    tag = _MODAL_OF[modal]
    if isinstance(question, str):
        messages = [{"role": "user", "content": tag + "\n" + question}]
    else:
        messages = copy.deepcopy([dict(m) for m in question])
        messages[0]["content"] = tag + "\n" + messages[0]["content"]
    if system_message is not None:
        messages = [{"role": "system", "content": system_message}] + messages
    return render_chat(messages, add_generation_prompt=True)


def build_inference_prompt(
    tokenizer: Tokenizer,
    question: str | Sequence[Mapping[str, str]],
    modal: str = "video",
    system_message: str | None = None,
) -> list[int]:
    """Ids of the `mm_infer` prompt (see `render_inference_prompt`), ending in
    `<|im_start|>assistant\\n`; one placeholder id for the video / image."""
    text = render_inference_prompt(question, modal, system_message)
    return tokenize_multimodal(tokenizer, text, _MODAL_OF[modal])
