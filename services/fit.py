"""A least-squares line through observations that decay: recent ones count most. What a
pass costs by the tokens it feeds is fitted this way on both sides of a round - the
orchestrator over its verifier's passes (orchestrator/adaptive.PassLoad), a drafter over its
own tree passes (services/second_stage.PassTimes).

Pure: standard library only.
"""

from __future__ import annotations


class DecayedLine:
    """Decayed sums of 1, x, y, x² and x·y: each observation multiplies the earlier ones by
    `decay`."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.n = self.x = self.y = self.xx = self.xy = 0.0

    def observe(self, x: float, y: float) -> None:
        d = self.decay
        self.n = d * self.n + 1.0
        self.x = d * self.x + x
        self.y = d * self.y + y
        self.xx = d * self.xx + x * x
        self.xy = d * self.xy + x * y

    @property
    def mean_x(self) -> float:
        return self.x / self.n

    @property
    def mean_y(self) -> float:
        return self.y / self.n

    @property
    def variance(self) -> float:
        """Of x; needs an observation."""
        return self.xx / self.n - (self.x / self.n) ** 2

    @property
    def slope(self) -> float:
        """Of y on x; needs a variance above 0."""
        return (self.xy / self.n - (self.x / self.n) * (self.y / self.n)) / self.variance
