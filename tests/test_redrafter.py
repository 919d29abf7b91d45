"""The recurrent draft head (services/redrafter.py, strategy redrafter) in this process: the
beam-to-tree merge and beam search, table-driven; training that lowers its loss; the
verifier's hidden state; greedy output equal to plain decoding on a tiny model, with a head
that drafts badly and with beams that hold the target's own continuation; sampled output
distributed as the target's p. The real-process tests are in tests/test_redrafter_services.py.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import itertools
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from tables import TableRuntime
from test_acceptance import PASS, chi_square_pvalue
from test_cascade import decode

from drafter_svc.head import GroupedLmHead, HeadDrafter, int8_tables, target_tables
from orchestrator.strategies import (
    HEAD_DEPTH_BESIDE_LOOKUP,
    HEAD_DEPTH_BESIDE_MATCH,
    Backends,
    Carry,
    NotServable,
    RoundInput,
    parallel_round,
    redrafter_round,
)
from services.redrafter import (
    MANIFEST,
    HeadConfig,
    LmHeadGroups,
    Manifest,
    ParallelHead,
    RecurrentHead,
    TargetId,
    beam_search,
    beams_to_tree,
    distill_loss,
    group_means,
    group_vocabulary,
    load_head,
    save_head,
)  # fmt: skip
from services.roles import CallCost, TreeDraft
from services.runtime import weights_id
from services.sampling import SamplingParams, target_probs
from services.torch_runtime import load_torch
from services.tree import ROOT, Tree
from specd.train import Examples, TrainSettings, agreement, bench_prompts_excluded, fit_groups, train_head
from verifier_svc.core import VerifierCore

pytestmark = pytest.mark.usefixtures("single_thread_torch")

GREEDY = SamplingParams()


# ---------------------------------------------------------------- beams -> tree

TREES = {
    "the module's worked example": (
        [(5, 7, 2), (5, 7, 9), (5, 3, 3)],
        None,
        ((5, 7, 2, 9, 3, 3), (ROOT, 0, 1, 1, 0, 4)),
    ),
    "one beam is a chain": ([(1, 2, 3)], None, ((1, 2, 3), (ROOT, 0, 1))),
    "disjoint first tokens": ([(1, 2), (3, 4)], None, ((1, 2, 3, 4), (ROOT, 0, ROOT, 2))),
    "a repeated beam adds nothing": ([(1, 2), (1, 2)], None, ((1, 2), (ROOT, 0))),
    "a beam past the budget is left out whole": ([(1, 2), (3, 4), (1, 5)], 3, ((1, 2, 5), (ROOT, 0, 0))),
    "no beams": ([], None, ((), ())),
}


@pytest.mark.parametrize("beams, budget, expected", TREES.values(), ids=TREES.keys())
def test_beams_merge_into_their_prefix_tree(beams, budget, expected) -> None:
    tree = beams_to_tree(beams, budget)
    assert (tree.tokens, tree.parents) == expected
    paths = {tuple(tree.tokens[i] for i in tree.path(leaf)) for leaf in range(len(tree)) if not tree.children(leaf)}
    assert paths <= set(map(tuple, beams))  # every leaf ends a beam


def small_head(H: int = 8, V: int = 11, seed: int = 0) -> tuple[RecurrentHead, torch.nn.Embedding, torch.nn.Linear]:
    torch.manual_seed(seed)
    head = RecurrentHead(HeadConfig(H, blocks=1))
    embed, out = torch.nn.Embedding(V, H), torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        out.weight.mul_(3.0)  # peaked distributions: beams differ in score
    return head.eval(), embed, out


def chain_logprob(head, embed, out, h, last: int, tokens) -> float:
    """log q of one draft, step by step as the head defines it."""
    s, e, total = head.start(h[None]), embed(torch.tensor([last])), 0.0
    for t in tokens:
        s, x = head.step(h[None], s, e)
        total += float(torch.log_softmax(out(x), -1)[0, t])
        e = embed(torch.tensor([t]))
    return total


@pytest.mark.parametrize("width, depth", [(1, 1), (1, 4), (3, 3), (5, 2)])
def test_beam_search_keeps_the_best_drafts_by_their_own_probability(width, depth) -> None:
    head, embed, out = small_head()
    h = torch.randn(8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        beams = beam_search(head, embed, out, h, 4, width, depth)
        scores = [chain_logprob(head, embed, out, h, 4, b.tokens) for b in beams]
        everything = sorted(
            (chain_logprob(head, embed, out, h, 4, t) for t in itertools.product(range(11), repeat=depth)), reverse=True
        ) if depth <= 2 else None  # fmt: skip
    assert len(beams) == width and all(len(b.tokens) == depth for b in beams)
    assert [round(b.logprob, 4) for b in beams] == [round(s, 4) for s in scores]  # each score is its chain's log q
    assert scores == sorted(scores, reverse=True)
    if everything is not None and depth == 1:  # one step: exactly the top `width` tokens
        assert [round(s, 4) for s in scores] == [round(s, 4) for s in everything[:width]]


def small_parallel_head(
    H: int = 8, V: int = 11, depth: int = 3
) -> tuple[ParallelHead, torch.nn.Embedding, torch.nn.Linear]:
    torch.manual_seed(0)
    head = ParallelHead(HeadConfig(H, blocks=1, depth=depth))
    embed, out = torch.nn.Embedding(V, H), torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        out.weight.mul_(3.0)
    return head.eval(), embed, out


@pytest.mark.parametrize("width, depth", [(1, 1), (1, 3), (4, 2), (3, 5)])
def test_a_parallel_head_keeps_the_best_joint_drafts_of_one_pass(width, depth) -> None:
    """Positions drafted in one pass are independent, so a draft's log q is the sum of its
    positions' and the best drafts are the top of that sum (depth capped by the head's 3)."""
    head, embed, out = small_parallel_head()
    h = torch.randn(8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        beams = head.draft(embed, out, h, 4, width, depth)
        steps = min(depth, 3)
        x = head.features(h[None], embed(torch.tensor([4])), steps)[0]  # (steps, H)
        logq = torch.log_softmax(out(x), dim=-1)  # (steps, V)
    joint = sorted(
        ((sum(float(logq[j, t]) for j, t in enumerate(draft)), draft) for draft in itertools.product(range(11), repeat=steps)),
        reverse=True,
    )  # fmt: skip
    assert [len(b.tokens) for b in beams] == [steps] * width
    assert [round(b.logprob, 4) for b in beams] == [round(score, 4) for score, _ in joint[:width]]
    assert all(
        b.logprob == pytest.approx(sum(float(logq[j, t]) for j, t in enumerate(b.tokens)), abs=1e-5) for b in beams
    )


# ---------------------------------------------------------------- training


@pytest.mark.parametrize(
    "kind, align", [("redrafter", 0.0), ("redrafter", 1.0), ("parallel", 0.0)],
    ids=["distillation", "with alignment", "parallel head"],
)  # fmt: skip
def test_training_lowers_the_distillation_loss(kind, align) -> None:
    """A head learns labels that follow from h and the tokens it reads (a made-up target; for
    a parallel head, which reads only the first, the later labels repeat that one)."""
    H, V, N, k = 16, 40, 512, 3
    g = torch.Generator().manual_seed(0)
    embed, out = torch.randn(V, H, generator=g), torch.randn(V, H, generator=g)
    hidden = torch.randn(N, H, generator=g)
    inputs = torch.randint(V, (N, k), generator=g)
    # step 1's label follows from h (O's favourite token for it), later ones from the token read
    later = [inputs[:, 0] if kind == "parallel" else inputs[:, j] for j in range(1, k)]
    label = torch.stack([(hidden @ out.T).argmax(-1), *later], dim=1)  # (N, k)
    rows = torch.cat([hidden, torch.randn(k, H, generator=g)])  # H_{i+j} of the last examples too
    data = Examples(rows.half(), torch.arange(N), inputs, label[..., None], torch.ones(N, k, 1))
    settings = TrainSettings(depth=k, batch=64, lr=3e-3, blocks=1, max_steps=300, align=align, kind=kind)
    head, losses, steps = train_head(data, embed, out, settings, math.inf, lambda loss, agree: None)
    assert steps == 300 and isinstance(head, ParallelHead if kind == "parallel" else RecurrentHead)
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20


def test_the_loss_is_the_soft_cross_entropy_over_the_candidates() -> None:
    head, embed, out = small_head(V=11)
    h, inputs = torch.randn(2, 8), torch.tensor([[1, 2], [3, 4]])
    ids = torch.tensor([[[5, 6], [7, 5]], [[1, 2], [3, 4]]])  # (B, k, K)
    probs = torch.tensor([[[0.75, 0.25], [1.0, 0.0]], [[0.5, 0.5], [0.25, 0.75]]])
    candidates = torch.arange(11)
    with torch.no_grad():
        loss, _ = distill_loss(head, embed, out.weight[candidates], h, inputs, ids, probs, candidates)
        expected = 0.0
        for b in range(2):
            s, e = head.start(h[b : b + 1]), embed(inputs[b, :1])
            for j in range(2):
                s, x = head.step(h[b : b + 1], s, e)
                logq = torch.log_softmax(out(x), -1)[0]
                expected -= float((probs[b, j] * logq[ids[b, j]]).sum()) / 2
                e = embed(inputs[b, j + 1 : j + 2])
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_no_bench_prompt_is_in_the_training_text() -> None:
    from specd.bench.prompts import read_gsm8k, read_humaneval
    from specd.train import stdlib_files

    train, held = stdlib_files(seed=0)
    assert train and held and not set(train) & set(held)
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in train]
    prompts = [p.text.split("```python\n")[-1] for p in read_humaneval()] + [p.text for p in read_gsm8k()]
    assert bench_prompts_excluded(texts, prompts) == []
    assert bench_prompts_excluded(["x" * 10 + prompts[0].strip()[:80]], prompts)  # the check itself finds one


def test_answer_prompts_are_stubs_of_the_training_files_and_no_bench_prompt(tmp_path: Path) -> None:
    from specd.bench.prompts import read_humaneval
    from specd.train import function_stubs, stdlib_files

    train, held = stdlib_files(seed=0)
    stubs = function_stubs(train[:200], 200)
    assert len(stubs) > 20 and all("```python\ndef " in s and s.endswith("```") for s in stubs)
    assert not set(function_stubs(held, 10**6)) & set(stubs)  # held-out files give none of them
    bench = [p.text for p in read_humaneval()]
    assert (
        not set(stubs) & set(bench) and bench_prompts_excluded(stubs, [b.split("```python\n")[-1] for b in bench]) == []
    )
    module = tmp_path / "m.py"
    module.write_text(
        'import os\n\n@cache\ndef f(a,\n      b):\n    """Adds."""\n    return a + b\n\ndef _g():\n    """No."""\n'
    )
    assert function_stubs([module], 5) == [
        'Complete the following Python function.\n\n```python\ndef f(a,\n      b):\n    """Adds."""\n```'
    ]


def test_answers_are_the_targets_greedy_continuations_read_teacher_forced(tiny_pair) -> None:
    """Each example of an answer reads answer tokens, and its labels (the target's top-1 at the
    positions it drafts) are the answer's next tokens: the answer is the target's own greedy
    output, read back in one pass."""
    from specd.train import continuation_examples

    runtime = load_torch(tiny_pair.target_dir, dtype="float64", device="cpu", max_sessions=2)
    prompts = ["def add(a, b):", "The quick brown fox"]
    found, answered = continuation_examples(runtime, prompts, TrainSettings(depth=3), math.inf, lambda n: None)
    assert found is not None and len(found) > 10 and answered == prompts
    assert torch.equal(found.label_ids[:, :-1, 0], found.inputs[:, 1:])
    assert found.rows.shape[0] > len(found)  # the prompts' rows are read, not drafted from


def test_answers_drafted_by_sd_are_the_targets_own(tiny_pair) -> None:
    """SpeculativeAnswers (sd over the drafter, the Engine in this process) answers each prompt
    with the very tokens the target alone answers, and its examples are the same."""
    from services.worker import Worker
    from specd.train import SpeculativeAnswers, TargetAnswers, continuation_examples, prompt_ids

    runtime = load_torch(tiny_pair.target_dir, dtype="float64", device="cpu", max_sessions=2)
    prompts = ["def add(a, b):", "import json\n\ndef dump(", "The quick brown fox"]
    drafted = SpeculativeAnswers(runtime, Worker("test"), tiny_pair.target_dir, tiny_pair.drafter_dir, threads=1)
    for prompt in prompts:
        ids = prompt_ids(runtime.tokenizer, prompt)
        alone = TargetAnswers(runtime)(prompt, ids, lambda n: None)
        assert drafted(prompt, ids, lambda n: None) == alone
    by_sd, _ = continuation_examples(runtime, prompts, TrainSettings(depth=3), math.inf, lambda n: None, drafted)
    by_target, _ = continuation_examples(runtime, prompts, TrainSettings(depth=3), math.inf, lambda n: None)
    assert by_sd is not None and by_target is not None
    assert torch.equal(by_sd.inputs, by_target.inputs) and torch.equal(by_sd.label_ids, by_target.label_ids)


def test_every_run_adds_its_answers_to_the_kept_ones(tiny_pair, tmp_path: Path, single_thread_torch) -> None:
    """The target's answers are kept across runs (answers_cache): a second run answers other
    prompts and trains on both runs' answers; --answer-minutes 0 trains on the kept ones and
    answers none, with --fresh-data too (the text is read again, the answers stay)."""
    from specd.train import answers_cache, run

    home = tmp_path / "home"
    settings = TrainSettings(depth=3, chunk=64, minutes=0.25, answer_minutes=0.05, groups=0, max_steps=5)

    def trained(name: str, answer_minutes: float, fresh_data: bool = False) -> tuple[dict, dict]:
        changed = dataclasses.replace(settings, answer_minutes=answer_minutes, fresh_data=fresh_data)
        folder = run(str(tiny_pair.target_dir), name, home, changed, dtype="float32", threads=1, progress=False,
                     drafter=str(tiny_pair.drafter_dir))  # fmt: skip
        kept = torch.load(answers_cache(home / "heads", weights_id(tiny_pair.target_dir), "float32", settings))
        return json.loads((folder / "redrafter.json").read_text())["data"], kept

    first, kept_first = trained("a", 0.05)
    second, kept_second = trained("b", 0.05)
    assert 0 < first["answered_prompts"] < second["answered_prompts"] == len(kept_second["prompts"])
    assert set(kept_first["prompts"]) < set(kept_second["prompts"])
    assert first["answer_positions"] < second["answer_positions"] == len(kept_second["examples"]["at"])
    third, kept_third = trained("c", 0)
    assert third["answered_prompts"] == second["answered_prompts"]
    assert third["answer_positions"] == second["answer_positions"] and third["cached"]
    fresh, _ = trained("d", 0, fresh_data=True)
    assert fresh["answer_positions"] == second["answer_positions"] and not fresh["cached"]


def test_a_saved_head_loads_the_same_and_refuses_another_kind(tmp_path: Path) -> None:
    head, _, _ = small_head()
    manifest = Manifest("redrafter", TargetId("t", "w", "f", 8, 11), head.config, seed=3, loss=[1.0, 0.5])
    save_head(tmp_path / "h", head, manifest)
    loaded, read = load_head(tmp_path / "h")
    assert read == manifest
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="specd train redrafter"):
        load_head(tmp_path)


# ---------------------------------------------------------------- LM-head groups (CORAL)


def test_the_vocabulary_is_grouped_by_the_direction_of_its_output_rows() -> None:
    """Three directions, four tokens along each at different lengths and a little noise:
    three groups are exactly the three directions, whatever the lengths."""
    g = torch.Generator().manual_seed(0)
    directions = torch.eye(3, 6) * 4.0  # (3, H)
    rows, truth = [], []
    for d in range(3):
        for length in (0.5, 1.0, 2.0, 5.0):
            rows.append(directions[d] * length + 0.05 * torch.randn(6, generator=g))
            truth.append(d)
    group_of = group_vocabulary(torch.stack(rows), 3, seed=1)
    by_group = {frozenset(i for i, x in enumerate(group_of.tolist()) if x == grp) for grp in set(group_of.tolist())}
    by_direction = {frozenset(i for i, t in enumerate(truth) if t == d) for d in range(3)}
    assert group_of.shape == (12,) and by_group == by_direction


# (router weight (3 groups, H=2), group of each of 6 tokens, active, x) -> tokens computed
MASKS = {
    "one active group": ([[1, 0], [0, 1], [-1, 0]], [0, 1, 2, 0, 1, 2], 1, [[2.0, 1.0]], [[1, 0, 0, 1, 0, 0]]),
    "two active groups": ([[1, 0], [0, 1], [-1, 0]], [0, 1, 2, 0, 1, 2], 2, [[2.0, 1.0]], [[1, 1, 0, 1, 1, 0]]),
    "each row its own groups": (
        [[1, 0], [0, 1], [-1, 0]],
        [0, 0, 1, 1, 2, 2],
        1,
        [[1.0, 0.0], [-1.0, 0.0]],
        [[1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1]],
    ),
    "every group active": ([[1, 0], [0, 1], [-1, 0]], [2, 1, 0, 2, 1, 0], 3, [[0.0, 3.0]], [[1, 1, 1, 1, 1, 1]]),
}


@pytest.mark.parametrize("weight, group_of, active, x, expected", MASKS.values(), ids=MASKS.keys())
def test_a_step_computes_the_rows_of_the_groups_its_router_ranks_best(weight, group_of, active, x, expected) -> None:
    groups = LmHeadGroups(2, 6, 3, active)
    with torch.no_grad():
        groups.router.weight.copy_(torch.tensor(weight, dtype=torch.float32))
        groups.router.bias.zero_()
        groups.group_of.copy_(torch.tensor(group_of))
    assert groups.mask(torch.tensor(x)).int().tolist() == expected


@pytest.mark.parametrize("active", [1, 3, 8])
def test_the_grouped_lm_head_equals_the_whole_one_on_the_rows_it_computes(active) -> None:
    from services.int8 import Int8Linear, quantize_rows

    H, V, G = 16, 200, 8
    g = torch.Generator().manual_seed(0)
    out = torch.randn(V, H, generator=g)
    groups = LmHeadGroups(H, V, G, active)
    with torch.no_grad():
        groups.group_of.copy_(group_vocabulary(out, G, seed=0))
    q, scale = quantize_rows(out)
    whole, grouped = Int8Linear.from_quantized(q, scale, None), GroupedLmHead(q, scale, groups)
    x = torch.randn(3, H, generator=g)
    with torch.no_grad():
        full, part = whole(x), grouped(x)
    computed = torch.isfinite(part)
    union = groups.mask(x).any(dim=0)  # rows of the groups any row of x picks
    assert torch.equal(computed, union[None].expand_as(computed))
    assert torch.equal(part[computed], full[computed])  # bitwise: the same int8 rows and scales
    if active == G:
        assert torch.equal(part, full)


def test_fitted_groups_keep_the_head_and_route_to_the_target_tokens() -> None:
    """On a made-up target whose labels follow from h, a trained router's groups hold the
    label more often than the router's start does, and the head's own weights are kept."""
    H, V, N, k = 16, 120, 512, 2
    g = torch.Generator().manual_seed(0)
    embed, out = torch.randn(V, H, generator=g), torch.randn(V, H, generator=g)
    hidden = torch.randn(N, H, generator=g)
    inputs = torch.randint(V, (N, k), generator=g)
    label = torch.stack([(hidden @ out.T).argmax(-1), inputs[:, 1]], dim=1)
    data = Examples(torch.cat([hidden, torch.randn(k, H, generator=g)]).half(), torch.arange(N), inputs,
                    label[..., None], torch.ones(N, k, 1))  # fmt: skip
    settings = TrainSettings(depth=k, batch=64, lr=3e-3, blocks=1, max_steps=200, groups=12, active_groups=2)
    head, _, _ = train_head(data, embed, out, settings, math.inf, lambda loss, agree: None)
    grouped = fit_groups(head, data, embed, out, settings)
    assert grouped.config.groups == 12 and grouped.config.vocab_size == V and grouped.groups.active == 2
    assert all(torch.equal(a, grouped.state_dict()[name]) for name, a in head.state_dict().items())
    found = agreement(grouped, data, embed, out)
    assert len(found["grouped_agreement_by_position"]) == k and 0 < found["grouped_rows_per_step"] < V
    start = copy.deepcopy(grouped)  # the same groups, the router as it starts: each group's mean row
    with torch.no_grad():
        start.groups.router.weight.copy_(group_means(out, start.groups.group_of, 12))
        start.groups.router.bias.zero_()

    def holds_label(h: RecurrentHead) -> float:
        x = next(h.teacher_forced(hidden, lambda ids: embed[ids], inputs))  # step 1's features
        return float(h.groups.mask(x).gather(1, label[:, :1]).float().mean())

    assert holds_label(grouped) > holds_label(start)


def test_a_parallel_head_loads_as_one(tmp_path: Path) -> None:
    head, _, _ = small_parallel_head()
    save_head(tmp_path / "p", head, Manifest("parallel", TargetId("t", "w", "f", 8, 11), head.config, seed=0))
    loaded, manifest = load_head(tmp_path / "p")
    assert isinstance(loaded, ParallelHead) and manifest.kind == "parallel" and loaded.config.depth == 3
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), loaded.state_dict().values()))
    (tmp_path / "p" / MANIFEST).write_text(manifest.to_json().replace('"parallel"', '"medusa"'))
    with pytest.raises(ValueError, match="not a head this version serves"):
        load_head(tmp_path / "p")


def test_a_grouped_head_saves_and_loads_its_groups(tmp_path: Path) -> None:
    torch.manual_seed(0)
    head = RecurrentHead(HeadConfig(8, blocks=1, groups=3, active=2, vocab_size=11)).eval()
    with torch.no_grad():
        head.groups.group_of.copy_(torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1]))
    save_head(tmp_path / "h", head, Manifest("redrafter", TargetId("t", "w", "f", 8, 11), head.config, seed=0))
    loaded, manifest = load_head(tmp_path / "h")
    assert manifest.config.groups == 3 and loaded.groups.active == 2
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), loaded.state_dict().values()))


# ---------------------------------------------------------------- on a tiny target


@pytest.fixture(scope="module")
def tiny_head(tiny_pair, tmp_path_factory) -> tuple[Path, HeadDrafter]:
    """An untrained head for the tiny target (its drafts are mostly rejected) and its tables."""
    target = load_torch(tiny_pair.target_dir, dtype="float32", device="cpu", max_sessions=1)
    H = target.model.config.hidden_size
    torch.manual_seed(0)
    head = RecurrentHead(HeadConfig(H, blocks=1)).eval()
    manifest = Manifest("redrafter", TargetId(str(tiny_pair.target_dir), target.info.weights,
                                              target.info.tokenizer_fingerprint, H, target.info.vocab_size), head.config, 0)  # fmt: skip
    embed, lm_head = int8_tables(*target_tables(tiny_pair.target_dir))
    return tiny_pair.target_dir, HeadDrafter(head, manifest, embed, lm_head, name="tiny-head")


@pytest.fixture(scope="module")
def tiny_parallel_head(tiny_pair) -> HeadDrafter:
    """An untrained parallel head of depth 3 for the tiny target."""
    target = load_torch(tiny_pair.target_dir, dtype="float32", device="cpu", max_sessions=1)
    H = target.model.config.hidden_size
    torch.manual_seed(0)
    head = ParallelHead(HeadConfig(H, blocks=1, depth=3)).eval()
    manifest = Manifest("parallel", TargetId(str(tiny_pair.target_dir), target.info.weights,
                                             target.info.tokenizer_fingerprint, H, target.info.vocab_size), head.config, 0)  # fmt: skip
    return HeadDrafter(head, manifest, *int8_tables(*target_tables(tiny_pair.target_dir)), name="tiny-parallel-head")


@pytest.fixture(scope="module")
def tiny_grouped_head(tiny_pair) -> HeadDrafter:
    """An untrained head for the tiny target whose steps compute 2 of its LM head's 8 groups."""
    target = load_torch(tiny_pair.target_dir, dtype="float32", device="cpu", max_sessions=1)
    H, V = target.model.config.hidden_size, target.info.vocab_size
    torch.manual_seed(0)
    head = RecurrentHead(HeadConfig(H, blocks=1, groups=8, active=2, vocab_size=V)).eval()
    embed, out = target_tables(tiny_pair.target_dir)
    with torch.no_grad():
        head.groups.group_of.copy_(group_vocabulary(out, 8, seed=0))
    manifest = Manifest("redrafter", TargetId(str(tiny_pair.target_dir), target.info.weights,
                                              target.info.tokenizer_fingerprint, H, V), head.config, 0)  # fmt: skip
    return HeadDrafter(head, manifest, *int8_tables(embed, out, head.groups), name="tiny-grouped-head")


@pytest.mark.parametrize("dtype", ["float64", "int8"])
def test_the_verifier_returns_the_hidden_state_behind_its_last_token(tiny_pair, dtype) -> None:
    runtime = load_torch(tiny_pair.target_dir, dtype=dtype, device="cpu", max_sessions=2)
    core = VerifierCore(runtime)
    context = [5, 9, 14, 3, 7]
    tree = Tree((4, 8, 2), (ROOT, 0, ROOT))
    v = asyncio.run(core.verify_tree("s", context, tree, (), GREEDY, 0, want_hidden=True))
    with torch.no_grad():
        logits = runtime.model.get_output_embeddings()(v.hidden.to(runtime.model.dtype)[None]).float()[0]
    assert int(logits.argmax()) == v.tokens[-1]  # the LM head's input whose output is the last token
    full = runtime.logits("check", [*context, *v.tokens[:-1]], 1)[0]
    assert torch.allclose(logits, full.float(), atol=1e-4)
    plain = asyncio.run(core.verify_tree("s", [*context, *v.tokens], Tree((), ()), (), GREEDY, 0, want_hidden=True))
    assert plain.accepted == 0 and len(plain.tokens) == 1 and plain.hidden.shape == v.hidden.shape


class ContinuationBeams:
    """A BeamDrafter whose second beam is the target's own greedy continuation (so drafts are
    accepted, in part when the room cuts them), the first a wrong one."""

    def __init__(self, expected: list[int], context: list[int]) -> None:
        self.expected, self.context = expected, context
        self.at = 0

    async def propose_beams(self, session_id, hidden, last_token, width, depth) -> TreeDraft:
        right = tuple(self.expected[self.at : self.at + depth])
        wrong = tuple((t + 1) % 50 for t in right)
        tree = beams_to_tree([wrong, right]) if right else Tree((), ())
        return TreeDraft(tree, (), depth, CallCost(0.0, 0.0))


DRAFTERS = [
    "untrained head",
    "untrained head with LM-head groups",
    "untrained parallel head",
    "beams holding the continuation",
]


@pytest.mark.parametrize("head_only", [False, True], ids=["beside lookup", "head only"])
@pytest.mark.parametrize("drafter", DRAFTERS)
def test_greedy_head_strategies_equal_plain_decoding(
    tiny_pair, tiny_head, tiny_grouped_head, tiny_parallel_head, drafter, head_only
) -> None:
    target = load_torch(tiny_pair.target_dir, dtype="int8", device="cpu", max_sessions=4)
    core = VerifierCore(target)
    context = [11, 12, 13, 14, 15, 11, 12]
    expected, _ = asyncio.run(decode(Backends(core), "ar", context, 30, GREEDY, session="ar"))
    heads = {"untrained head": tiny_head[1], "untrained head with LM-head groups": tiny_grouped_head,
             "untrained parallel head": tiny_parallel_head}  # fmt: skip
    beams = heads.get(drafter) or ContinuationBeams(expected, context)
    round_ = parallel_round if drafter == "untrained parallel head" else redrafter_round
    backends = Backends(core, head=beams)
    carry, out, accepted, step = Carry(), [], 0, 0
    while len(out) < 30:
        if isinstance(beams, ContinuationBeams):
            beams.at = len(out)
        r = RoundInput("rd", context + out, GREEDY, 0, step, 4, max_draft=30 - len(out) - 1, carry=carry,
                       head_only=head_only)  # fmt: skip
        result = asyncio.run(round_(backends, r))
        assert len(result.tokens) == result.accepted + 1 and carry.length == len(context + out) + len(result.tokens)
        out += result.tokens
        accepted += result.accepted
        step += 1
    assert out == expected
    if isinstance(beams, ContinuationBeams):
        assert accepted >= 20  # most tokens came from accepted drafts


class RecordedBeams:
    """A BeamDrafter that drafts `depth` copies of one token and records the depths asked."""

    def __init__(self, token: int) -> None:
        self.token, self.depths = token, []

    async def propose_beams(self, session_id, hidden, last_token, width, depth) -> TreeDraft:
        self.depths.append(depth)
        return TreeDraft(Tree.chain([self.token] * depth), (), depth, CallCost(0.0, 0.0))


@pytest.mark.parametrize(
    ("context", "head_only", "head_depth", "lookup_path"),
    [
        # 3 4 recurs: lookup drafts what followed it (5 6 3 4 5 6), and the head one token beside it
        ([3, 4, 5, 6, 3, 4], False, HEAD_DEPTH_BESIDE_MATCH, (5, 6, 3, 4, 5, 6)),
        # the head alone, as asked
        ([3, 4, 5, 6, 3, 4], True, 6, ()),
        # nothing recurs: the head still drafts 3 (k sizes the lookup path)
        ([3, 4, 5, 6, 7, 8], False, HEAD_DEPTH_BESIDE_LOOKUP, ()),
    ],
)
def test_the_context_continuation_drafts_beside_the_head(
    tiny_pair, context, head_only, head_depth, lookup_path
) -> None:
    core = VerifierCore(load_torch(tiny_pair.target_dir, dtype="float64", device="cpu", max_sessions=2))
    head = RecordedBeams(token=9)
    carry = Carry(torch.zeros(64), len(context))
    r = RoundInput("s", context, GREEDY, 0, 0, 6, carry=carry, head_only=head_only)
    result = asyncio.run(redrafter_round(Backends(core, head=head), r))
    assert head.depths == [head_depth]
    assert result.drafted == max(head_depth, len(lookup_path))
    # the verified tree held the head's chain and the lookup path: the argmax path decides
    expected, _ = asyncio.run(decode(Backends(core), "ar", context, len(result.tokens), GREEDY, session="ar"))
    assert list(result.tokens) == expected


def test_a_turns_first_round_drafts_the_context_continuation(tiny_pair) -> None:
    """Without the target's hidden state the head cannot draft; the lookup path still does."""
    core = VerifierCore(load_torch(tiny_pair.target_dir, dtype="float64", device="cpu", max_sessions=2))
    head = RecordedBeams(token=9)
    r = RoundInput("s", [3, 4, 5, 6, 3, 4], GREEDY, 0, 0, 4, carry=Carry())
    result = asyncio.run(redrafter_round(Backends(core, head=head), r))
    assert head.depths == [] and result.drafted == 4 and r.carry.hidden is not None
    alone = dataclasses.replace(r, head_only=True, carry=Carry())
    plain = asyncio.run(redrafter_round(Backends(core, head=head), alone))
    assert plain.drafted == 0 and len(plain.tokens) == 1


def test_redrafter_without_a_head_says_what_to_configure(tiny_pair) -> None:
    core = VerifierCore(load_torch(tiny_pair.target_dir, dtype="float64", device="cpu", max_sessions=1))
    r = RoundInput("s", [3, 4, 5], GREEDY, 0, 0, 3, carry=Carry(torch.zeros(64), 3))
    with pytest.raises(NotServable, match="SPECD_HEAD"):
        asyncio.run(redrafter_round(Backends(core), r))


# ---------------------------------------------------------------- sampling, on tables

V = 5
CONTEXT = [0, 1, 2]
SAMPLED = SamplingParams(temperature=1.0)


class HiddenTable(TableRuntime):
    """A table target that also answers last_hidden (zeros: the fake head ignores it)."""

    hidden_states = True

    def last_hidden(self, session_id: str) -> torch.Tensor:
        return torch.zeros(len(self.table), 4)


class FixedBeams:
    async def propose_beams(self, session_id, hidden, last_token, width, depth) -> TreeDraft:
        return TreeDraft(beams_to_tree([(1, 2), (1, 0), (3, 3)]), (), 2, CallCost(0.0, 0.0))


@pytest.mark.parametrize("context", [CONTEXT, [0, 1, 2, 0, 1]], ids=["no repeat", "lookup path beside"])
@pytest.mark.parametrize("round_", [redrafter_round, parallel_round], ids=["redrafter", "parallel"])
def test_sampled_head_strategies_are_distributed_as_p(round_, context) -> None:
    """The first two tokens of rounds that verify a fixed beam tree (and, where the context
    repeats, the lookup path 2 0 beside it), against p_1 x p_2."""
    g = torch.Generator().manual_seed(4)
    table = torch.randn(8, V, generator=g, dtype=torch.float64) * 1.5
    backends = Backends(VerifierCore(HiddenTable(table)), head=FixedBeams())
    n = 1500

    async def runs() -> Counter:
        counts: Counter = Counter()
        for seed in range(n):
            out: list[int] = []
            carry = Carry(torch.zeros(4), len(context))
            while len(out) < 2:
                carry.length = len(context) + len(out)  # the fake's hidden state holds for any context
                r = RoundInput("s", context + out, SAMPLED, seed, len(out), 2, carry=carry)
                out += (await round_(backends, r)).tokens
            counts[tuple(out[:2])] += 1
        return counts

    p = target_probs(table[len(context) - 1 :], SAMPLED)
    expected = {cell: float(p[0, cell[0]] * p[1, cell[1]]) for cell in itertools.product(range(V), repeat=2)}
    assert chi_square_pvalue(asyncio.run(runs()), expected, n) > PASS


def test_tables_quantized_in_blocks_equal_the_whole() -> None:
    from services.int8 import quantize_rows

    w = torch.randn(1000, 16, generator=torch.Generator().manual_seed(0))
    q, scale = quantize_rows(w, block=300)  # blocks of 300, 300, 300, 100
    q_all, scale_all = quantize_rows(w, block=1000)
    assert torch.equal(q, q_all) and torch.equal(scale, scale_all)
