"""Text deltas: stop strings end the text before them, nothing is released
twice, and partial UTF-8 is held back."""

from __future__ import annotations

from dexserve.contract.text import TextStream


class CharTokenizer:
    """id -> bytes; decode like a byte-level tokenizer (invalid UTF-8 -> U+FFFD)."""

    def __init__(self, pieces: dict[int, bytes]) -> None:
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def feed(stream: TextStream, ids: list[int]) -> tuple[str, bool]:
    out = []
    for i in ids:
        delta, stopped = stream.push(i)
        out.append(delta)
        if stopped:
            return "".join(out), True
    out.append(stream.flush())
    return "".join(out), False


def test_plain_text_streams_through():
    tok = CharTokenizer({i: bytes([c]) for i, c in enumerate(b"abc def")})
    text, stopped = feed(TextStream(tok), list(range(7)))
    assert text == "abc def" and not stopped


def test_stop_string_across_tokens_is_cut_and_never_released():
    tok = CharTokenizer({1: b"x = 1", 2: b"\n\n", 3: b"def", 4: b" g"})
    s = TextStream(tok, stop=("\ndef",))
    released = []
    for i in (1, 2, 3, 4):
        d, stopped = s.push(i)
        released.append(d)
        if stopped:
            break
    assert "".join(released) == "x = 1\n"
    assert stopped


def test_partial_utf8_is_held_back():
    euro = "€".encode()
    tok = CharTokenizer({1: b"a", 2: euro[:1], 3: euro[1:2], 4: euro[2:]})
    s = TextStream(tok)
    assert s.push(1) == ("a", False)
    assert s.push(2) == ("", False)
    assert s.push(3) == ("", False)
    assert s.push(4) == ("€", False)


def test_prefix_of_stop_is_released_once_it_cannot_match():
    tok = CharTokenizer({1: b"ab", 2: b"c", 3: b"d"})
    s = TextStream(tok, stop=("bcx",))
    assert s.push(1) == ("a", False)     # "b" could start the stop string
    assert s.push(2) == ("", False)      # "bc" still could
    assert s.push(3) == ("bcd", False)   # now it cannot
