"""A ModelHost stand-in for statistical tests: tiny vocabularies, logits fixed per position.

The logits at position t are row t - 1 of a table whatever came before, so a lossless
strategy's output is distributed as the product of the target's rows. Strategies run their
real propose/review/verify/tree code on it, at table-lookup cost.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.runtime import ModelInfo, SessionState
from services.tree import Tree


class TableHost:
    def __init__(self, table: torch.Tensor) -> None:
        self.table = table  # (L, V) float64 logits
        self.info = ModelInfo("table", table.shape[1], table.shape[0], (), "float64", "cpu", "table")
        self.sessions: dict[str, SessionState] = {}

    def held_context(self, session_id: str) -> list[int] | None:
        state = self.sessions.get(session_id)
        return None if state is None else state.context

    def session(self, session_id: str) -> SessionState:
        return self.sessions.setdefault(session_id, SessionState())

    def logits(self, session_id: str, seq: Sequence[int], n_last: int) -> torch.Tensor:
        return self.table[len(seq) - n_last : len(seq)]  # (n_last, V)

    def tree_logits(self, session_id: str, context: Sequence[int], tree: Tree, n_last: int) -> torch.Tensor:
        rows = [len(context) - 1] + [len(context) - 1 + d for d in tree.depths()]  # by position
        return self.table[rows[-n_last:]]  # (n_last, V)

    def keep_path(self, session_id: str, path: Sequence[int]) -> None:
        pass
