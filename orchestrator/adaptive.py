"""Adaptive draft length: each round drafts the k that maximises expected tokens per second.

Leviathan et al. 2023 ("Fast Inference from Transformers via Speculative Decoding", section
3.3) choose k from the acceptance rate α and the cost ratio c of a draft token to a target
pass: expected tokens per round (1 - α^(k+1)) / (1 - α), cost k·c + 1. specd measures both
sides instead of assuming them:

- acceptance per draft position, as conditional rates α_i = P(position i accepted |
  positions before it accepted), from decayed counts per session (`Acceptance`, kept in the
  session in Redis), with the strategy's rates over every session of this orchestrator as
  the prior of a new session;
- the wall time of a round as a function of its draft length (`RoundCosts`: drafting,
  verifying, the network and the orchestrator's own work, per strategy, shared by every
  session of this orchestrator), measured apart at each load level (sessions per verifier
  pass, in powers of two): under load a plain round waits for a longer pass and a drafting
  one for a drafter busy with the others, so a cost timed at one load says little about
  another (timed alone, a 4-token draft looked cheap to sessions at 16 a pass, where it
  took seconds of the drafter's catch-up);

and pick k in [0, k_max] maximising E(k) / (T(k) + X(k)), with E(k) = 1 + Σ_{j<=k} Π_{i<=j} α_i.

X(k) is what the round's draft costs the other sessions (`PassLoad`). A verifier batches
the verify calls of concurrent sessions into one pass (services/calls.py), so a session's k
draft tokens lengthen a pass that B - 1 other sessions wait for too: X(k) = (B - 1)·b·k, with
B the sessions per pass and b the pass's seconds per fed token, both from what the verifier
reports with each answer. Alone (B = 1) X is 0; as the batch fills and the pass turns
compute-bound (b near a token's whole cost) only drafts with high acceptance still pay, and
at some load none does: k = 0 for every session, the most tokens per second the verifier
can give then.

On cores the drafter shares with the verifier (SPECD_OWN_CORES=0: `specd up` on one
machine) a draft costs the others more than that: the drafter computes on the cores their
pass runs on, and two busy thread pools on the same cores slow each other far beyond their
share. Alone, drafter and verifier take turns and nothing is lost; once passes are shared
(B >= SHARED_PASS) no round drafts.

k = 0 is plain decoding (`ar`): chosen when no draft pays for itself, with a probe round
every PROBE_EVERY rounds (times the sessions per pass, under load) so that a session whose
text turns predictable drafts again. Pipelined (`sd-pipe` with the drafter on cores of its
own), a k = 0 round still drafts the next round ahead during its verify, so k = 0 is worth
what such rounds commit, not one token (DraftLength._plain_tokens).

Why this is lossless, greedy and sampled: the choice uses only what is already committed
(earlier rounds' acceptance) and timings, never the current round's draws. Given the
committed prefix, the round's draft length is fixed before the drafter draws and before
the verifier's coins, so every emitted token is still distributed as the target's p given
its prefix (the standard speculative-sampling argument holds for any k chosen that way),
and greedy output is the target's argmax at every position whatever k is.

What adaptive gives up: a sampled stream's exact tokens depend on the draft lengths, and
those follow timings, so a sampled turn whose request gives a seed (a stream meant to replay)
drafts a fixed k instead (FIXED_K, or the request's or the server's).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from services.fit import DecayedLine
from services.roles import CallCost

DECAY = 0.9  # per observation: a session's rates follow roughly its last ten rounds
# Observations the orchestrator-wide rates are worth in a session's estimate: one, since
# texts differ (a chat session after a run of code sessions should soon stop expecting code's
# acceptance)
PRIOR_WEIGHT = 1.0
POOLED_DECAY = 0.95  # per observation of the orchestrator-wide rates: about the last twenty rounds
DEFAULT_ALPHA = 0.6  # a position nothing has been measured for yet
POSITION_FALLOFF = 0.9  # an unmeasured position past the last measured one: its rate times this
LOAD_DECAY = 0.95  # per verify call: the load of about the last twenty passes
COST_DECAY = 0.8  # per observation of a draft length: recent load and caches count most
K_MAX = 12  # the longest draft adaptive chooses
FIXED_K = 4  # the draft length of a turn that cannot adapt (a seeded sampled turn) and gives none
PROBE_EVERY = 8  # after this many `ar` rounds, one round drafts again to re-measure acceptance
EXPLORE_EVERY = 10  # every this many rounds, one round drafts one token more (or less) than the best
# Draft lengths of the first rounds at each load level, until each has been timed: 0 among them, because
# drafting at all costs more than its tokens (a drafter call, the drafter catching up on the
# committed tokens), so T(0) extrapolated from longer drafts would make plain decoding look
# dearer than it is. One round at a time times a length: sixteen sessions starting together
# would otherwise all draft 4 at once, and their drafter would prefill sixteen prompts before
# any of them gets a token. A round with less room than a length does not time it (a length
# capped by the room left is one nothing chose; one capped by the longest draft allowed is
# timed as that).
START = (4, 2, 0)
TIMING_CLAIM_S = 30.0  # a START length claimed this long ago and still not timed (its round failed): free again
# Sessions per verifier pass from which a round without a draft drafts nothing at all, and
# from which, on cores shared with the drafter, no round drafts
SHARED_PASS = 2.0


@dataclass
class Acceptance:
    """Decayed counts per draft position: rounds that reached it (every earlier position
    accepted) and rounds that accepted it."""

    reached: list[float] = field(default_factory=list)
    accepted: list[float] = field(default_factory=list)
    # A tree strategy's (TreeWidth): how a chain of the drafter's first candidates fares
    chain: Acceptance | None = None

    def observe(self, drafted: int, accepted: int, decay: float = DECAY) -> None:
        """One round that drafted `drafted` tokens and accepted the first `accepted`."""
        for i in range(min(drafted, accepted + 1)):
            if i == len(self.reached):
                self.reached.append(0.0)
                self.accepted.append(0.0)
            self.reached[i] = decay * self.reached[i] + 1.0
            self.accepted[i] = decay * self.accepted[i] + (1.0 if i < accepted else 0.0)

    def rates(self, positions: int, prior: Acceptance | None = None) -> list[float]:
        """α_1..α_positions: this estimate, shrunk towards the prior's rates."""
        base = prior.rates(positions) if prior is not None else _fallback(positions)
        out = []
        for i in range(positions):
            n = self.reached[i] if i < len(self.reached) else 0.0
            a = self.accepted[i] if i < len(self.accepted) else 0.0
            out.append((a + PRIOR_WEIGHT * base[i]) / (n + PRIOR_WEIGHT))
        return out

    def to_json(self) -> list:
        out: list = [[round(x, 4) for x in self.reached], [round(x, 4) for x in self.accepted]]
        return out if self.chain is None else [*out, self.chain.to_json()]

    @classmethod
    def from_json(cls, data: Sequence | None) -> Acceptance:
        if not data:
            return cls()
        reached, accepted, *chain = data
        return cls(
            [float(x) for x in reached], [float(x) for x in accepted], cls.from_json(chain[0]) if chain else None
        )


def _fallback(positions: int) -> list[float]:
    return [DEFAULT_ALPHA * POSITION_FALLOFF**i for i in range(positions)]


class PooledAcceptance(Acceptance):
    """The orchestrator-wide rates of one strategy: the prior of every session. Positions
    not measured yet extend the last measured rate, falling off."""

    def rates(self, positions: int, prior: Acceptance | None = None) -> list[float]:
        out = []
        last = DEFAULT_ALPHA
        for i in range(positions):
            n = self.reached[i] if i < len(self.reached) else 0.0
            if n >= 1.0:
                last = (self.accepted[i] + 1.0 * last) / (n + 1.0)
                out.append(last)
            else:
                last *= POSITION_FALLOFF
                out.append(last)
        return out


def expected_tokens(rates: Sequence[float], k: int) -> float:
    """E(k): tokens a round commits when it drafts k, 1 + Σ_{j<=k} Π_{i<=j} α_i."""
    total, run = 1.0, 1.0
    for alpha in rates[:k]:
        run *= alpha
        total += run
    return total


class RoundCosts:
    """Wall seconds of a round by draft length: a decayed mean per length measured, linear
    between measured lengths, and a least-squares line beyond them."""

    def __init__(self) -> None:
        self.mean: dict[int, float] = {}
        self.weight: dict[int, float] = {}

    def observe(self, k: int, seconds: float) -> None:
        w = self.weight.get(k, 0.0)
        self.mean[k] = (COST_DECAY * w * self.mean.get(k, 0.0) + seconds) / (COST_DECAY * w + 1.0)
        self.weight[k] = COST_DECAY * w + 1.0

    @property
    def measured(self) -> list[int]:
        return sorted(self.mean)

    def seconds(self, k: int) -> float:
        """T(k); needs at least two measured lengths."""
        known = self.measured
        if k in self.mean:
            return self.mean[k]
        below = [x for x in known if x < k]
        above = [x for x in known if x > k]
        if below and above:
            lo, hi = below[-1], above[0]
            return self.mean[lo] + (self.mean[hi] - self.mean[lo]) * (k - lo) / (hi - lo)
        slope, intercept = self._line()
        edge = below[-1] if below else above[0]
        # Beyond the measured lengths: the line's slope from the nearest measured point, and
        # never less than the cheapest round measured (a round cannot cost less than a verify).
        return max(self.mean[edge] + slope * (k - edge), min(self.mean.values()) * 0.5)

    def _line(self) -> tuple[float, float]:
        xs = self.measured
        ws = [self.weight[x] for x in xs]
        ys = [self.mean[x] for x in xs]
        sw = sum(ws)
        mx = sum(w * x for w, x in zip(ws, xs)) / sw
        my = sum(w * y for w, y in zip(ws, ys)) / sw
        var = sum(w * (x - mx) ** 2 for w, x in zip(ws, xs))
        slope = sum(w * (x - mx) * (y - my) for w, x, y in zip(ws, xs, ys)) / var if var else 0.0
        return max(slope, 0.0), my - max(slope, 0.0) * mx


def load_level(batch: float) -> int:
    """The load a round's cost is measured at: sessions per verifier pass in powers of two
    (0: alone, 1: about 2, 2: about 4, ... 4: about 16)."""
    return round(math.log2(max(1.0, batch)))


class PassLoad:
    """How loaded the verifier's passes are: decayed sums over the verify calls' passes of
    the sessions per pass (B) and of (tokens fed, seconds), for the least-squares slope b of
    a pass's seconds on its tokens."""

    def __init__(self) -> None:
        self.sessions = 0.0
        self.passes = DecayedLine(LOAD_DECAY)  # a pass's seconds on its tokens
        self.streams = 0  # the turns this orchestrator streams now (DraftLength.choose)

    def observe(self, sessions: int, tokens: int, seconds: float) -> None:
        """One verify call's pass: `sessions` shared it, feeding `tokens`, in `seconds`."""
        if tokens <= 0 or not math.isfinite(seconds) or seconds <= 0:
            return
        self.sessions = LOAD_DECAY * self.sessions + sessions
        self.passes.observe(tokens, seconds)

    @property
    def per_token(self) -> float:
        """b: seconds one more fed token adds to a pass. The slope where the passes fed
        different numbers of tokens, at most the mean cost of a token (the pass's fixed part
        included), which it is where they did not."""
        passes = self.passes
        if passes.x <= 0:
            return 0.0
        mean = passes.y / passes.x
        if passes.variance < 1.0:  # the passes fed about as many tokens each: no slope to fit
            return mean
        return min(max(passes.slope, 0.0), mean)

    @property
    def batch(self) -> float:
        """B: the sessions that share a pass (1 before any was measured), or the turns this
        orchestrator streams now if more: the measure follows the passes of about the last
        twenty calls, so it lags a load that just rose (sixteen sessions starting together
        would draft as at the load before)."""
        measured = self.sessions / self.passes.n if self.passes.n else 1.0
        return max(measured, float(self.streams))

    def others_cost(self, k: int) -> float:
        """X(k): the seconds k draft tokens add to the pass the other sessions wait for."""
        return max(0.0, self.batch - 1.0) * self.per_token * k


@dataclass(frozen=True)
class Choice:
    k: int
    expected_tokens: float
    seconds: float  # the round's predicted wall time; 0 while the costs are still being measured
    # k = 0 with passes shared by SHARED_PASS sessions or more: no draft at all, not even the
    # tokens a strategy drafts for free besides k (cascade's statistical levels), since under
    # load every fed token costs the pass the other sessions wait for
    plain: bool = False
    chain: bool = False  # a tree strategy's round that drafts a chain of first candidates (TreeWidth)
    # k = 0 alone at the verifier (fewer than SHARED_PASS sessions a pass): the draft length
    # that would pay best, for a pipelined strategy to draft ahead during the plain round
    ahead: int = 0


class DraftLength:
    """Chooses each round's draft length for one strategy of one orchestrator."""

    def __init__(self, k_max: int = K_MAX, own_cores: bool = True, pipelined: bool = False) -> None:
        """`own_cores`: the drafters run on cores the verifier does not use (SPECD_OWN_CORES);
        `pipelined`: a round that drafts nothing may still commit a draft drafted ahead during
        the round before it (`sd-pipe` on cores of the drafter's own), so k = 0 yields what
        such rounds measure, not one token (`plain_yield`, `_plain_tokens`)."""
        self.k_max = k_max
        self.own_cores = own_cores
        self.pipelined = pipelined
        # Tokens a k = 0 round commits: a decayed mean over such rounds, pooled over sessions
        self.plain_yield = 1.0
        self._plain_weight = 0.0
        # Tokens after its guess a plain round's draft ahead can have and be done beside the
        # verify, as the last pipelined round measured it (Lookahead.fits); None: not known
        self.fits: int | None = None
        self.pooled = PooledAcceptance()
        self.load = PassLoad()
        self.costs_at: dict[int, RoundCosts] = {}  # by load level (load_level)
        # START lengths being timed, by load level and length: when their round claimed them
        self.timing: dict[tuple[int, int], float] = {}

    @property
    def costs(self) -> RoundCosts:
        """What rounds cost at the load of now."""
        return self.costs_at.setdefault(load_level(self.load.batch), RoundCosts())

    def choose(
        self, session: Acceptance, step: int, limit: int, ar_streak: int = 0, timed: bool = True, streams: int = 0
    ) -> Choice:
        """The k for a session's round `step`, at most `limit` (the room left);
        `ar_streak`: the session's rounds in a row that drafted nothing; `timed`: whether the
        round's wall time will be a sample of its cost (a turn's first round also prefills
        the turn, so it cannot time a START length); `streams`: the turns this orchestrator
        streams now (0: not known)."""
        self.load.streams = streams
        limit = max(0, min(limit, self.k_max))
        if limit == 0:
            return Choice(0, 1.0, 0.0)
        if not self.own_cores and self.load.batch >= SHARED_PASS:
            # The drafter's compute would come out of the cores of the pass the others wait for.
            return Choice(0, 1.0, 0.0, plain=True)
        costs, level = self.costs, load_level(self.load.batch)
        measured, now = costs.measured, time.monotonic()
        for k in sorted({min(k, self.k_max) for k in START}, reverse=True):  # time them first, one round at a time
            claimed = self.timing.get((level, k), -math.inf)
            if timed and k <= limit and k not in measured and now - claimed > TIMING_CLAIM_S:
                self.timing[level, k] = now
                return Choice(k, 0.0, 0.0)
        if len(measured) < 2:
            # Nothing to choose by yet. A round that cannot time a length (a turn's first,
            # where the text may repeat the prompt's end at once) drafts the first START
            # length untimed, as a fresh orchestrator always did; a round that could time one,
            # but finds them all being timed by others, decodes plainly meanwhile.
            return Choice(0, 1.0, 0.0) if timed else Choice(min(START[0], limit), 0.0, 0.0)
        rates = session.rates(limit, self.pooled)

        def seconds(k: int) -> float:
            return costs.seconds(k) + self.load.others_cost(k)

        drafting = max(range(1, limit + 1), key=lambda k: expected_tokens(rates, k) / seconds(k))
        alone = self.load.batch < SHARED_PASS
        zero = self._plain_tokens(rates, drafting) if self.pipelined and alone else 1.0

        def tokens(k: int) -> float:
            return expected_tokens(rates, k) if k else zero

        def rate(k: int) -> float:
            return tokens(k) / seconds(k)

        best = max(range(limit + 1), key=lambda k: (rate(k), -k))
        # A probe's draft lengthens the pass the other sessions wait for too: under load,
        # probe as rarely as that cost is higher (every PROBE_EVERY rounds times B), and not
        # at all while even a draft accepted whole would not pay (a compute-bound pass, where
        # a fed token costs about what a committed one does). Alone a probe also re-times
        # its length (the first timing may have carried the drafter's prefill of the prompt).
        probe = ar_streak >= PROBE_EVERY * max(1.0, self.load.batch)
        if best == 0 and probe and (alone or self._whole_pays(costs, limit, rate(0))):
            best = drafting
        elif best and step % EXPLORE_EVERY == EXPLORE_EVERY - 1:
            # Keep the neighbours' costs fresh: alternately one token more and one less.
            up = (step // EXPLORE_EVERY) % 2 == 0
            best = min(best + 1, limit) if up else best - 1
        plain = best == 0 and self.load.batch >= SHARED_PASS
        return Choice(best, tokens(best), costs.seconds(best), plain, ahead=drafting if best == 0 and not plain else 0)

    def _plain_tokens(self, rates: Sequence[float], ahead: int) -> float:
        """What a pipelined k = 0 round commits: the measured mean (`plain_yield`), shrunk
        towards a model of the session's own (one observation's worth, as rates are).

        The model: a plain round drafts `ahead` tokens ahead after its guess g of the bonus
        token (or what fits beside its verify, if fewer), so the next round has a draft of
        them where g held (α_1: the drafter's first guess), and a round that had one, where
        also its whole draft was accepted. Rounds with a draft then make up
        π = α_1 / (1 + α_1 - α_1·Π_{i<=ahead} α_i) of all (the stationary share of a
        two-state chain), each committing E(ahead) tokens, the others one."""
        ahead = min(ahead, self.fits or ahead)
        first = rates[0]
        whole = math.prod(rates[:ahead])
        share = first / (1.0 + first - first * whole)
        model = 1.0 + share * (expected_tokens(rates, ahead) - 1.0)
        w = self._plain_weight
        return (w * self.plain_yield + PRIOR_WEIGHT * model) / (w + PRIOR_WEIGHT)

    def _whole_pays(self, costs: RoundCosts, limit: int, plain_rate: float) -> bool:
        """Whether some draft of at most `limit` tokens, every token accepted, would commit
        more tokens per second (at `costs`) than plain decoding does now."""
        return any((k + 1) / (costs.seconds(k) + self.load.others_cost(k)) > plain_rate for k in range(1, limit + 1))

    def observe(
        self,
        session: Acceptance,
        k: int,
        drafted: int,
        accepted: int,
        seconds: float | None,
        verify: CallCost | None = None,
        first_path: tuple[int, int] | None = None,
    ) -> None:
        """A round's outcome: `k` asked, `drafted` drafted, `accepted` accepted, in `seconds` of
        wall time (None: not a sample of a round's cost, e.g. a turn's first round, which also
        prefills the prompt).

        The cost is a sample of T(min(k, drafted)): a drafter may draft less than asked (it
        stopped at low confidence; `lookup` found no repeat), and then the round cost what a
        round of that length costs (drafting nothing, a plain round). Drafting more than k is
        a strategy's own terms (cascade's max-gram tail, slem's re-tokenized text): k then.
        `verify`: the round's verify call's cost, with the batched pass it ran in (PassLoad).
        `first_path`: TreeWidth's (a tree round's path of first candidates); one shape has no
        use for it."""
        # The round that claimed k reported (at whatever level the load has moved to since):
        # timed, or - having drafted less than k - to be timed by another round
        for key in [key for key in self.timing if key[1] == k]:
            del self.timing[key]
        if verify is not None and verify.batch_tokens:
            self.load.observe(verify.batch_sessions, verify.batch_tokens, verify.compute_seconds)
        if drafted:
            session.observe(drafted, accepted)
            self.pooled.observe(drafted, accepted, decay=POOLED_DECAY)
        if k == 0 and self.pipelined:
            w = DECAY * self._plain_weight
            self.plain_yield = (w * self.plain_yield + accepted + 1) / (w + 1.0)
            self._plain_weight = w + 1.0
        if seconds is not None and math.isfinite(seconds) and seconds >= 0:
            self.costs.observe(min(k, drafted), seconds)


class TreeWidth:
    """A tree strategy's draft shape, chosen each round beside its depth: the tree (`staged`'s
    several candidates a position), or a chain of the drafter's first candidates alone.

    Extra candidates raise acceptance where the drafter's first guess is often wrong but its
    second or third right, and cost a node each in the drafter's passes and in the verify. On
    a CPU whose verify pass is not flat in its tokens (AVX2: 104 ms for one token, 128 for
    four, a 1.5B int8 target) the nodes of a 3-wide tree can cost more than the tokens they
    add. So each shape has its draft lengths chosen as DraftLength does (acceptance by
    position, round costs by length, both shapes sharing the verifier's load), and the round
    takes the shape whose best length promises more tokens per second.

    A tree round measures both shapes' acceptance: the path of first candidates through its
    tree is the chain the drafter would have drafted (greedy: its argmax at each node;
    sampled: its first draw, tested first by recursive rejection sampling, as a chain's
    would be), so its accepted share is a chain round's (`first_path`). A chain round
    measures only the chain's; every EXPLORE_EVERY rounds the shape not chosen drafts once,
    so its costs and the session's tree acceptance stay current.

    Lossless for the reasons DraftLength is: the shape, like the length, is fixed from what
    is committed and from timings before the round's draws.
    """

    def __init__(self, k_max: int = K_MAX, own_cores: bool = True) -> None:
        self.k_max = k_max
        self.tree = DraftLength(k_max, own_cores)
        self.chain = DraftLength(k_max, own_cores)
        self.chain.load = self.tree.load  # one verifier, one load

    def choose(
        self, session: Acceptance, step: int, limit: int, ar_streak: int = 0, timed: bool = True, streams: int = 0
    ) -> Choice:
        """As DraftLength.choose; the choice says which shape (`chain`)."""
        tree = self.tree.choose(session, step, limit, ar_streak, timed, streams)
        if not tree.seconds:  # the tree's lengths are being timed, or no round may draft
            return tree
        if session.chain is None:
            session.chain = Acceptance()
        chain = self.chain.choose(session.chain, step, limit, ar_streak, timed, streams)
        if not chain.seconds:
            # A START length of the chain to time (expected 0), or all of them being timed by
            # other rounds meanwhile
            return replace(chain, chain=bool(chain.k)) if chain.expected_tokens == 0.0 else tree
        if not tree.k and not chain.k:
            return tree
        rate_tree, rate_chain = (
            c.expected_tokens / (c.seconds + self.tree.load.others_cost(c.k)) for c in (tree, chain)
        )
        use_chain = rate_chain >= rate_tree
        chosen, other = (chain, tree) if use_chain else (tree, chain)
        if step % EXPLORE_EVERY == EXPLORE_EVERY // 2 and chosen.k:
            # The other shape, to keep its figures current: at its own best length, or at this
            # one's where its own is none (a shape that never drafts would never be re-measured)
            chosen, use_chain = (other if other.k else replace(other, k=chosen.k)), not use_chain
        return replace(chosen, chain=use_chain and chosen.k > 0)

    def observe(
        self,
        session: Acceptance,
        k: int,
        drafted: int,
        accepted: int,
        seconds: float | None,
        verify: CallCost | None = None,
        first_path: tuple[int, int] | None = None,
    ) -> None:
        """As DraftLength.observe. `first_path`: a tree round's path of first candidates, its
        length and how much of it was accepted; None for a round that drafted a chain, or
        nothing (a plain round, a sample of T(0) for both shapes)."""
        if session.chain is None:
            session.chain = Acceptance()
        if drafted and first_path is None:
            self.chain.observe(session.chain, k, drafted, accepted, seconds, verify)
            return
        self.tree.observe(session, k, drafted, accepted, seconds, verify)
        if drafted and first_path is not None:
            session.chain.observe(*first_path)
            self.chain.pooled.observe(*first_path, decay=POOLED_DECAY)
        elif not drafted:
            self.chain.observe(session.chain, k, 0, 0, seconds)
