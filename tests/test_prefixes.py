"""Which kept context a new session copies (services/prefixes.py): table-driven, pure."""

from __future__ import annotations

import pytest

from services.prefixes import MAX_TOKENS, MIN_TOKENS, Prefixes

TEMPLATE = list(range(1000, 1030))  # a chat template with its system prompt: 30 tokens


def kept(*contexts: list[int], entries: int = 4) -> Prefixes[str]:
    prefixes: Prefixes[str] = Prefixes(entries)
    for i, context in enumerate(contexts):
        prefixes.keep(context, f"v{i}")
    return prefixes


@pytest.mark.parametrize(
    ("contexts", "seq", "most", "expected"),
    [
        ([TEMPLATE + [1, 2]], TEMPLATE + [3], None, ("v0", 30)),  # the template in common
        ([TEMPLATE + [1, 2], TEMPLATE + [3, 4, 5]], TEMPLATE + [3, 4, 9], None, ("v1", 32)),  # the longest match
        ([TEMPLATE + [1, 2]], TEMPLATE + [1, 2], 31, ("v0", 31)),  # cut to what the pass may reuse
        ([TEMPLATE], TEMPLATE[:MIN_TOKENS] + [7] * 10, None, ("v0", MIN_TOKENS)),
        ([TEMPLATE], TEMPLATE[: MIN_TOKENS - 1] + [7] * 10, None, None),  # too little in common
        ([TEMPLATE], [7] + TEMPLATE, None, None),  # in common, but not as a prefix
        ([], TEMPLATE, None, None),
    ],
    ids=["template", "longest", "most", "just-enough", "too-short", "not-a-prefix", "empty"],
)
def test_best_is_the_longest_common_prefix_long_enough(contexts, seq, most, expected) -> None:
    prefixes = kept(*contexts)
    assert prefixes.best(seq, most) == expected
    assert prefixes.hits == (expected is not None)
    assert prefixes.reused_tokens == (expected[1] if expected else 0)


def test_the_least_recently_used_context_is_dropped_first() -> None:
    a, b, c = TEMPLATE + [1], TEMPLATE + [2], TEMPLATE + [3]
    prefixes = kept(a, b, entries=2)
    assert prefixes.best(a + [9]) == ("v0", 31)  # a is now the most recent
    prefixes.keep(c, "v2")
    assert len(prefixes) == 2
    assert prefixes.best(b) == ("v0", 30)  # b is gone: its own token matches nothing; the template remains
    assert prefixes.best(c) == ("v2", 31)


def test_a_context_that_extends_a_kept_one_replaces_it() -> None:
    prefixes = kept(TEMPLATE, TEMPLATE + [1, 2])
    assert len(prefixes) == 1 and prefixes.best(TEMPLATE) == ("v1", 30)  # v0 is gone


@pytest.mark.parametrize(
    ("contexts", "tokens", "wanted"),
    [
        ([], TEMPLATE, True),
        ([], TEMPLATE[: MIN_TOKENS - 1], False),  # too short to be worth keeping
        ([TEMPLATE + [1, 2]], TEMPLATE + [1], False),  # a kept context already begins with it
        ([TEMPLATE + [1, 2]], TEMPLATE + [1, 2, 3], True),  # it goes further
        ([TEMPLATE + [1]], TEMPLATE + [2], True),
    ],
)
def test_what_is_worth_keeping(contexts, tokens, wanted) -> None:
    prefixes = kept(*contexts)
    assert prefixes.wanted(tokens) == wanted


def test_a_long_context_keeps_its_first_tokens_and_nothing_is_kept_when_off() -> None:
    long = list(range(MAX_TOKENS + 50))
    prefixes = kept(long)
    assert prefixes.best(long) == ("v0", MAX_TOKENS)
    assert not prefixes.wanted(long)  # its first MAX_TOKENS are kept already
    off: Prefixes[str] = Prefixes(0)
    assert not off.wanted(TEMPLATE)
    off.keep(TEMPLATE, "v")
    assert len(off) == 0 and off.best(TEMPLATE) is None
    with pytest.raises(ValueError, match=">= 0"):
        Prefixes(-1)
