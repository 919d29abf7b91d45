"""Whether a drafter's second stage pays, per session: the max-gram guesses it feeds while
growing a tree (drafter_svc/draft.propose_tree) against the passes they save.

A guess is a token fed below the node being expanded, ahead of need. Where the drafter then
picks the guessed token, that node's logits are already computed, and a depth whose every
node to expand was guessed costs no pass. Where it does not, the guess was paid for and
thrown away. Which way it goes is the text's: code repeats itself and the guesses hold;
chat seldom does. And what a guess costs is the runtime's: on a CPU a pass is not flat in
its tokens (llama.cpp, the 0.5B drafter, two AVX2 cores: 33 ms for one token, 51 for two),
so four wrong guesses below every node cost more than the passes the right ones save. On
MT-bench a chain of four first candidates drafted in 221 ms a round with four guesses below
each node and in 172 without; on HumanEval 165 against 217.

So the drafter measures both sides. PassTimes fits a pass's seconds as a + b·n over the tree
passes it runs (n nodes fed): a guess costs b, a saved pass a + b. GuessLedger keeps, per
session, the guesses fed and the passes they saved (decayed, about the last ten trees), and
the session's trees guess while the passes saved are worth the guesses fed. A session that
stopped guessing guesses again in one tree of every PROBE_TREES, so text that turns
repetitive is found again.

Lossless either way: guesses change no draw (a child is drawn from q as always, and merely
found computed), so the tree and its q are the same with or without them.

Pure: standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.fit import DecayedLine

DECAY = 0.9  # per tree: a session's ledger follows about its last ten trees
TIMES_DECAY = 0.98  # per pass: the fit follows about the last fifty passes
MIN_GUESSES = 8.0  # guesses fed before a session's ledger decides anything
PROBE_TREES = 8  # a session that stopped guessing guesses again in one tree of this many


class PassTimes:
    """A drafter's tree passes: decayed least squares of seconds on nodes fed."""

    def __init__(self) -> None:
        self.passes = DecayedLine(TIMES_DECAY)

    def observe(self, tokens: int, seconds: float) -> None:
        self.passes.observe(tokens, seconds)

    def line(self) -> tuple[float, float] | None:
        """(a, b): a pass's fixed seconds and seconds per node fed; None until passes of
        different sizes were timed."""
        passes = self.passes
        if passes.n <= 0 or passes.variance < 0.1:
            return None
        b = max(0.0, passes.slope)
        return max(0.0, passes.mean_y - b * passes.mean_x), b


@dataclass
class GuessLedger:
    """One session's second stage: guesses fed and passes saved, decayed per tree."""

    fed: float = 0.0
    saved: float = 0.0
    trees_off: int = 0  # trees in a row grown without guesses

    def pays(self, times: PassTimes) -> bool:
        """Whether the passes saved were worth the guesses fed (yes until both are measured)."""
        line = times.line()
        if line is None or self.fed < MIN_GUESSES:
            return True
        a, b = line
        return self.saved * (a + b) >= self.fed * b

    def guess(self, times: PassTimes) -> bool:
        """Whether the session's next tree feeds guesses: while they pay, and once in
        PROBE_TREES trees while they do not."""
        if self.pays(times) or self.trees_off + 1 >= PROBE_TREES:
            self.trees_off = 0
            return True
        self.trees_off += 1
        return False

    def observe(self, fed: int, saved: int) -> None:
        """A tree grown with guesses: `fed` guess tokens, `saved` passes."""
        self.fed = DECAY * self.fed + fed
        self.saved = DECAY * self.saved + saved
