"""Whether a drafter's second stage pays (services/second_stage.py): the fit of a pass's
cost and the per-session ledger, table-driven. The drafter's use of it is in
tests/test_staged.py."""

from __future__ import annotations

import pytest

from services.second_stage import MIN_GUESSES, PROBE_TREES, GuessLedger, PassTimes


def passes(a: float, b: float, sizes: list[int]) -> PassTimes:
    times = PassTimes()
    for n in sizes:
        times.observe(n, a + b * n)
    return times


def test_the_fit_recovers_a_pass_line_and_waits_for_passes_of_different_sizes() -> None:
    a, b = passes(0.015, 0.018, [1, 2, 5, 1, 3, 4]).line()
    assert a == pytest.approx(0.015) and b == pytest.approx(0.018)
    assert passes(0.015, 0.018, [3, 3, 3]).line() is None  # one size: no slope to fit
    assert PassTimes().line() is None


LLAMA = passes(0.015, 0.018, [1, 2, 3, 4, 5])  # a guess costs 18 ms, a saved pass 33 ms


@pytest.mark.parametrize(
    ("fed", "saved", "times", "pays"),
    [
        (20.0, 0.0, LLAMA, False),  # every guess missed
        (20.0, 10.0, LLAMA, False),  # 10 passes (330 ms) for 20 guesses (360 ms)
        (20.0, 11.0, LLAMA, True),  # 363 ms for 360 ms
        (MIN_GUESSES - 1, 0.0, LLAMA, True),  # too few guesses to judge yet
        (20.0, 0.0, PassTimes(), True),  # no pass cost measured yet
        (20.0, 1.0, passes(0.030, 0.001, [1, 2, 3, 4]), True),  # a pass flat in its tokens: guesses nearly free
    ],
)
def test_guesses_pay_while_the_passes_they_save_cost_more_than_they_do(fed, saved, times, pays) -> None:
    assert GuessLedger(fed, saved).pays(times) is pays


def test_a_session_that_stopped_guessing_guesses_in_one_tree_of_probe_trees() -> None:
    ledger = GuessLedger(20.0, 0.0)
    assert [ledger.guess(LLAMA) for _ in range(2 * PROBE_TREES)] == ([False] * (PROBE_TREES - 1) + [True]) * 2
    for _ in range(10):  # trees whose guesses all held (each the text of a probe): the misses decay
        ledger.observe(fed=4, saved=4)
    assert ledger.pays(LLAMA) and ledger.guess(LLAMA)
