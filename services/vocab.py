"""Vocabulary bridges between a drafter and a target whose tokenizers differ.

Timor et al. 2025, "Accelerating LLM Inference with Lossless Speculative Decoding Algorithms
for Heterogeneous Vocabularies", lets any drafter serve any target. Three conversions:

- token bytes (`token_bytes`): each token id -> the exact bytes it adds to the text, so
  vocabularies are compared on bytes, not on spellings: Qwen's `Ġthe`, Gemma's `▁the` and
  the text " the" are the same four bytes.
- token-level intersection (TLI, `VocabMap`): a drafter token and a target token with the
  same bytes are one token, so a drafter restricted to the shared tokens proposes target ids
  and its q carries over id for id.
- string-level exact match (SLEM, `TextBridge`): the target's context is decoded to text and
  re-tokenized for the drafter; the drafted text is re-tokenized for the target.

Why none of them can break losslessness: the verifier checks every drafted token against
the target's own distribution, in target ids. A conversion that picks an unusual target
tokenization of the right text, or drops text it cannot convert, only lowers acceptance.
What must hold is that drafted target tokens carry exactly drafted text, and that the
drafter sees the target's text (else its guesses are not worth checking); tests/test_vocab.py
checks both on the packaged pairs.

Text a tokenizer's normalizer rewrites does not round-trip: Qwen2.5 applies NFC (a decomposed
"é" comes back composed) and Gemma 3 reads a literal "▁" (U+2581) as a space. Gemma 3 adds no
space before the first word (no SentencePiece dummy prefix); TextBridge refuses tokenizers
that do, since every re-tokenized context would gain a space.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from services.runtime import tokenizer_fingerprint

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase as Tokenizer

log = logging.getLogger(__name__)

LOOKBEHIND = 4  # context tokens re-tokenized together with a draft (TextBridge.draft_to_target)
_SPACE_MARK = "\u2581"  # SentencePiece's "▁", which stands for a space
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's spelling of a raw byte
_CONTINUATION_BYTES = {bytes([b]) for b in range(0x80, 0xC0)}  # 10xxxxxx: inside a character


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: stand-in character -> byte.

    Byte-level BPE (GPT-2, Qwen, SmolLM2) spells every byte as one printable character:
    printable Latin-1 bytes as themselves, the other 68 as chr(256 + n) in byte order, so
    space is "Ġ" and newline "Ċ".
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(shifted)}


_BYTE_DECODER = _gpt2_byte_decoder()


def _sentencepiece_bytes(piece: str) -> bytes:
    """`▁the` -> b" the"; a byte-fallback piece `<0x0A>` -> b"\\n"."""
    raw = _BYTE_FALLBACK.fullmatch(piece)
    return bytes([int(raw.group(1), 16)]) if raw else piece.replace(_SPACE_MARK, " ").encode()


def _piece_reader(tokenizer: Tokenizer) -> Callable[[str, int], bytes]:
    """(vocabulary string, id) -> bytes, for the byte spelling the tokenizer's decoder undoes.

    The decoder is the one part of a tokenizer that must know the spelling: ByteLevel means
    GPT-2 bytes; ByteFallback, Metaspace or a "▁" -> " " replacement means SentencePiece.
    Anything else falls back to decoding the token alone, which is exact for tokens that are
    whole characters but cannot express part of one and may drop a word's leading space.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    # The decoder's own JSON: serializing the whole tokenizer would write out every piece.
    pending = [json.loads(backend.decoder.__getstate__())] if backend and backend.decoder else []
    steps = []
    while pending:
        steps.append(pending.pop())
        pending.extend(steps[-1].get("decoders", []))  # a Sequence decoder nests its steps
    kinds = {step["type"] for step in steps}
    if "ByteLevel" in kinds:
        return lambda piece, _: bytes(_BYTE_DECODER[char] for char in piece)
    if kinds & {"ByteFallback", "Metaspace"} or any(s.get("pattern", {}).get("String") == _SPACE_MARK for s in steps):
        return lambda piece, _: _sentencepiece_bytes(piece)
    return lambda _, i: tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False).encode()


def special_tokens(tokenizer: Tokenizer) -> dict[int, str]:
    """Special (control) token id -> its content, e.g. 151645 -> "<|im_end|>" in Qwen2.5."""
    found = {i: added.content for i, added in tokenizer.added_tokens_decoder.items() if added.special}
    for i in tokenizer.all_special_ids:
        found.setdefault(i, tokenizer.convert_ids_to_tokens(i))
    return found


def _rows(tokenizer: Tokenizer, size: int | None, vocab: dict[str, int] | None = None) -> int:
    """The id space: `size` rows of a model's output layer, or else every tokenizer id."""
    ids = max(len(tokenizer), max((vocab or tokenizer.get_vocab()).values()) + 1)
    assert size is None or size >= ids, f"size {size} is below the tokenizer's {ids} ids"
    return ids if size is None else size


def token_bytes(tokenizer: Tokenizer, size: int | None = None) -> list[bytes | None]:
    """The bytes each id adds to the text in mid-sequence; None for special tokens and for
    rows past the tokenizer's ids (a model's output layer may have more rows: pass `size`).

    Non-special added tokens (Gemma's "\\n\\n", Qwen's "<tool_call>") are matched on raw text,
    so their content is their bytes. The packaged Qwen2.5 tokenizer also holds plain
    vocabulary entries "[PAD151665]".."[PAD151935]" for its padding rows: no merge produces
    them, so encoding never does, and they keep their literal bytes here.
    """
    vocab = tokenizer.get_vocab()  # token string -> id, added tokens included
    table: list[bytes | None] = [None] * _rows(tokenizer, size, vocab)
    special = special_tokens(tokenizer)
    added = {i: token.content for i, token in tokenizer.added_tokens_decoder.items()}
    read = _piece_reader(tokenizer)
    for piece, i in vocab.items():
        if i not in special:
            table[i] = added[i].encode() if i in added else read(piece, i)
    return table


def _spelled(table: list[bytes | None], special: dict[int, str]) -> list[bytes]:
    """token bytes with special tokens spelled as their content, as text shows them."""
    spelled = [piece or b"" for piece in table]
    for i, content in special.items():
        spelled[i] = content.encode()
    return spelled


def _canonical_ids(tokenizer: Tokenizer, table: list[bytes | None]) -> dict[bytes, int]:
    """bytes -> the one token that stands for them. Where several tokens add the same bytes
    (Gemma's piece "a" and byte-fallback piece `<0x61>`; its added "\\n" and `<0x0A>`), that is
    the one the tokenizer produces for those bytes alone, else the lowest id."""
    groups: dict[bytes, list[int]] = {}
    for i, piece in enumerate(table):
        if piece:
            groups.setdefault(piece, []).append(i)
    canonical = {}
    for piece, ids in groups.items():
        canonical[piece] = ids[0]
        if len(ids) > 1:
            text = piece.decode(errors="ignore")
            alone = tokenizer.encode(text, add_special_tokens=False) if text.encode() == piece else []
            canonical[piece] = alone[0] if len(alone) == 1 and alone[0] in ids else ids[0]
    return canonical


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value to compare
class VocabMap:
    """Token-level intersection (TLI) of a drafter and a target vocabulary, one-to-one.

    Tokens pair up when they add the same bytes (through `_canonical_ids` where one side has
    several such tokens); special tokens pair up when their contents match (`<|im_end|>` in
    Qwen2.5 and SmolLM2).
    """

    drafter_to_target: torch.Tensor  # (V_q,) int64: target id of each drafter id, -1 where none
    target_to_drafter: torch.Tensor  # (V_p,) int64: the inverse, -1 where none
    shared: int  # tokens in the intersection

    def __post_init__(self) -> None:
        for name in ("drafter_to_target", "target_to_drafter"):
            table = getattr(self, name)
            assert table.dtype == torch.int64 and table.dim() == 1, f"{name} must be (V,) int64"
            assert int((table >= 0).sum()) == self.shared, f"{name} maps {int((table >= 0).sum())}, not {self.shared}"

    @classmethod
    def build(
        cls, drafter_tokenizer: Tokenizer, target_tokenizer: Tokenizer,
        drafter_size: int | None = None, target_size: int | None = None,
    ) -> VocabMap:
        """The map of two tokenizers, over `size` rows each where given (a model's output layer)."""
        started = time.perf_counter()
        drafter_table = token_bytes(drafter_tokenizer, drafter_size)
        target_table = token_bytes(target_tokenizer, target_size)
        drafter_ids = _canonical_ids(drafter_tokenizer, drafter_table)
        target_ids = _canonical_ids(target_tokenizer, target_table)
        pairs = [(drafter_ids[piece], target_ids[piece]) for piece in drafter_ids.keys() & target_ids.keys()]
        target_special = {content: i for i, content in special_tokens(target_tokenizer).items()}
        pairs += [(i, target_special[c]) for i, c in special_tokens(drafter_tokenizer).items() if c in target_special]
        drafter_to_target = torch.full((len(drafter_table),), -1, dtype=torch.int64)
        target_to_drafter = torch.full((len(target_table),), -1, dtype=torch.int64)
        if pairs:
            drafter, target = torch.tensor(pairs, dtype=torch.int64).T  # (shared,) each
            drafter_to_target[drafter], target_to_drafter[target] = target, drafter
        log.info(
            "vocab map %s -> %s: %d shared tokens, built in %.2fs",
            drafter_tokenizer.name_or_path, target_tokenizer.name_or_path, len(pairs), time.perf_counter() - started,
        )
        return cls(drafter_to_target, target_to_drafter, len(pairs))

    @classmethod
    def load_or_build(
        cls, drafter_tokenizer: Tokenizer, target_tokenizer: Tokenizer, cache_dir: Path,
        drafter_size: int | None = None, target_size: int | None = None,
    ) -> VocabMap:
        """`build`, cached under both tokenizers' fingerprints (a build takes seconds).

        A cached map for other row counts (another `size`) is rebuilt and replaced.
        """
        fingerprints = tokenizer_fingerprint(drafter_tokenizer)[:16], tokenizer_fingerprint(target_tokenizer)[:16]
        path = cache_dir / "{}-{}.pt".format(*fingerprints)
        rows = _rows(drafter_tokenizer, drafter_size), _rows(target_tokenizer, target_size)
        if path.exists():
            saved = torch.load(path, weights_only=True)
            cached = cls(saved["drafter_to_target"], saved["target_to_drafter"], int(saved["shared"]))
            if (len(cached.drafter_to_target), len(cached.target_to_drafter)) == rows:
                return cached
            log.info("rebuilding %s: it has %s rows, %s asked for", path, saved["drafter_to_target"].shape, rows)
        built = cls.build(drafter_tokenizer, target_tokenizer, drafter_size, target_size)
        cache_dir.mkdir(parents=True, exist_ok=True)
        state = {"drafter_to_target": built.drafter_to_target, "target_to_drafter": built.target_to_drafter}
        with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".tmp", delete=False) as tmp:
            torch.save({**state, "shared": built.shared}, tmp)
        os.replace(tmp.name, path)  # atomic: a concurrent reader sees the old file or the new one
        return built


def _valid_utf8_prefix(data: bytes) -> bytes:
    """The longest prefix of data that is whole UTF-8 characters."""
    try:
        data.decode()
        return data
    except UnicodeDecodeError as error:
        return data[: error.start]


class TextBridge:
    """String-level exact match (SLEM) between a drafter and a target: text is the common
    ground, re-tokenized on each side.

    A round: `drafter_context(target_ids)` gives the drafter ids and `pending`, the bytes of an
    unfinished character the target has emitted part of. The drafter continues its ids; its
    output (`drafter_bytes`) begins with `pending` if it finishes that character, and the rest
    is the draft, which `draft_to_target` turns into target ids. A drafted special token
    (`<|im_end|>`) becomes the target's through `target_special`.
    """

    def __init__(
        self, drafter_tokenizer: Tokenizer, target_tokenizer: Tokenizer,
        drafter_size: int | None = None, target_size: int | None = None,
    ) -> None:
        self.drafter_tokenizer, self.target_tokenizer = drafter_tokenizer, target_tokenizer
        self.drafter_token_bytes = token_bytes(drafter_tokenizer, drafter_size)  # None where a draft stops
        self.target_token_bytes = token_bytes(target_tokenizer, target_size)
        drafter_special, target_special = special_tokens(drafter_tokenizer), special_tokens(target_tokenizer)
        self._drafter_text = _spelled(self.drafter_token_bytes, drafter_special)
        self._target_text = _spelled(self.target_token_bytes, target_special)
        by_content = {content: i for i, content in target_special.items()}
        self._special_to_target = {i: by_content[c] for i, c in drafter_special.items() if c in by_content}
        for tokenizer, text in ((drafter_tokenizer, self._drafter_text), (target_tokenizer, self._target_text)):
            if b"".join(text[i] for i in tokenizer.encode("a", add_special_tokens=False)) != b"a":
                raise ValueError(f"{tokenizer.name_or_path} adds text when encoding 'a' (a dummy prefix?)")

    def target_text(self, target_ids: Sequence[int]) -> bytes:
        """The bytes of target tokens, special tokens spelled as their content."""
        return b"".join(self._target_text[i] for i in target_ids)

    def drafter_text(self, drafter_ids: Sequence[int]) -> bytes:
        """The bytes of drafter tokens, special tokens spelled as their content."""
        return b"".join(self._drafter_text[i] for i in drafter_ids)

    def drafter_context(self, target_ids: Sequence[int]) -> tuple[list[int], bytes]:
        """The target's context re-tokenized for the drafter, and the pending bytes of a
        character the target has not finished (Qwen emits a 4-byte emoji as 2-3 tokens).

        drafter_text(ids) + pending == target_text(target_ids), except where the drafter's
        normalizer rewrites text (module docstring) and where the target emitted invalid
        UTF-8 mid-context, which becomes U+FFFD: the drafter reads text, not bytes.
        """
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = decoder.decode(self.target_text(target_ids), final=False)
        pending = decoder.getstate()[0]  # the undecoded tail of an unfinished character
        return self.drafter_tokenizer.encode(text, add_special_tokens=False), pending

    def drafter_bytes(self, drafter_ids: Sequence[int]) -> tuple[bytes, int]:
        """(bytes of the drafted tokens before the first special one, how many tokens those are).

        A count below len(drafter_ids) means drafter_ids[count] is a special token (or a
        padding row): text stops there, and `target_special` may carry the token over.
        """
        pieces = []
        for i in drafter_ids:
            if self.drafter_token_bytes[i] is None:
                break
            pieces.append(self.drafter_token_bytes[i])
        return b"".join(pieces), len(pieces)

    def target_special(self, drafter_id: int) -> int | None:
        """The target's special token with the same content as this drafter token, if any."""
        return self._special_to_target.get(drafter_id)

    def draft_to_target(self, target_context: Sequence[int], draft_bytes: bytes) -> list[int]:
        """Target ids for drafted bytes that follow the target context (after any `pending`).

        Whole characters only: an unfinished one at the end, or invalid UTF-8, is dropped with
        all that follows. The draft is tokenized after a lookbehind, the text of the last
        LOOKBEHIND context tokens (from a character boundary); if that re-tokenization keeps
        those tokens, what follows them is the result, else the draft is tokenized alone:

        | context tokens    | draft             | with lookbehind               | result                |
        |-------------------|-------------------|-------------------------------|-----------------------|
        | `def` ` hel`      | `lo_world():`     | `def` ` hello` .. (changed)   | `lo` `_world` `():`   |
        | `👨` `\\xe2\\x80`  | `\\x8d👩`         | `👨` `\\xe2\\x80` `\\x8d` `👩`   | `\\x8d` `👩`          |

        The lookbehind is what lets a draft finish a character the context began (second row:
        alone, a lone `\\x8d` is not text). Otherwise, for the packaged BPE targets, a
        re-tokenization that keeps the context's tokens has merged nothing across the boundary,
        so it gives what the draft alone gives (no difference in 3000 random cuts of code and
        prose, with Qwen2.5 and with Gemma 3 as the target).

        Every returned token carries drafted bytes, in order: where a normalizer rewrites the
        draft (NFC), the result stops before the first token that does not.
        """
        context = list(target_context)
        start = len(context) - min(LOOKBEHIND, len(context))
        while 0 < start < len(context) and self._target_text[context[start]][:1] in _CONTINUATION_BYTES:
            start -= 1  # begin the lookbehind at a character boundary, so its bytes decode
        for behind in (context[start:], []):
            behind_bytes = self.target_text(behind)
            whole = _valid_utf8_prefix(behind_bytes + draft_bytes)
            if len(whole) <= len(behind_bytes):
                continue  # no whole drafted character follows this text
            ids = self.target_tokenizer.encode(whole.decode(), add_special_tokens=False)
            if ids[: len(behind)] == behind:
                return self._carrying(ids[len(behind) :], whole[len(behind_bytes) :])
        return []

    def _carrying(self, ids: list[int], drafted: bytes) -> list[int]:
        """The longest prefix of ids whose bytes are a prefix of drafted."""
        kept, length = [], 0
        for i in ids:
            piece = self._target_text[i]
            if not piece or drafted[length : length + len(piece)] != piece:
                break
            kept.append(i)
            length += len(piece)
        return kept
