"""Tests for services/vocab.py: token bytes, the token-level map (TLI) and the text bridge
(SLEM), on two tiny tokenizers built here and on the packaged tokenizers when prepared.

The packaged pairs are the ones specd serves: Qwen2.5-Coder 1.5B as the target, with
SmolLM2 (byte-level BPE, like Qwen) or Gemma 3 (SentencePiece-style BPE) as the drafter.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tiny import build_tokenizer, training_corpus
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from services.config import default_home
from services.runtime import tokenizer_fingerprint
from services.vocab import TextBridge, VocabMap, special_tokens, token_bytes

TARGET = "qwen2.5-coder-1.5b-instruct"
DRAFTERS = ("smollm2-135m-instruct", "gemma-3-270m")

TEXTS = {  # name -> text, no special tokens
    "leading space": " leading",
    "double space": "two  spaces",
    "trailing space": "trailing ",
    "only spaces": "   ",
    "newlines and a blank line": "line one\nline two\n\nafter a blank line\n",
    "many newlines": "a\n\n\n\nb",
    "crlf": "windows\r\nline",
    "digits": "12345",
    "decimal": "pi is 3.14159",
    "four-space indent": "    return x",
    "tabs": "\tif x:\n\t\treturn y",
    "python function": 'def add(a: int, b: int) -> int:\n    """Sum."""\n    return a + b\n\n\nprint(add(1, 2))\n',
    "german": "Grüße aus Köln, schöne Straße",
    "chinese": "你好，世界！这是一个测试。",
    "japanese": "こんにちは世界、カタカナとひらがな",
    "russian": "Привет, мир! Как дела?",
    "emoji": "ok 😀👍🏽 done",
    "zwj emoji": "family: 👨‍👩‍👧‍👦 and 🏳️‍🌈",
}
CHAT = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWrite add()<|im_end|>\n<|im_start|>assistant\n"
DRAFTS = {**TEXTS, "chat template": CHAT}


def round_trip_failures(tokenizer, table: list[bytes | None], texts: dict[str, str]) -> dict[str, bytes]:
    """name -> joined token bytes, for each text whose encoding does not give its bytes back."""
    failures = {}
    for name, text in texts.items():
        joined = b"".join(table[i] or b"<None>" for i in tokenizer.encode(text, add_special_tokens=False))
        if joined != text.encode():
            failures[name] = joined
    return failures


def char_cuts(text: str) -> list[tuple[str, str]]:
    return [(text[:cut], text[cut:]) for cut in range(len(text))]


# ---------------------------------------------------------------- tiny tokenizers


def sentencepiece_style(out_dir: Path) -> PreTrainedTokenizerFast:
    """A tiny Gemma-style tokenizer: "▁" for space, `<0xNN>` pieces for bytes without a piece
    of their own (so "ü" is two byte-fallback tokens), and a vocabulary of another size than
    tests/tiny.py's byte-level one."""
    raw = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    raw.normalizer = normalizers.Replace(" ", "\u2581")
    raw.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    raw.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|im_end|>"], show_progress=False)
    raw.train_from_iterator(training_corpus(), trainer=trainer)
    spec = json.loads(raw.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), unk_token="<unk>", eos_token="<|im_end|>"
    )
    tokenizer.save_pretrained(out_dir)
    return tokenizer


@pytest.fixture(scope="module")
def tiny_byte_level(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    return build_tokenizer(tmp_path_factory.mktemp("byte-level"))


@pytest.fixture(scope="module")
def tiny_sentencepiece(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    return sentencepiece_style(tmp_path_factory.mktemp("sentencepiece"))


@pytest.fixture(scope="module")
def tiny_tokenizers(tiny_byte_level, tiny_sentencepiece) -> dict[str, PreTrainedTokenizerFast]:
    return {"byte-level": tiny_byte_level, "sentencepiece": tiny_sentencepiece}


@pytest.mark.parametrize("name", ["byte-level", "sentencepiece"])
def test_token_bytes_of_tiny_tokenizers_round_trip_encode(tiny_tokenizers, name: str) -> None:
    tokenizer = tiny_tokenizers[name]
    assert round_trip_failures(tokenizer, token_bytes(tokenizer), TEXTS) == {}


def test_byte_fallback_pieces_are_single_bytes(tiny_sentencepiece) -> None:
    table = token_bytes(tiny_sentencepiece)
    ids = tiny_sentencepiece.encode("ü", add_special_tokens=False)
    assert tiny_sentencepiece.convert_ids_to_tokens(ids) == ["<0xC3>", "<0xBC>"]
    assert [table[i] for i in ids] == [b"\xc3", b"\xbc"]


def test_special_tokens_have_no_bytes_and_size_pads_with_none(tiny_byte_level) -> None:
    table = token_bytes(tiny_byte_level, size=len(tiny_byte_level) + 3)
    assert len(table) == len(tiny_byte_level) + 3 and table[-3:] == [None] * 3
    assert set(special_tokens(tiny_byte_level).values()) == {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}
    assert all(table[i] is None for i in special_tokens(tiny_byte_level))


def test_an_unknown_byte_spelling_falls_back_to_decoding_each_token() -> None:
    raw = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "wörld": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # no decoder: the spelling is unknown
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    assert token_bytes(tokenizer) == [None, b"hello", "wörld".encode()]


def test_tiny_vocab_map_pairs_identical_bytes_one_to_one(tiny_byte_level, tiny_sentencepiece) -> None:
    vocab_map = VocabMap.build(tiny_sentencepiece, tiny_byte_level)
    drafter_table, target_table = token_bytes(tiny_sentencepiece), token_bytes(tiny_byte_level)
    drafter = (vocab_map.drafter_to_target >= 0).nonzero().flatten()  # (shared,)
    target = vocab_map.drafter_to_target[drafter]
    assert target.unique().numel() == vocab_map.shared == drafter.numel() > 100
    assert torch.equal(vocab_map.target_to_drafter[target], drafter)
    for d, t in zip(drafter.tolist(), target.tolist()):
        assert drafter_table[d] == target_table[t] or special_tokens(tiny_sentencepiece)[d] == "<|im_end|>"
    im_end = tiny_sentencepiece.convert_tokens_to_ids("<|im_end|>")
    assert int(vocab_map.drafter_to_target[im_end]) == tiny_byte_level.convert_tokens_to_ids("<|im_end|>")


def test_a_cached_map_for_other_sizes_is_rebuilt(tiny_byte_level, tiny_sentencepiece, tmp_path: Path) -> None:
    first = VocabMap.load_or_build(tiny_sentencepiece, tiny_byte_level, tmp_path)
    wider = VocabMap.load_or_build(tiny_sentencepiece, tiny_byte_level, tmp_path, target_size=len(tiny_byte_level) + 8)
    assert wider.target_to_drafter.shape[0] == first.target_to_drafter.shape[0] + 8 and wider.shared == first.shared
    assert [p.suffix for p in tmp_path.iterdir()] == [".pt"]  # replaced in place, no temp file left


@pytest.mark.parametrize("drafter, target", [("sentencepiece", "byte-level"), ("byte-level", "sentencepiece")])
def test_tiny_bridge_round_trips_contexts_and_drafts(tiny_tokenizers, drafter: str, target: str) -> None:
    bridge = TextBridge(tiny_tokenizers[drafter], tiny_tokenizers[target])
    encode = tiny_tokenizers[target].encode
    for name, text in DRAFTS.items():
        ids = encode(text, add_special_tokens=False)
        for k in range(len(ids) + 1):
            drafter_ids, pending = bridge.drafter_context(ids[:k])
            assert bridge.drafter_text(drafter_ids) + pending == bridge.target_text(ids[:k]), (name, k)
        for context, draft in char_cuts(text):
            drafted = bridge.draft_to_target(encode(context, add_special_tokens=False), draft.encode())
            assert bridge.target_text(drafted) == draft.encode(), (name, context)


# ---------------------------------------------------------------- packaged tokenizers


def packaged_folder(name: str) -> Path:
    folder = Path(os.environ.get("SPECD_HOME") or default_home()) / "models" / name
    if not (folder / "tokenizer.json").exists():
        pytest.skip(f"{folder / 'tokenizer.json'} is missing: run `specd models prepare {name}`")
    return folder


def model_rows(name: str) -> int | None:
    """Rows of the model's output layer (config vocab_size), which token tables are padded to."""
    return json.loads((packaged_folder(name) / "config.json").read_text()).get("vocab_size")


@pytest.fixture(scope="module")
def packaged() -> Callable[[str], PreTrainedTokenizerFast]:
    """Loads a packaged tokenizer once per module (Gemma's takes seconds), or skips."""
    loaded: dict[str, PreTrainedTokenizerFast] = {}

    def load(name: str) -> PreTrainedTokenizerFast:
        if name not in loaded:
            loaded[name] = AutoTokenizer.from_pretrained(packaged_folder(name))
        return loaded[name]

    return load


@pytest.fixture(scope="module", params=DRAFTERS)
def pair(request, packaged) -> tuple[PreTrainedTokenizerFast, PreTrainedTokenizerFast]:
    """(drafter, target) tokenizers of one packaged pair."""
    return packaged(request.param), packaged(TARGET)


@pytest.fixture(scope="module")
def cached_map(pair, tmp_path_factory: pytest.TempPathFactory) -> tuple[VocabMap, Path]:
    drafter, target = pair
    cache_dir = tmp_path_factory.mktemp("vocab-maps")
    rows = model_rows(drafter.name_or_path.split("/")[-1]), model_rows(TARGET)
    return VocabMap.load_or_build(drafter, target, cache_dir, *rows), cache_dir


@pytest.fixture(scope="module")
def bridge(pair) -> TextBridge:
    drafter, target = pair
    return TextBridge(drafter, target, model_rows(drafter.name_or_path.split("/")[-1]), model_rows(TARGET))


@pytest.mark.parametrize("name", [TARGET, *DRAFTERS])
def test_token_bytes_round_trip_encode(packaged, name: str) -> None:
    tokenizer = packaged(name)
    table = token_bytes(tokenizer, model_rows(name))
    assert len(table) == model_rows(name)
    assert round_trip_failures(tokenizer, table, TEXTS) == {}
    assert all(table[i] is None for i in special_tokens(tokenizer))


def test_normalizers_rewrite_some_text(packaged) -> None:
    """What does not round-trip, and why (module docstring): Qwen composes to NFC, Gemma
    reads a literal "▁" as a space. Gemma adds no space before the first word."""
    qwen, gemma = packaged(TARGET), packaged("gemma-3-270m")
    assert round_trip_failures(qwen, token_bytes(qwen), {"nfd": "e\u0301"}) == {"nfd": "é".encode()}
    gemma_table = token_bytes(gemma)
    assert round_trip_failures(gemma, gemma_table, {"mark": "a\u2581b"}) == {"mark": b"a b"}
    assert [gemma_table[i] for i in gemma.encode("hello world", add_special_tokens=False)] == [b"hello", b" world"]


def test_vocab_map_pairs_common_tokens_both_ways(pair, cached_map) -> None:
    drafter, target = pair
    vocab_map, _ = cached_map
    target_table = token_bytes(target)
    for text in (" the", "\n", "def", " return", "()"):
        [d] = drafter.encode(text, add_special_tokens=False)
        t = int(vocab_map.drafter_to_target[d])
        assert t >= 0 and target_table[t] == text.encode(), text
        assert int(vocab_map.target_to_drafter[t]) == d, text


def test_vocab_map_is_one_to_one_on_identical_bytes(pair, cached_map) -> None:
    drafter, target = pair
    vocab_map, _ = cached_map
    drafter_table, target_table = token_bytes(drafter), token_bytes(target)
    drafter_special, target_special = special_tokens(drafter), special_tokens(target)
    mapped = (vocab_map.drafter_to_target >= 0).nonzero().flatten()  # (shared,)
    targets = vocab_map.drafter_to_target[mapped]
    assert targets.unique().numel() == mapped.numel() == vocab_map.shared
    assert torch.equal(vocab_map.target_to_drafter[targets], mapped)
    for d, t in zip(mapped.tolist(), targets.tolist()):
        same = drafter_table[d] is not None and drafter_table[d] == target_table[t]
        assert same or drafter_special[d] == target_special[t], (d, t)
    smaller = min(sum(piece is not None for piece in table) for table in (drafter_table, target_table))
    print(f"{drafter.name_or_path} -> {target.name_or_path}: {vocab_map.shared} shared of {smaller}")
    assert 0.5 * smaller < vocab_map.shared <= smaller + len(drafter_special)


def test_vocab_map_prefers_the_token_the_tokenizer_produces(pair, cached_map) -> None:
    """Gemma has two tokens for each ASCII character: a piece ("a", 236746) and a byte-fallback
    piece ("<0x61>", 335), and for "\\n" an added token (107) besides <0x0A>. The map pairs
    the target's token with the one Gemma's encoder emits, so the pair is usable in a draft."""
    drafter, target = pair
    vocab_map, _ = cached_map
    for text in ("a", "(", "7", " ", "\n"):
        [d] = drafter.encode(text, add_special_tokens=False)
        [t] = target.encode(text, add_special_tokens=False)
        assert int(vocab_map.drafter_to_target[d]) == t and int(vocab_map.target_to_drafter[t]) == d, repr(text)
        if drafter.name_or_path.endswith("gemma-3-270m"):
            fallback = drafter.convert_tokens_to_ids(f"<0x{ord(text):02X}>")
            assert fallback != d and int(vocab_map.drafter_to_target[fallback]) == -1, repr(text)


def test_vocab_map_maps_special_tokens_by_content(pair, cached_map) -> None:
    drafter, target = pair
    vocab_map, _ = cached_map
    target_ids = {content: i for i, content in special_tokens(target).items()}
    for d, content in special_tokens(drafter).items():
        assert int(vocab_map.drafter_to_target[d]) == target_ids.get(content, -1), content


def test_vocab_map_cache_round_trips(pair, cached_map, monkeypatch: pytest.MonkeyPatch) -> None:
    drafter, target = pair
    vocab_map, cache_dir = cached_map
    name = f"{tokenizer_fingerprint(drafter)[:16]}-{tokenizer_fingerprint(target)[:16]}.pt"
    assert [p.name for p in cache_dir.iterdir()] == [name]

    def no_build(*args, **kwargs):
        raise AssertionError("load_or_build rebuilt a cached map")

    monkeypatch.setattr(VocabMap, "build", no_build)
    rows = model_rows(drafter.name_or_path.split("/")[-1]), model_rows(TARGET)
    loaded = VocabMap.load_or_build(drafter, target, cache_dir, *rows)
    assert loaded.shared == vocab_map.shared
    assert torch.equal(loaded.drafter_to_target, vocab_map.drafter_to_target)
    assert torch.equal(loaded.target_to_drafter, vocab_map.target_to_drafter)


@pytest.mark.parametrize("name", list(DRAFTS))
def test_drafter_context_round_trips_every_target_prefix(bridge, name: str) -> None:
    """Every prefix of the target's tokens, including those that end inside a character."""
    ids = bridge.target_tokenizer.encode(DRAFTS[name], add_special_tokens=False)
    for k in range(len(ids) + 1):
        drafter_ids, pending = bridge.drafter_context(ids[:k])
        assert bridge.drafter_text(drafter_ids) + pending == bridge.target_text(ids[:k]), k
        assert len(pending) < 4


def test_drafter_context_keeps_chat_special_tokens_where_the_drafter_has_them(bridge) -> None:
    drafter_ids, pending = bridge.drafter_context(bridge.target_tokenizer.encode(CHAT, add_special_tokens=False))
    im_start = bridge.drafter_tokenizer.convert_tokens_to_ids("<|im_start|>")
    has_im_start = "<|im_start|>" in special_tokens(bridge.drafter_tokenizer).values()
    assert pending == b"" and drafter_ids.count(im_start) == (3 if has_im_start else 0)


def test_a_context_ending_inside_a_character_leaves_it_pending(bridge) -> None:
    """Qwen spells the zero-width joiner (3 bytes) as two tokens, b"\\xe2\\x80" and b"\\x8d"."""
    ids = bridge.target_tokenizer.encode("👨\u200d👩", add_special_tokens=False)
    assert [bridge.target_text([i]) for i in ids] == ["👨".encode(), b"\xe2\x80", b"\x8d", "👩".encode()]
    drafter_ids, pending = bridge.drafter_context(ids[:2])
    assert pending == b"\xe2\x80" and bridge.drafter_text(drafter_ids) == "👨".encode()
    # The draft's first byte finishes the context's character: only the lookbehind makes it text.
    assert bridge.draft_to_target(ids[:2], b"\x8d" + "👩".encode()) == ids[2:]
    assert bridge.draft_to_target(ids[:2], b"\x8d") == ids[2:3]


@pytest.mark.parametrize("name", list(DRAFTS))
def test_draft_to_target_carries_exactly_the_drafted_text(bridge, name: str) -> None:
    encode = bridge.target_tokenizer.encode
    for context, draft in char_cuts(DRAFTS[name]):
        drafted = bridge.draft_to_target(encode(context, add_special_tokens=False), draft.encode())
        assert bridge.target_text(drafted) == draft.encode(), context


def test_draft_continuing_a_word_mid_token(bridge) -> None:
    encode = bridge.target_tokenizer.encode
    drafted = bridge.draft_to_target(encode("def hel", add_special_tokens=False), b"lo_world():")
    assert drafted == encode("lo_world():", add_special_tokens=False)
    assert bridge.target_text(drafted) == b"lo_world():"


@pytest.mark.parametrize(
    "draft, expected",
    [
        (b"", b""),
        (b"abc" + "😀".encode()[:2], b"abc"),  # an unfinished character at the end
        (b"ab\xffcd", b"ab"),  # invalid UTF-8: nothing from there on is text
        ("é".encode(), "é".encode()),
        ("e\u0301!".encode(), b""),  # Qwen's NFC turns it into "é", which was not drafted
    ],
)
def test_draft_to_target_drops_what_is_not_drafted_text(bridge, draft: bytes, expected: bytes) -> None:
    context = bridge.target_tokenizer.encode("x = ", add_special_tokens=False)
    assert bridge.target_text(bridge.draft_to_target(context, draft)) == expected


def test_drafter_bytes_stop_at_a_special_token_that_maps_by_content(bridge) -> None:
    drafter, target = bridge.drafter_tokenizer, bridge.target_tokenizer
    hi = drafter.encode("Hi!", add_special_tokens=False)
    eos = drafter.eos_token_id
    assert bridge.drafter_bytes(hi + [eos] + hi) == (b"Hi!", len(hi))
    assert bridge.drafter_bytes(hi) == (b"Hi!", len(hi))
    target_ids = {content: i for i, content in special_tokens(target).items()}
    assert bridge.target_special(eos) == target_ids.get(drafter.eos_token)
    if drafter.eos_token == "<|im_end|>":  # SmolLM2 and Qwen2.5 share the chat template's tokens
        assert bridge.target_special(eos) == target.convert_tokens_to_ids("<|im_end|>")


def _decodes(data: bytes) -> bool:
    try:
        data.decode()
        return True
    except UnicodeDecodeError:
        return False
