"""The acceptance rules of a draft tree and of drafted strings over the target's passes.

Plain functions over a runtime (services/runtime.py) or its logits and a session's full
context; the verifier's core (verifier_svc/core.py) resolves context deltas, seeds and times
them. Chain and tree drafts have their passes there, where they may be batched with other
sessions' (services/calls.py); services.acceptance.accept and tree_verdict run on their rows."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from services import slrs
from services.multidraft import TreeVerdict, verify_tree_greedy, verify_tree_sampled
from services.runtime import Runtime
from services.sampling import SamplingParams, SparseDist, target_probs
from services.tree import Tree
from services.vocab import token_bytes

log = logging.getLogger(__name__)


def tree_verdict(
    tree: Tree, q: Sequence[SparseDist | None], logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> TreeVerdict:
    """What the target's logits (N+1, V) after the context and each node accept of a draft
    tree - from one pass with a tree attention mask and depth-based position ids
    (Runtime.tree_logits, or a TreeCall in Runtime.logits_batch): greedy the longest path of
    target argmaxes, sampling a walk of the tree with recursive rejection sampling
    (services/multidraft.py). The caller then has the KV cache keep only the accepted path."""
    if params.greedy:
        return verify_tree_greedy(tree, logits.argmax(dim=-1).tolist())
    return verify_tree_sampled(tree, list(q), target_probs(logits, params), generator)


def string_index(tokenizer, rows: int) -> slrs.PrefixIndex:
    """The target's vocabulary as bytes, indexed for prefix queries (slrs)."""
    started = time.perf_counter()
    index = slrs.PrefixIndex(token_bytes(tokenizer, size=rows))
    log.info("indexed the target's %d tokens as bytes in %.1fs", rows, time.perf_counter() - started)
    return index


@dataclass(frozen=True)
class StringsResult:
    verdict: slrs.StringVerdict
    verified: int  # drafted strings that fitted the tree budget
    tree_nodes: int


def verify_strings(
    runtime: Runtime,
    index: slrs.PrefixIndex,
    session_id: str,
    context: list[int],
    proposals: Sequence[slrs.StringProposal],
    params: SamplingParams,
    generator: torch.Generator,
    max_nodes: int,
) -> StringsResult:
    """String-level rejection sampling of drafted text (services/slrs.py).

    One target pass, with a tree attention mask, over every target tokenization of the drafted
    strings (as many leading strings as fit in max_nodes tree nodes); the tokens committed
    never leave that tree, and the cache keeps their path.
    """
    tree, node_bytes, kept = slrs.build_tree(index, list(proposals), max_nodes)
    probs = target_probs(runtime.tree_logits(session_id, context, tree, len(tree) + 1), params)  # (N+1, V)
    verdict = slrs.verify_strings(tree, node_bytes, probs, list(proposals[:kept]), index, generator, params.greedy)
    runtime.settle(session_id, [*context, *verdict.tokens])
    return StringsResult(verdict, kept, len(tree))
