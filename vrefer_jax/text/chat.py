"""Qwen2 ChatML rendering (no Jinja) and conversion of the official conversation records.

`render_chat` gives the same string as `tokenizer.apply_chat_template(messages, tokenize=False)`
with the Qwen2-Instruct template, which VideoRefer-7B's tokenizer inherits:

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n      (only if messages[0] is not system)
    <|im_start|>{role}\\n{content}<|im_end|>\\n                        (each message)
    <|im_start|>assistant\\n                                          (add_generation_prompt)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

DEFAULT_SYSTEM = "You are a helpful assistant."
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
MODAL_TOKENS = ("<image>", "<video>")
# Official record roles -> chat roles (`preprocess`); user/assistant are accepted as they are.
# Records carry no system turn (the official role map has none).
ROLES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"}

Message = Mapping[str, str]


def render_chat(
    messages: Sequence[Message],
    add_generation_prompt: bool = False,
    default_system: str | None = DEFAULT_SYSTEM,
) -> str:
    """Messages `[{"role", "content"}]` -> ChatML text. `default_system=None` inserts no system turn.

    Like the template, an empty message list yields no system turn (it is emitted inside the loop).
    """
    parts = []
    if messages and messages[0]["role"] != "system" and default_system is not None:
        parts.append(f"{IM_START}system\n{default_system}{IM_END}\n")
    for m in messages:
        parts.append(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n")
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)


def move_modal_token(conversations: Sequence[Mapping[str, str]], modal_token: str) -> list[dict]:
    """Official `preprocess_multimodal`: every turn whose text contains `modal_token` has all its
    occurrences removed and one put at the front: `modal_token + "\\n" + rest.strip()`.

    (The official loop visits every turn, not only human ones; data puts the tag in human turns.)
    """
    if modal_token not in MODAL_TOKENS:
        raise ValueError(f"unsupported modal token {modal_token!r}; expected one of {MODAL_TOKENS}")
    out = []
    for turn in conversations:
        turn = dict(turn)
        if modal_token in turn["value"]:
            turn["value"] = (modal_token + "\n" + turn["value"].replace(modal_token, "").strip()).strip()
        out.append(turn)
    return out


def conversations_to_messages(
    conversations: Sequence[Mapping[str, str]], modal_token: str | None = None
) -> list[dict]:
    """Official records `[{"from": "human"|"gpt", "value"}]` -> chat messages.

    With `modal_token` ("<video>" / "<image>", i.e. the sample has a video / an image), the tag is
    moved to the front of its turn first (`move_modal_token`). A leading non-human turn is dropped,
    as in the official `preprocess`.
    """
    if modal_token:
        conversations = move_modal_token(conversations, modal_token)
    msgs = []
    for turn in conversations:
        role = ROLES.get(turn["from"])
        if role is None:
            raise ValueError(f"unknown conversation role {turn['from']!r}")
        msgs.append({"role": role, "content": turn["value"]})
    if msgs and msgs[0]["role"] != "user":
        msgs = msgs[1:]
    return msgs
