"""Committed token ids -> text deltas, with stop strings.

Text is released as soon as it is certain: an incomplete UTF-8 sequence
(decoded as U+FFFD at the end) and any tail that could still become a stop
string are held back; on a stop string the text ends just before it. The
deltas are a pure function of the token ids, so a restarted request releases
the same deltas at the same positions.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.sent = 0          # characters of the decoded text already released
        self.text = ""

    def push(self, token_id: int, final: bool = False) -> tuple[str, bool]:
        """Add a token; return (text delta now certain, stopped)."""
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
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
        safe = len(self.text)
        if self.text.endswith("\ufffd"):
            safe -= 1
        safe -= self._stop_prefix_len(self.text[:safe])
        if safe <= self.sent:
            return "", False
        delta = self.text[self.sent:safe]
        self.sent = safe
        return delta, False

    def flush(self) -> str:
        delta = self.text[self.sent:]
        self.sent = len(self.text)
        return delta

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that starts some stop string."""
        best = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if stop.startswith(text[-n:]):
                    best = n
                    break
        return best
