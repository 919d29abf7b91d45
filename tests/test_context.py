"""Context deltas: the table of services/context.py's docstring, and the resend after a miss."""

from __future__ import annotations

import pytest

from services.context import ContextDelta, ContextTracker, common_prefix_len, fingerprint, resolve_delta


@pytest.mark.parametrize(
    "a, b, expected",
    [([], [1], 0), ([1, 2, 3], [1, 2, 3], 3), ([1, 2, 3], [1, 2], 2), ([1, 2, 3], [1, 9, 3], 1), ([4], [5], 0)],
)
def test_common_prefix_len(a, b, expected):
    assert common_prefix_len(a, b) == expected


def test_fingerprint_tells_sequences_apart():
    assert fingerprint([5, 6, 7]) == fingerprint([5, 6, 7])
    assert fingerprint([5, 6, 7]) != fingerprint([5, 6, 8])
    assert fingerprint([1]) != fingerprint([1, 0])


def test_tracker_sends_only_what_the_service_lacks():
    tracker = ContextTracker()
    first = tracker.delta("s", [5, 6, 7])
    assert (first.base_len, first.tokens) == (0, (5, 6, 7))
    tracker.acknowledge("s", (5, 6, 7, 9))  # a verifier holds the context plus what it returned
    second = tracker.delta("s", [5, 6, 7, 9, 2, 4])
    assert (second.base_len, second.tokens) == (4, (2, 4))
    assert second.base_fingerprint == fingerprint([5, 6, 7, 9])


def test_service_resolves_a_delta_or_reports_a_miss():
    delta = ContextDelta("s", 4, fingerprint([5, 6, 7, 9]), (2, 4))
    assert resolve_delta([5, 6, 7, 9], delta) == [5, 6, 7, 9, 2, 4]
    assert resolve_delta([5, 6, 7, 9, 8], delta) == [5, 6, 7, 9, 2, 4]  # a stale tail is dropped
    assert resolve_delta(None, delta) is None  # evicted or restarted
    assert resolve_delta([5, 6, 7, 1], delta) is None  # a different history
    assert resolve_delta([5, 6], delta) is None
    assert resolve_delta(None, ContextDelta("s", 0, 0, (1, 2))) == [1, 2]


def test_tracker_forgets_least_recently_used_sessions():
    tracker = ContextTracker(max_sessions=2)
    for sid in ("a", "b", "c"):
        tracker.acknowledge(sid, [1, 2])
    assert tracker.delta("a", [1, 2, 3]).base_len == 0
    assert tracker.delta("c", [1, 2, 3]).base_len == 2
