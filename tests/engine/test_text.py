"""Text deltas: stop strings end the text before them, nothing is released
twice, and partial UTF-8 is held back."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def test_engine_decoder_equals_the_tokenizers_decode():
    """The engine detokenizes through the Rust backend when transformers' decode
    would return the same text; on any ids (special tokens, cut UTF-8) it does."""
    import random

    from dexserve.contract.model_card import ModelCard
    from dexserve.engine.tokenizer import _BackendDecoder, load_tokenizer, text_decoder

    tok = load_tokenizer(ModelCard.load(None))
    dec = text_decoder(tok)
    assert isinstance(dec, _BackendDecoder)
    rng = random.Random(0)
    special = sorted(tok.all_special_ids)
    for n in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        if n % 3 == 0:
            ids.insert(rng.randrange(len(ids) + 1), rng.choice(special))
        for skip in (True, False):
            assert dec.decode(ids, skip_special_tokens=skip) == tok.decode(ids, skip_special_tokens=skip)


def test_engine_decoder_keeps_transformers_decode_when_it_cleans_up_spaces():
    from dexserve.contract.model_card import ModelCard
    from dexserve.engine.tokenizer import load_tokenizer, text_decoder

    tok = load_tokenizer(ModelCard.load(None))
    tok.clean_up_tokenization_spaces = True
    assert text_decoder(tok) is tok


def _llama_style_tokenizer():
    """A SentencePiece-style tokenizer (Llama 2's decoder: '▁' -> space, byte
    fallback, the first leading space stripped), built here from a small vocab."""
    from tokenizers import Tokenizer, decoders, models

    pieces = ["<unk>", "<s>", "</s>", "▁", "▁a", "▁the", "b", "c", ",", "▁,", "▁▁", "é", "z"]
    pieces += [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[], byte_fallback=True,
                               unk_token="<unk>"))
    tok.add_special_tokens(["<s>", "</s>"])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok, len(pieces)


def _shipped_tokenizer():
    from dexserve.contract.model_card import ModelCard
    from dexserve.engine.tokenizer import load_tokenizer, text_decoder

    tok = load_tokenizer(ModelCard.load(None))
    return text_decoder(tok), tok.vocab_size


_TOKENIZERS = {}


def _tokenizer(name: str):
    if name not in _TOKENIZERS:
        _TOKENIZERS[name] = _llama_style_tokenizer() if name == "llama" else _shipped_tokenizer()
    return _TOKENIZERS[name]


def _full_decode_deltas(tok, ids: list[int], final: bool) -> str | None:
    """What the stream released when it decoded every id at each commit (before
    decoding went incremental): the text so far minus a trailing U+FFFD. None
    when a later decode rewrote text already released (byte fallback turns a
    run of valid bytes into U+FFFDs once a later byte makes the run invalid):
    no stream can take back what it sent, so there is no reference."""
    out, sent = [], 0
    for n in range(1, len(ids) + 1):
        text = tok.decode(ids[:n], skip_special_tokens=True)
        if not text.startswith("".join(out)):
            return None
        safe = len(text) if (final and n == len(ids)) or not text.endswith("\ufffd") else len(text) - 1
        if safe > sent:
            out.append(text[sent:safe])
            sent = safe
    return "".join(out) + text[sent:]


@pytest.mark.parametrize("name", ["shipped", "llama"])
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_incremental_deltas_add_up_to_the_full_decode(name, data):
    """Any ids (special tokens, cut and invalid UTF-8, lone '▁'): the released
    deltas join to what decoding all ids at every commit released, whether the
    last token ends the stream (eos) or the stream is flushed; and, when no
    U+FFFD is involved, to the full decode itself."""
    tok, vocab = _tokenizer(name)
    ids = data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=60))
    eos = data.draw(st.booleans())
    s = TextStream(tok)
    out = [s.push(i)[0] for i in ids[:-1]]
    if eos:
        out.append(s.push(ids[-1], final=True)[0])
    else:
        out += [s.push(ids[-1])[0], s.flush()]
    joined = "".join(out)
    reference = _full_decode_deltas(tok, ids, eos)
    if reference is not None:
        assert joined == reference
    if "\ufffd" not in joined:
        assert joined == tok.decode(ids, skip_special_tokens=True)


def test_a_long_generation_decodes_a_short_window():
    """Each commit decodes a few ids, not the whole generation."""
    seen = []

    class Spy(CharTokenizer):
        def decode(self, ids, skip_special_tokens=True):
            seen.append(len(ids))
            return super().decode(ids, skip_special_tokens)

    s = TextStream(Spy({i: bytes([97 + i % 26]) for i in range(26)}))
    for i in range(2000):
        s.push(i % 26)
    assert max(seen) <= 2 and s.flush() == "" and s.text == "".join(chr(97 + i % 26) for i in range(2000))
