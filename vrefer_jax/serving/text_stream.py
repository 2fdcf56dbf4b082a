"""Token ids -> streamed text: deltas whose concatenation is exactly the final answer.

The final answer is `tokenizer.decode(ids, skip_special_tokens=True).strip()` (`Predictor.decode`).
Decoding a growing prefix is not always a prefix of the final text: a byte-level BPE token can end
inside a UTF-8 character (decoded as U+FFFD until the next token completes it), trailing whitespace
is stripped at the end, and tokenizer clean-up can join a space with the next piece. So a delta is
only what stays fixed: the text without its trailing whitespace and trailing U+FFFD (a replacement
character followed by more text is final: later bytes cannot repair an earlier broken sequence).
"""

from __future__ import annotations

from collections.abc import Sequence

_REPLACEMENT = "\ufffd"


class TextStream:
    """Feed the row's tokens so far (`update`), get the new text; `finish` gives the rest."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.sent = ""

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def update(self, ids: Sequence[int]) -> str:
        stable = self._decode(ids).lstrip()
        while True:
            cut = stable.rstrip().rstrip(_REPLACEMENT)
            if cut == stable:
                break
            stable = cut
        if len(stable) <= len(self.sent) or not stable.startswith(self.sent):
            return ""  # nothing new that is certain yet
        delta, self.sent = stable[len(self.sent):], stable
        return delta

    def finish(self, ids: Sequence[int]) -> tuple[str, str]:
        """(the rest of the text, the final answer). If the final answer does not extend what was
        sent (decoding changed an earlier piece), the rest is empty and the answer is authoritative."""
        final = self._decode(ids).strip()
        rest = final[len(self.sent):] if final.startswith(self.sent) else ""
        self.sent = final if final.startswith(self.sent) else self.sent
        return rest, final
