"""A runtime stand-in for statistical tests: tiny vocabularies, logits fixed per position.

The logits at position t are row t - 1 of a table whatever came before, so a lossless
strategy's output is distributed as the product of the target's rows. Strategies run their
real propose/review/verify/tree code on it (through the drafter's and verifier's cores), at
table-lookup cost.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.runtime import ModelInfo, PassCall, alone
from services.tree import Tree


class TableRuntime:
    """The services/runtime.Runtime contract over a (L, V) table of logits."""

    tokenizer = None

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table  # (L, V) float64 logits
        self.info = ModelInfo("table", table.shape[1], table.shape[0], (), "float64", "cpu", "table", runtime="table")

    def logits(self, session_id: str, seq: Sequence[int], n_last: int) -> torch.Tensor:
        return self.table[len(seq) - n_last : len(seq)]  # (n_last, V)

    def logits_batch(self, calls: Sequence[PassCall]) -> list[torch.Tensor]:
        return [alone(self, call) for call in calls]

    def tree_logits(self, session_id: str, context: Sequence[int], tree: Tree, n_last: int) -> torch.Tensor:
        rows = [len(context) - 1] + [len(context) - 1 + d for d in tree.depths()]  # by position
        return self.table[rows[-n_last:]]  # (n_last, V)

    def keep_path(self, session_id: str, path: Sequence[int]) -> None:
        pass

    def settle(self, session_id: str, seq: Sequence[int]) -> None:
        pass

    def cached(self, session_id: str) -> tuple[list[int], int]:
        return [], 0

    def release(self, session_id: str) -> bool:
        return False

    session_count = 0
