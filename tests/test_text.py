"""Streaming text: incremental detokenisation and stop strings (orchestrator/text.py)."""

from __future__ import annotations

from orchestrator.text import TextStream

# A byte-level "tokenizer": each id is one byte, so a multi-byte character can be split
# across rounds exactly as a BPE tokenizer splits it.


def decode(ids):
    return bytes(ids).decode("utf-8", errors="replace")


def stream_all(rounds, stop=()):
    s = TextStream(decode, stop)
    pieces = [s.push(r) for r in rounds]
    pieces.append(s.finish())
    return pieces, s


def test_text_is_released_as_it_completes():
    pieces, s = stream_all([b"Hel", b"lo ", b"world"])
    assert pieces == ["Hel", "lo ", "world", ""]
    assert s.text == "Hello world" and not s.stopped


def test_a_character_split_across_rounds_is_held_until_complete():
    euro = "€".encode()  # 3 bytes
    pieces, s = stream_all([b"a" + euro[:1], euro[1:2], euro[2:] + b"b"])
    assert all("\ufffd" not in p for p in pieces)  # never half a character
    assert "".join(pieces) == s.text == "a€b"


def test_stop_string_inside_a_round_cuts_the_text():
    pieces, s = stream_all([b"one\ntwo", b"\n\nthree"], stop=("\n\n",))
    assert "".join(pieces) == "one\ntwo" and s.stopped
    assert s.push(b"more") == ""


def test_stop_string_across_rounds_is_never_shown_in_part():
    pieces, s = stream_all([b"abc<", b"/s", b">tail"], stop=("</s>",))
    assert "".join(pieces) == "abc"
    assert all("<" not in p for p in pieces)


def test_held_back_prefix_of_a_stop_string_is_released_at_the_end():
    pieces, s = stream_all([b"x <", b"/"], stop=("</s>",))
    assert "".join(pieces) == "x </" and not s.stopped
