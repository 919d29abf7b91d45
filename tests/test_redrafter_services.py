"""Integration: redrafter through real processes - `specd train redrafter --quick` writes a
head for the tiny target, a drafter service hosts it, the verifier returns hidden states over
gRPC - with a real redis-server. Greedy output equals plain decoding (`ar`); seeded sampling
replays; a head meets only the strategy and the target it was made for; a head trained for
French (`--language fr`) drafts the French sessions where SPECD_HEAD pools heads by language.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from client import ROOT, ServiceStack, generate
from tiny import write_gsm_templates

from drafter_svc.head import load_head_drafter
from services.pb import specd_pb2 as pb
from services.pb import specd_pb2_grpc as pb_grpc
from services.redrafter import MANIFEST
from services.worker import Worker

PROMPTS = ["def add(a, b):\n    return a + b\n\ndef add(a, b):\n", "The quick brown fox"]
NEW = 24


def train(target: Path, home: Path, name: str, kind: str = "redrafter", *options: str) -> Path:
    """`specd train KIND --quick` as a user runs it; the head's folder."""
    command = [sys.executable, "-m", "specd.cli", "train", kind, "--target", str(target), "--quick", "--name",
               name, "--home", str(home), "--dtype", "float64", "--threads", "1", *options]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "held-out agreement" in done.stdout
    return home / "heads" / name


@pytest.fixture(scope="module")
def stack(tiny_pair, redis_server, tmp_path_factory):
    """orchestrator: the tiny drafter model (SPECD_DRAFTER) and a drafter hosting a head
    trained for the target (SPECD_HEAD); orchestrator2: the two swapped; orchestrator3: a
    head trained for another model (the tiny drafter) as SPECD_HEAD; orchestrator4: a
    parallel head trained for the target as SPECD_HEAD; orchestrator5: the target's head as
    the default pool of SPECD_HEAD, a head fine-tuned from it for French the `fr` pool."""
    root = tmp_path_factory.mktemp("redrafter")
    head = train(tiny_pair.target_dir, root / "home", "tiny")
    other = train(tiny_pair.drafter_dir, root / "home", "other")
    parallel = train(tiny_pair.target_dir, root / "home", "tiny-parallel", kind="parallel")
    write_gsm_templates(root / "home")
    french = train(tiny_pair.target_dir, root / "home", "tiny-fr", "redrafter", "--language", "fr", "--from", "tiny")

    def extra_env(stack: ServiceStack, name: str) -> dict[str, str]:
        models = {"drafter": str(head), "drafter2": str(tiny_pair.drafter_dir), "drafter3": str(other),
                  "drafter4": str(parallel), "drafter5": str(french)}  # fmt: skip
        if name in models:
            return {"SPECD_MODEL": models[name], "SPECD_RUNTIME": "torch"}
        if name == "orchestrator5":
            return {"SPECD_HEAD": f"{stack.address('drafter')},fr={stack.address('drafter5')}"}
        head_at, drafter_at = {"orchestrator": ("drafter", "drafter2"), "orchestrator2": ("drafter2", "drafter"),
                               "orchestrator3": ("drafter3", "drafter2"),
                               "orchestrator4": ("drafter4", "drafter2")}.get(name, (None, None))  # fmt: skip
        if head_at is None:
            return {}
        return {"SPECD_HEAD": stack.address(head_at), "SPECD_DRAFTER": stack.address(drafter_at)}

    s = ServiceStack(
        tiny_pair.target_dir, tiny_pair.drafter_dir, redis_server.url, root / "logs",
        services=("verifier", "drafter", "drafter2", "drafter3", "drafter4", "drafter5", "orchestrator",
                  "orchestrator2", "orchestrator3", "orchestrator4", "orchestrator5"),
        extra_env=extra_env,
    )  # fmt: skip
    s.up()
    yield s, head
    s.down()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_redrafter_equals_ar(stack, prompt):
    s, _ = stack
    address = s.address("orchestrator")
    expected = generate(address, prompt, strategy="ar", max_new_tokens=NEW).token_ids
    # adaptive, a fixed depth, and a fixed depth drafted by the head alone
    for k, head_only in ((0, False), (3, False), (3, True)):
        options = {"options": pb.StrategyOptions(k=k, head_only=head_only)}
        result = generate(address, prompt, strategy="redrafter", max_new_tokens=NEW, **options)
        assert result.token_ids == expected, (k, head_only)
    assert result.stats.drafted > 0  # the fixed depth drafted in every round after the first
    assert generate(address, prompt, strategy="sd", max_new_tokens=NEW).token_ids == expected  # one stack serves both


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_parallel_equals_ar(stack, prompt):
    s, _ = stack
    address = s.address("orchestrator4")
    expected = generate(address, prompt, strategy="ar", max_new_tokens=NEW).token_ids
    # adaptive, then a fixed depth (the head's own: --depth 4), beside lookup and alone
    for k, head_only in ((0, False), (3, False), (3, True)):
        options = {"options": pb.StrategyOptions(k=k, head_only=head_only)}
        result = generate(address, prompt, strategy="parallel", max_new_tokens=NEW, **options)
        assert result.token_ids == expected, (k, head_only)
    assert result.stats.drafted > 0


def test_sampled_redrafter_replays_with_its_seed(stack):
    s, _ = stack
    address = s.address("orchestrator")
    kwargs = dict(strategy="redrafter", max_new_tokens=NEW, temperature=1.2, options=pb.StrategyOptions(k=3))
    first = generate(address, PROMPTS[1], seed=5, **kwargs)
    assert generate(address, PROMPTS[1], seed=5, **kwargs).token_ids == first.token_ids
    assert generate(address, PROMPTS[1], seed=6, **kwargs).token_ids != first.token_ids


CASES = {
    "another strategy on the head": ("orchestrator2", "sd", "drafts for the strategy redrafter only"),
    "redrafter with a model as its head": ("orchestrator2", "redrafter", "not a trained head"),
    "a head for another target": ("orchestrator3", "redrafter", "train a head for it"),
    "parallel with a recurrent head": ("orchestrator", "parallel", "needs a parallel head"),
    "redrafter with a parallel head": ("orchestrator4", "redrafter", "needs a redrafter head"),
}


@pytest.mark.parametrize("orchestrator, strategy, words", CASES.values(), ids=CASES.keys())
def test_a_head_serves_only_its_strategy_and_target(stack, orchestrator, strategy, words):
    s, _ = stack
    with pytest.raises(grpc.RpcError) as err:
        generate(s.address(orchestrator), PROMPTS[0], strategy=strategy, max_new_tokens=4)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert words in err.value.details()


def test_a_head_whose_target_changed_is_refused_at_load(stack, tmp_path):
    _, head = stack
    # another SPECD_HOME (the bench's run folder) still finds the target where it was trained
    assert load_head_drafter(head, tmp_path / "elsewhere", max_draft=64, worker=Worker("test")).head is not None
    copy = tmp_path / "head"
    copy.mkdir()
    for f in head.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    manifest = (copy / MANIFEST).read_text()
    (copy / MANIFEST).write_text(manifest.replace('"weights": "', '"weights": "stale-'))
    with pytest.raises(ValueError, match="train it again"):
        load_head_drafter(copy, tmp_path, max_draft=64, worker=Worker("test"))


def test_a_french_session_drafts_on_the_head_trained_for_french(stack):
    s, _ = stack
    address = s.address("orchestrator5")
    french = "Résous ce problème : Marie a 7 pommes et en achète 9 de plus. Combien de pommes a-t-elle ?"
    english = "Solve this problem: Mary has 7 apples and buys 9 more. How many apples does she have?"
    for text, language, pool, drafter in ((french, "fr", "fr", "drafter5"), (english, "en", "", "drafter")):
        expected = generate(address, text, strategy="ar", max_new_tokens=NEW).token_ids
        result = generate(address, text, strategy="redrafter", max_new_tokens=NEW)
        assert result.token_ids == expected
        assert (result.stats.language, result.stats.drafter_pool) == (language, pool)
        assert s.address(drafter) in result.stats.replicas and result.stats.drafted > 0


def test_models_list_shows_the_trained_heads(stack):
    _, head = stack
    command = [sys.executable, "-m", "specd.cli", "models", "list", "--home", str(head.parent.parent)]
    listed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines() if line.strip()}
    assert {"HEAD", "tiny", "other", "tiny-parallel", "tiny-fr"} <= set(rows)
    assert " 30 " in rows["tiny"]  # --quick's steps, from the manifest
    assert " groups) " in rows["tiny"]  # the rows its LM-head groups compute a step
    assert rows["tiny"].split()[1] == "redrafter" and rows["tiny-parallel"].split()[1] == "parallel"
    assert rows["tiny-fr"].split()[1] == "redrafter/fr"  # a head for French prompts


def test_bad_beam_calls_get_a_status_that_says_what_to_fix(stack):
    s, _ = stack
    good = bytes(2 * 64)  # the tiny target's hidden size, float16
    cases = [
        (s.address("drafter"), dict(hidden=b"\x00" * 3), grpc.StatusCode.INVALID_ARGUMENT, "2 bytes each"),
        (s.address("drafter"), dict(hidden=bytes(8)), grpc.StatusCode.INVALID_ARGUMENT, "reads the target's 64"),
        (s.address("drafter"), dict(hidden=good, last_token=10**6), grpc.StatusCode.INVALID_ARGUMENT, "outside"),
        (s.address("drafter"), dict(hidden=good, width=0), grpc.StatusCode.INVALID_ARGUMENT, ">= 1"),
        (s.address("drafter2"), dict(hidden=good), grpc.StatusCode.FAILED_PRECONDITION, "no trained draft head"),
    ]
    for address, fields, code, words in cases:
        request = pb.ProposeBeamsRequest(**{"last_token": 1, "width": 2, "depth": 2, **fields})
        with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as err:
            pb_grpc.DrafterStub(channel).ProposeBeams(request, timeout=30)
        assert err.value.code() == code, fields
        assert words in err.value.details(), fields
    with grpc.insecure_channel(s.address("drafter")) as channel:
        reply = pb_grpc.DrafterStub(channel).ProposeBeams(
            pb.ProposeBeamsRequest(hidden=good, last_token=1, width=2, depth=3)
        )
    assert 3 <= len(reply.tree.tokens) <= 6 and not reply.tree.q  # two beams of three, merged; point masses
