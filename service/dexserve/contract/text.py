"""Committed token ids -> text deltas, with stop strings.

Text is released as soon as it is certain: an incomplete UTF-8 sequence
(decoded as U+FFFD at the end) and any tail that could still become a stop
string are held back; on a stop string the text ends just before it. The
deltas are a pure function of the token ids, so a restarted request releases
the same deltas at the same positions.

Decoding is incremental, as vLLM and TGI do it: each commit decodes a short
window of the latest ids (from the start of the previous delta), not the whole
generation, so a token costs the same at position 10 and at position 10,000.
The new text is what the window decodes to beyond what its older part alone
decodes to; a token that ends in an incomplete UTF-8 sequence waits in the
window until the sequence completes. Decoders that drop a leading space or
join pieces see the same neighbours as in a full decode, so the text is the
full decode's (tests/engine/test_text.py checks it on the shipped tokenizer).
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.sent = 0          # characters of the decoded text already released
        self.text = ""         # the text decoded so far (ids up to `read`)
        self.prefix = 0        # the window: ids[prefix:read] decoded to the end of `text`
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _advance(self) -> str:
        """Decode the ids past `read` in their window; '' while they end in an
        incomplete UTF-8 sequence (or add no text yet)."""
        ids, p, r = self.ids, self.prefix, self.read
        before = self._decode(ids[p:r]) if r > p else ""
        after = self._decode(ids[p:])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""
        self.prefix, self.read = r, len(ids)
        return after[len(before):]

    def push(self, token_id: int, final: bool = False) -> tuple[str, bool]:
        """Add a token; return (text delta now certain, stopped)."""
        self.ids.append(token_id)
        self.text += self._advance()
        if final:
            self._drain()
        for stop in self.stop:
            # a stop string can only appear in text not yet released plus its own length back
            at = self.text.find(stop, max(0, self.sent - len(stop) + 1))
            if at != -1:
                end = max(at, self.sent)
                delta = self.text[self.sent:end]
                self.sent = end
                return delta, True
        if final:
            return self.flush(), False
        safe = len(self.text) - self._stop_prefix_len(self.text)
        if safe <= self.sent:
            return "", False
        delta = self.text[self.sent:safe]
        self.sent = safe
        return delta, False

    def _drain(self) -> None:
        """The last token: whatever the window holds, an incomplete sequence included."""
        if self.read < len(self.ids):
            p, r = self.prefix, self.read
            before = self._decode(self.ids[p:r]) if r > p else ""
            self.text += self._decode(self.ids[p:])[len(before):]
            self.prefix = self.read = len(self.ids)

    def flush(self) -> str:
        self._drain()
        delta = self.text[self.sent:]
        self.sent = len(self.text)
        return delta

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that starts some stop string."""
        best = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
