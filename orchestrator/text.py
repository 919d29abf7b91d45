"""Text and token ids: a chat turn as the target reads it, and streaming text from committed
token ids (incremental detokenisation and stop strings)."""

from __future__ import annotations

from collections.abc import Callable, Sequence


def chat_ids(tokenizer, messages: Sequence[tuple[str, str]]) -> list[int]:
    """The token ids of a conversation ((role, content) pairs) rendered by the tokenizer's
    chat template, ready for the assistant's answer: how the orchestrator tokenizes a chat
    turn, and so how the bench and `specd train` must."""
    rendered = tokenizer.apply_chat_template(
        [{"role": role, "content": content} for role, content in messages], tokenize=False, add_generation_prompt=True
    )
    return tokenizer.encode(rendered, add_special_tokens=False)


class TextStream:
    """Turns token ids, pushed a round at a time, into text deltas.

    Decoding re-reads only a short window of ids per push (as vLLM's detokenizer does): the
    text of ids[prefix:] minus the text of ids[prefix:read] is the new text, and a trailing
    U+FFFD means a multi-byte character is still incomplete, so it is held back.

    Stop strings: the text is cut before the first occurrence of any stop string, and the
    last len(longest stop) - 1 characters are held back until they cannot begin one.

    >>> s = TextStream(lambda ids: "".join(chr(i) for i in ids), stop=("\\n\\n",))
    >>> s.push([72, 105, 10]), s.push([10, 88])
    ('Hi', '')
    >>> s.stopped, s.text
    (True, 'Hi')
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = tuple(s for s in stop if s)
        self._holdback = max((len(s) for s in self._stop), default=1) - 1
        self._ids: list[int] = []
        self._prefix = 0  # ids[:_prefix] are fully reflected in _decoded and no longer re-read
        self._read = 0  # ids[_prefix:_read] were decoded last time as the window's context
        self._decoded = ""  # all text decoded so far
        self._emitted = 0  # characters of _decoded already returned
        self.stopped = False

    @property
    def text(self) -> str:
        """The text so far (cut at a stop string if one was met)."""
        return self._decoded

    def push(self, ids: Sequence[int]) -> str:
        """Adds ids and returns the text that can be shown now."""
        if self.stopped:
            return ""
        self._ids.extend(ids)
        before = self._decode(self._ids[self._prefix : self._read])
        window = self._decode(self._ids[self._prefix :])
        if len(window) > len(before) and not window.endswith("\ufffd"):
            self._decoded += window[len(before) :]
            self._prefix, self._read = self._read, len(self._ids)
        return self._release(final=False)

    def finish(self) -> str:
        """Returns whatever is still held back (an incomplete character, a partial stop string)."""
        if not self.stopped:
            tail = self._decode(self._ids[self._prefix :])[len(self._decode(self._ids[self._prefix : self._read])) :]
            self._decoded += tail
            self._prefix = self._read = len(self._ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self._stop and not self.stopped:
            start = max(0, self._emitted - self._holdback)
            hits = [i for i in (self._decoded.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                self._decoded = self._decoded[: min(hits)]
                self.stopped = True
        end = len(self._decoded) if (final or self.stopped) else max(self._emitted, len(self._decoded) - self._holdback)
        out = self._decoded[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return out
