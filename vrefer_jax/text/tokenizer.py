"""Tokenizers without `transformers`: a small interface and two backends.

* `HFTokenizer`: a Hugging Face fast tokenizer (`tokenizer.json`) run by the `tokenizers` library,
  or a Qwen2 `vocab.json` + `merges.txt` pair rebuilt into one (NFC, the Qwen2 split regex,
  byte-level BPE), which is how a checkpoint saved by the slow tokenizer is shipped.
* `SentencePieceTokenizer`: a sentencepiece `.model` (LLaMA / Mistral style).

Both behave like `transformers`' `tokenizer(text, add_special_tokens=False).input_ids`: nothing is
added around the text, and special / added tokens written in the text (`<|im_start|>`, `<region>`)
become their single ids. `<region>` is added as a special token when the vocabulary lacks it, as the
official `initialize_MM_tokenizer` does (so it gets id `len(vocab)`, 151646 for Qwen2).

Negative ids (multimodal placeholders -200/-201, IGNORE_INDEX -100) may be passed to `decode`:
they are skipped, or shown as `<image>` / `<video>` when `skip_special_tokens=False`.
"""

from __future__ import annotations

import abc
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from vrefer_jax.config import IMAGE_TOKEN_INDEX, VIDEO_TOKEN_INDEX

REGION_TOKEN = "<region>"
# Qwen2's pre-tokenization pattern (public tokenizer spec): contractions, letter runs with one
# optional leading non-letter, single digits, punctuation runs, newlines, whitespace.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_PLACEHOLDER_TEXT = {IMAGE_TOKEN_INDEX: "<image>", VIDEO_TOKEN_INDEX: "<video>"}


class Tokenizer(abc.ABC):
    """What the rest of vrefer-jax needs from a tokenizer.

    Attributes set by the backends: `eos_id`, `pad_id` (int), `bos_id`, `unk_id` (int or None),
    `special_ids` (frozenset: ids dropped by `decode(skip_special_tokens=True)`).
    """

    eos_id: int
    pad_id: int
    bos_id: int | None
    unk_id: int | None
    special_ids: frozenset[int]

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Text -> ids, no BOS/EOS added; special tokens in the text map to their single ids."""

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry (piece / added token), None if absent."""

    @abc.abstractmethod
    def id_to_token(self, token_id: int) -> str | None:
        """Vocabulary entry of an id, None if out of range."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids including added tokens (`len(tokenizer)` in `transformers`)."""

    @abc.abstractmethod
    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        """Decode non-negative ids."""

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Ids -> text. Negative ids are placeholders: skipped, or `<image>`/`<video>` when kept."""
        out, run = [], []
        for i in (int(x) for x in ids):
            if i >= 0:
                run.append(i)
                continue
            if run:
                out.append(self._decode(run, skip_special_tokens))
                run = []
            if not skip_special_tokens and i in _PLACEHOLDER_TEXT:
                out.append(_PLACEHOLDER_TEXT[i])
        if run or not out:
            out.append(self._decode(run, skip_special_tokens))
        return "".join(out)

    @property
    def eos_token(self) -> str:
        return self.id_to_token(self.eos_id)

    @property
    def region_id(self) -> int:
        i = self.token_to_id(REGION_TOKEN)
        if i is None:
            raise KeyError(f"{REGION_TOKEN} is not in the vocabulary")
        return i

    def __len__(self) -> int:
        return self.vocab_size


# ----------------------------------------------------------------------------- helpers


def _token_text(v: Any) -> str | None:
    """A special-token entry of a config: a string or an AddedToken dict."""
    if isinstance(v, Mapping):
        return v.get("content")
    return v if isinstance(v, str) else None


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _special_token_names(folder: str) -> dict[str, str | None]:
    """bos/eos/pad/unk from `tokenizer_config.json`, overridden by `special_tokens_map.json`
    (the order `transformers` applies them in)."""
    names: dict[str, str | None] = {}
    for fname in ("tokenizer_config.json", "special_tokens_map.json"):
        cfg = _read_json(os.path.join(folder, fname))
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            if key in cfg:
                names[key] = _token_text(cfg[key])
    return names


def clean_up_tokenization(text: str) -> str:
    """`transformers`' `clean_up_tokenization_spaces` rule (off for Qwen2)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def _pick(tok: Tokenizer, *candidates: str | None) -> int | None:
    for c in candidates:
        if c is not None and (i := tok.token_to_id(c)) is not None:
            return i
    return None


# ----------------------------------------------------------------------------- tokenizers backend


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (Hugging Face fast tokenizer), e.g. Qwen2's byte-level BPE."""

    def __init__(
        self,
        tok: Any,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        clean_up_tokenization_spaces: bool = False,
        extra_special_tokens: Sequence[str] = (REGION_TOKEN,),
    ):
        from tokenizers import AddedToken

        missing = [t for t in extra_special_tokens if tok.token_to_id(t) is None]
        if missing:  # as `add_tokens(..., special_tokens=True)`: appended, not normalised
            tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        self._tok = tok
        self._clean_up = clean_up_tokenization_spaces
        added = tok.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        self.bos_id = _pick(self, bos_token)
        self.unk_id = _pick(self, unk_token)
        # Defaults when no config names them: ChatML models end turns with <|im_end|>; Qwen2
        # pads with <|endoftext|>; the official trainer falls back to unk for the pad.
        eos = _pick(self, eos_token, "<|im_end|>", "<|endoftext|>", "</s>")
        if eos is None:
            raise ValueError("cannot determine the eos token; pass eos_token")
        self.eos_id = eos
        pad = _pick(self, pad_token, unk_token, "<|endoftext|>")
        self.pad_id = eos if pad is None else pad

    @classmethod
    def from_file(cls, path: str, **overrides: Any) -> HFTokenizer:
        """Load from a folder or a `tokenizer.json` path.

        The folder's `tokenizer_config.json` / `special_tokens_map.json` name eos/pad/bos/unk and
        `clean_up_tokenization_spaces`; keyword arguments override them. Without `tokenizer.json`,
        a Qwen2 `vocab.json` + `merges.txt` is rebuilt and the added tokens of `added_tokens.json`
        and `tokenizer_config.json`'s `added_tokens_decoder` are appended at their recorded ids.
        """
        from tokenizers import Tokenizer as _Tok

        folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        tj = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if os.path.isfile(tj):
            tok = _Tok.from_file(tj)
        elif os.path.isfile(os.path.join(folder, "vocab.json")):
            tok = _qwen2_from_vocab(folder)
        else:
            raise FileNotFoundError(f"no tokenizer.json or vocab.json+merges.txt at {path}")
        cfg = _read_json(os.path.join(folder, "tokenizer_config.json"))
        kwargs: dict[str, Any] = dict(_special_token_names(folder))
        kwargs["clean_up_tokenization_spaces"] = bool(cfg.get("clean_up_tokenization_spaces", False))
        kwargs.update(overrides)
        return cls(tok, **kwargs)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        text = self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if self._clean_up else text

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)


def _qwen2_from_vocab(folder: str) -> Any:
    """Qwen2 slow-tokenizer files -> the equivalent `tokenizers.Tokenizer`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab, merges = models.BPE.read_file(os.path.join(folder, "vocab.json"),
                                         os.path.join(folder, "merges.txt"))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, byte_fallback=False,
                               fuse_unk=False, continuing_subword_prefix="", end_of_word_suffix=""))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()

    # id -> (content, special). added_tokens_decoder carries the flags; added_tokens.json only ids
    # (Qwen vocabularies mark every added token special).
    added: dict[int, tuple[str, bool, dict]] = {}
    for content, i in _read_json(os.path.join(folder, "added_tokens.json")).items():
        added[int(i)] = (content, True, {})
    cfg = _read_json(os.path.join(folder, "tokenizer_config.json"))
    for i, t in cfg.get("added_tokens_decoder", {}).items():
        flags = {k: t[k] for k in ("lstrip", "rstrip", "single_word", "normalized") if k in t}
        added[int(i)] = (t["content"], bool(t.get("special", True)), flags)
    for i in sorted(added):
        content, special, flags = added[i]
        flags.setdefault("normalized", not special)
        token = AddedToken(content, special=special, **flags)
        (tok.add_special_tokens if special else tok.add_tokens)([token])
        if tok.token_to_id(content) != i:
            raise ValueError(f"added token {content!r} got id {tok.token_to_id(content)}, expected {i}")
    return tok


# ----------------------------------------------------------------------------- sentencepiece backend


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model plus added tokens.

    Added tokens already in the model (user-defined symbols) keep their ids and are matched by
    sentencepiece itself; the others get ids after the model's pieces. The text is split around
    those added tokens and around control pieces (`<s>`, `</s>`) and `<unk>`, and each chunk is
    encoded separately (the `transformers` "legacy" LLaMA behaviour: sentencepiece's dummy prefix
    applies to every chunk). Control pieces, unk and the names in `special_tokens` are special.
    """

    def __init__(
        self,
        sp: Any,
        *,
        added_tokens: Sequence[str] = (REGION_TOKEN,),
        special_tokens: Sequence[str] = (REGION_TOKEN,),
        eos_token: str | None = None,
        pad_token: str | None = None,
    ):
        self._sp = sp
        self._n = sp.get_piece_size()
        unk_piece = sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None
        self._extra = [t for t in dict.fromkeys(added_tokens)  # sentencepiece answers unk if absent
                       if t != unk_piece and sp.piece_to_id(t) == sp.unk_id()]
        self._extra_ids = {t: self._n + k for k, t in enumerate(self._extra)}
        reserved = [i for i in range(self._n) if sp.is_control(i) or sp.is_unknown(i)]
        extra_special = {self.token_to_id(t) for t in special_tokens} - {None}
        self.special_ids = frozenset(reserved) | frozenset(extra_special)
        # Strings to cut the text at: added tokens unknown to sentencepiece and the control / unk
        # pieces, whose text sentencepiece would otherwise tokenise character by character.
        cut = (set(self._extra) | {sp.id_to_piece(i) for i in reserved}) - {""}
        pattern = "|".join(re.escape(t) for t in sorted(cut, key=len, reverse=True))
        self._cut = re.compile(f"({pattern})") if cut else None
        self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
        self.unk_id = sp.unk_id() if sp.unk_id() >= 0 else None
        eos = _pick(self, eos_token) if eos_token else (sp.eos_id() if sp.eos_id() >= 0 else None)
        if eos is None:
            raise ValueError("the sentencepiece model has no eos piece; pass eos_token")
        self.eos_id = eos
        pad = _pick(self, pad_token) if pad_token else (sp.pad_id() if sp.pad_id() >= 0 else None)
        # The official trainer pads with unk when the tokenizer has no pad token.
        self.pad_id = pad if pad is not None else (self.unk_id if self.unk_id is not None else eos)

    @classmethod
    def from_file(cls, model_path: str, **kwargs: Any) -> SentencePieceTokenizer:
        import sentencepiece as spm

        return cls(spm.SentencePieceProcessor(model_file=model_path), **kwargs)

    def encode(self, text: str) -> list[int]:
        chunks = self._cut.split(text) if self._cut else [text]
        ids: list[int] = []
        for k, chunk in enumerate(chunks):
            if k % 2:  # a cut token
                ids.append(self.token_to_id(chunk))
            elif chunk:
                ids.extend(self._sp.encode(chunk))
        return ids

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        out, run = [], []
        for i in ids:
            if skip_special_tokens and i in self.special_ids:
                continue
            # Control / unk / extra ids are emitted as their text: sentencepiece would drop them.
            as_text = i >= self._n or self._sp.is_control(i) or self._sp.is_unknown(i)
            if not as_text:
                run.append(i)
                continue
            if run:
                out.append(self._sp.decode(run))
                run = []
            out.append(self.id_to_token(i))
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        if token in self._extra_ids:
            return self._extra_ids[token]
        i = self._sp.piece_to_id(token)
        if i == self._sp.unk_id() and (i < 0 or token != self._sp.id_to_piece(i)):
            return None  # sentencepiece answers unk for unknown pieces
        return i

    def id_to_token(self, token_id: int) -> str | None:
        if 0 <= token_id < self._n:
            return self._sp.id_to_piece(token_id)
        k = token_id - self._n
        return self._extra[k] if 0 <= k < len(self._extra) else None

    @property
    def vocab_size(self) -> int:
        return self._n + len(self._extra)


def load_tokenizer(path: str, **kwargs: Any) -> Tokenizer:
    """`*.model` -> SentencePieceTokenizer; a folder with `tokenizer.model` and no `tokenizer.json`
    -> SentencePieceTokenizer; anything else -> HFTokenizer."""
    if path.endswith(".model"):
        return SentencePieceTokenizer.from_file(path, **kwargs)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "tokenizer.json")) \
            and os.path.isfile(os.path.join(path, "tokenizer.model")):
        return SentencePieceTokenizer.from_file(os.path.join(path, "tokenizer.model"), **kwargs)
    return HFTokenizer.from_file(path, **kwargs)
