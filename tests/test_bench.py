"""`specd bench`: the pure pieces (aggregation, speedup and overhead math, the lossless
check's verdicts, table rendering, prompt loading) on hand-made data, then the whole
`--quick` path on tiny models through real service processes and a real Redis."""

from __future__ import annotations

import dataclasses
import gzip
import json
from dataclasses import fields

import pytest

from specd.bench import metrics, report
from specd.bench.metrics import Check, RunRecord, classify, first_divergence, overhead_percent, speedup, summarize
from specd.bench.prompts import (
    PromptError,
    load_prompts,
    read_gsm8k,
    read_humaneval,
    read_mtbench,
    read_prompt_file,
    select,
)


def record(prompt_id: str, system: str, tokens: int, wall: float, **extra) -> RunRecord:
    path = metrics.PEER if system.startswith("hf") else metrics.IN_PROCESS if "@" in system else metrics.SERVICES
    return RunRecord(
        prompt_id=prompt_id, category=extra.pop("category", "code"), system=system, path=path,
        strategy=system.split("@")[0], prompt_tokens=10, new_tokens=tokens, wall_seconds=wall,
        token_ids=tuple(range(tokens)), **extra,
    )  # fmt: skip


# -- the lossless check ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([1, 2, 3], [1, 2, 3], None),  # equal
        ([1, 2, 3], [1, 9, 3], 1),  # early mismatch
        ([1, 2], [1, 2, 3], 2),  # one stopped early: they part where it ended
        ([], [], None),  # both empty
        ([5], [], 0),
    ],
)
def test_first_divergence(a, b, expected):
    assert first_divergence(a, b) == expected


@pytest.mark.parametrize(
    ("position", "gap", "status", "flagged"),
    [
        (None, None, "match", False),
        (3, 5e-4, "near-tie", True),  # allowed, but shown
        (3, 0.5, "diverged", True),  # a lossless bug
        (3, None, "unverified", True),  # no target to measure the gap with
    ],
)
def test_classify_applies_the_near_tie_rule(position, gap, status, flagged):
    check = classify("p", "sd", position, gap)
    assert (check.status, check.flagged, check.position) == (status, flagged, position)


# -- aggregation ----------------------------------------------------------------------------------


def test_speedup_is_a_throughput_ratio_on_common_prompts():
    ar = [record("a", "ar", 100, 40.0), record("b", "ar", 100, 40.0)]
    sd = [record("a", "sd", 100, 25.0)]  # only prompt a: b must not count for ar either
    assert speedup(sd, ar) == pytest.approx(1.6)  # the module docstring's example
    assert speedup([record("z", "sd", 10, 1.0)], ar) is None


def test_overhead_is_the_share_of_time_per_token_saved_in_process():
    services = [record("a", "sd", 100, 40.0)]  # 0.40 s/token
    local = [record("a", "sd@local", 100, 36.0), record("b", "sd@local", 100, 1.0)]  # b: not in services
    assert overhead_percent(services, local) == pytest.approx(10.0)


def test_summarize_sums_before_dividing():
    ar = [record("a", "ar", 8, 4.0), record("b", "ar", 4, 2.0)]
    sd = [
        record("a", "sd", 8, 2.0, target_forwards=3, drafted=12, accepted=5, acceptance_by_position=(1.0, 0.5, 0.25, 0.0),
               draft_seconds=0.6, verify_seconds=0.9, network_seconds=0.3, redis_seconds=0.15, bytes_sent=300, bytes_received=60),
        record("b", "sd", 4, 1.0, target_forwards=2, drafted=8, accepted=2, acceptance_by_position=(0.5, 0.5, 0.0, 0.0),
               draft_seconds=0.4, verify_seconds=0.1, network_seconds=0.2, redis_seconds=0.05, bytes_sent=200, bytes_received=40),
    ]  # fmt: skip
    checks = [
        Check("a", "sd", "match"),
        Check("b", "sd", "near-tie", 2, 1e-4),
        Check("b", "ar@local", "diverged", 1, 2.0),
    ]
    s = summarize(sd, ar, checks, "all")
    assert (s.prompts, s.new_tokens, s.wall_seconds) == (2, 12, 3.0)
    assert s.tokens_per_second == pytest.approx(4.0)
    assert s.speedup == pytest.approx(2.0)  # 12 tokens in 3 s vs 12 in 6 s
    assert s.mean_accepted_length == pytest.approx(1 + 7 / 5)
    assert s.acceptance_rate == pytest.approx(7 / 20)
    assert s.forwards_per_token == pytest.approx(5 / 12)
    assert s.rounds == 5
    assert s.draft_ms_per_round == pytest.approx(200.0)
    assert s.verify_ms_per_round == pytest.approx(200.0)
    assert s.network_ms_per_round == pytest.approx(100.0)
    assert s.redis_ms_per_round == pytest.approx(40.0)
    assert s.other_ms_per_round == pytest.approx(600.0 - 540.0)
    assert (s.bytes_sent_per_round, s.bytes_received_per_round) == (100.0, 20.0)
    # rates pooled with weights drafted / positions: 3 for a, 2 for b
    assert s.acceptance_by_position == pytest.approx((0.8, 0.5, 0.15, 0.0))
    assert (s.near_ties, s.divergences, s.flagged_prompts) == (1, 0, ("b",))  # ar@local's check is not sd's


def test_pooled_acceptance_uses_exact_counts_where_known():
    exact = record("a", "sd@local", 5, 1.0, acceptance_by_position=(1.0, 0.5), drafted_by_position=(4, 2), drafted=6)
    assert metrics.pooled_acceptance_by_position([exact]) == (1.0, 0.5)
    other = record("b", "sd@local", 5, 1.0, acceptance_by_position=(0.0,), drafted_by_position=(4,), drafted=4)
    assert metrics.pooled_acceptance_by_position([exact, other]) == (0.5, 0.5)


def test_peers_have_no_round_figures():
    ar = [record("a", "ar", 10, 2.0)]
    s = summarize([record("a", "hf-generate", 10, 1.0)], ar, [], "code")
    assert s.speedup == pytest.approx(2.0)
    assert s.mean_accepted_length is s.rounds is s.draft_ms_per_round is s.bytes_sent_per_round is None
    assert s.acceptance_rate is None and s.acceptance_by_position == ()


def test_summarize_all_and_overheads_cover_every_system_and_category():
    records = [
        record("a", "ar", 10, 2.0), record("a", "sd", 10, 1.0), record("a", "ar@local", 10, 1.5),
        record("b", "ar", 10, 2.0, category="chat"), record("b", "sd", 10, 1.6, category="chat"),
    ]  # fmt: skip
    got = {(s.system, s.category) for s in metrics.summarize_all(records, [])}
    assert got == {("ar", "code"), ("ar", "chat"), ("ar", "all"), ("sd", "code"), ("sd", "chat"), ("sd", "all"),
                   ("ar@local", "code"), ("ar@local", "all")}  # fmt: skip
    [code, everything] = metrics.overheads(records)
    assert (code.strategy, code.category, code.prompts) == ("ar", "code", 1)
    assert code.overhead_percent == pytest.approx(25.0)  # 0.2 s/token vs 0.15
    assert everything.category == "all" and everything.prompts == 1  # b never ran in-process


# -- rendering -----------------------------------------------------------------------------------


def test_tables_show_the_figures_and_the_flags():
    ar = [record("a", "ar", 100, 40.0, target_forwards=100)]
    sd = [
        record(
            "a",
            "sd",
            100,
            25.0,
            target_forwards=40,
            drafted=160,
            accepted=60,
            acceptance_by_position=(0.8, 0.5, 0.3, 0.1),
        )
    ]
    checks = [Check("a", "sd", "diverged", 7, 0.25)]
    summaries = [summarize(ar, ar, checks, "code"), summarize(sd, ar, checks, "code")]
    table = report.summary_table(summaries)
    lines = table.splitlines()
    assert lines[0].startswith("| category | system |") and set(lines[1]) == {"|", "-"}
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|") == lines[3].count("|")
    sd_row = next(line for line in lines if "| sd |" in line)
    assert "| 1.60x |" in sd_row and "| 2.50 |" in sd_row and "| 38% |" in sd_row and "DIVERGED" in sd_row
    assert "| – |" in next(line for line in lines if "| ar |" in line)  # ar drafts nothing
    assert "| code | sd | 80% | 50% | 30% | 10% |" in report.acceptance_table(summaries)
    text = report.render_markdown(summaries, [], checks, header=["# t"], greedy=True, skipped={"x": "why"}, errors=[])
    assert "a / sd: diverged at new token 7 (target top-2 logit gap 2.50e-01)" in text
    assert "skipped x: why" in text
    assert "language" not in text  # no session was identified by language


def test_acceptance_by_language_and_drafter_pool() -> None:
    """A stack with drafters pooled by language: each session's language and pool, pooled per system."""
    records = [
        record("a", "sd", 50, 5.0, target_forwards=20, drafted=80, accepted=30, language="fr", drafter_pool="fr"),
        record("b", "sd", 50, 5.0, target_forwards=10, drafted=40, accepted=40, language="fr", drafter_pool="fr"),
        record("c", "sd", 50, 5.0, target_forwards=25, drafted=100, accepted=25, language="de", drafter_pool=""),
        record("c", "ar", 50, 5.0, target_forwards=50, language="de"),  # drafted nothing: no row
    ]
    rows = metrics.by_language(records)
    assert [(r.system, r.language, r.drafter_pool, r.prompts) for r in rows] == [("sd", "de", "", 1), ("sd", "fr", "fr", 2)]
    fr = rows[1]
    assert fr.acceptance_rate == pytest.approx(70 / 120) and fr.mean_accepted_length == pytest.approx(1 + 70 / 30)
    table = report.language_table(rows)
    assert "| sd | de | default | 1 | 100 | 25% | 2.00 |" in table and "| sd | fr | fr | 2 | 120 | 58% | 3.33 |" in table
    text = report.render_markdown([], [], [], header=["# t"], greedy=False, skipped={}, errors=[], records=records)
    assert table in text


# -- prompts ---------------------------------------------------------------------------------------


def test_prompt_file_and_selection(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"prompt": "p1", "category": "code"}, {"prompt": "p2"}, {"prompt": "p3", "category": "code", "id": "x"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    prompts = read_prompt_file(path)
    assert [(p.id, p.category, p.text) for p in prompts] == [
        ("code/1", "code", "p1"), ("custom/2", "custom", "p2"), ("code/x", "code", "p3"),
    ]  # fmt: skip
    assert [p.id for p in select(prompts, None, 1)] == ["code/1", "custom/2"]
    assert [p.id for p in select(prompts, ["code"], None)] == ["code/1", "code/x"]
    with pytest.raises(PromptError, match="no prompts in categories"):
        select(prompts, ["gsm8k"], 1)
    assert [p.id for p in load_prompts(home=tmp_path, categories=["custom"], limit=5, prompt_file=path)] == ["custom/2"]


@pytest.mark.parametrize(
    ("text", "message"),
    [('{"prompt": ""}\n', ":1: each line"), ('{"category": "x"}\n', ":1: each line"), ('{"prompt": "a"}\n{oops\n', ":2: not JSON"), ("\n", "holds no prompts")],
)  # fmt: skip
def test_a_bad_prompt_file_names_the_line(tmp_path, text, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PromptError, match=message):
        read_prompt_file(path)


def test_mtbench_first_turns_round_robin_over_its_categories(tmp_path):
    path = tmp_path / "question.jsonl"
    rows = [{"question_id": i, "category": c, "turns": [f"{c} {i}", "second turn"]}
            for i, c in enumerate(["writing"] * 3 + ["math"] * 2 + ["coding"])]  # fmt: skip
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    prompts = read_mtbench(path)
    assert [p.text for p in prompts] == ["writing 0", "math 3", "coding 5", "writing 1", "math 4", "writing 2"]
    assert {p.category for p in prompts} == {"mt-bench"} and prompts[1].subcategory == "math"


def test_packaged_sets_read_from_the_installed_packages(tmp_path):
    humaneval = read_humaneval()
    assert len(humaneval) == 164 and humaneval[0].id == "humaneval/HumanEval/0"
    assert "def has_close_elements" in humaneval[0].text and humaneval[0].text.startswith("Complete the following")
    gsm8k = read_gsm8k()
    assert len(gsm8k) == 1319 and gsm8k[0].text.startswith("Janet")
    stub = tmp_path / "h.jsonl.gz"
    with gzip.open(stub, "wt", encoding="utf-8") as out:
        out.write(json.dumps({"task_id": "T/0", "prompt": "def f():\n"}) + "\n")
    assert read_humaneval(stub)[0].text == "Complete the following Python function.\n\n```python\ndef f():\n```"
    with pytest.raises(PromptError, match="unknown categories"):
        load_prompts(home=tmp_path, categories=["nope"], limit=1, prompt_file=None)


def test_in_process_prompts_are_the_first_of_each_category():
    from specd.bench.prompts import Prompt
    from specd.bench.runner import in_process_prompts

    prompts = [Prompt("a/1", "a", "x"), Prompt("a/2", "a", "x"), Prompt("b/1", "b", "x"), Prompt("a/3", "a", "x")]
    assert in_process_prompts(prompts, 2) == {"a/1", "a/2", "b/1"}
    assert in_process_prompts(prompts, 0) == set()


def test_quick_sets_small_defaults_and_explicit_options_win():
    from specd.bench_cli import sizes
    from specd.cli import build_parser

    parser = build_parser()
    assert sizes(parser.parse_args(["bench"])) == sizes(parser.parse_args(["bench", "--limit", "10"]))
    quick = sizes(parser.parse_args(["bench", "--quick", "--max-new-tokens", "8"]))
    assert (quick.limit, quick.max_new_tokens, quick.in_process_limit) == (1, 8, 1)


def test_run_bench_rotates_the_order_skips_what_cannot_serve_and_goes_on_after_errors():
    from orchestrator.generate import NotServable
    from specd.bench.prompts import Prompt
    from specd.bench.runner import WARMUP_TOKENS, BenchConfig, BenchError, Task, run_bench

    calls = []

    def task(system: str, path: str = metrics.SERVICES, warmup_error: str = "", fails_on: str = "") -> Task:
        def run(prompt: Prompt, max_new_tokens: int, seed: int) -> RunRecord:
            if max_new_tokens == WARMUP_TOKENS and warmup_error:
                raise NotServable(warmup_error)
            if max_new_tokens != WARMUP_TOKENS:
                calls.append((prompt.id, system, seed))
            if prompt.id == fails_on:
                raise BenchError("boom")
            return record(prompt.id, system, 3, 1.0, category=prompt.category)

        return Task(system, path, system.split("@")[0], run)

    tasks = [
        task("ar"),
        task("sd"),
        task("x", warmup_error="needs x"),
        task("sd@local", metrics.IN_PROCESS, fails_on="b/1"),
    ]
    prompts = [Prompt("a/1", "a", "t"), Prompt("a/2", "a", "t"), Prompt("b/1", "b", "t")]
    config = BenchConfig(("ar", "sd", "x"), 8, 4, 0.0, 0, 1.0, 100, 1, False, 60.0)
    run = run_bench(prompts, config, tasks, None, progress=False)
    assert run.skipped == {"x": "needs x"}
    assert calls == [
        ("a/1", "ar", 100), ("a/1", "sd", 100), ("a/1", "sd@local", 100),  # in-process: first of each category
        ("a/2", "sd", 101), ("a/2", "ar", 101),  # rotated by one
        ("b/1", "sd@local", 102), ("b/1", "ar", 102), ("b/1", "sd", 102),  # rotated by two
    ]  # fmt: skip
    assert run.errors == [metrics.RunError("b/1", "sd@local", "boom")]
    assert [(r.prompt_id, r.system) for r in run.records][-2:] == [("b/1", "ar"), ("b/1", "sd")]  # run order kept
    assert len(run.checks) == 4 and all(c.status == "match" for c in run.checks)


# -- the whole path -------------------------------------------------------------------------------


def test_quick_bench_on_tiny_models(tiny_pair, redis_url, tmp_path, monkeypatch, capsys, single_thread_torch):
    """The bench starts its own stack (real processes), runs every system, and writes every figure."""
    from specd.cli import main

    for name, value in {"SPECD_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(name, value)  # tiny models: threads only contend (tests/tiny.py)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "def add(a, b):\n    return", "category": "code"}) + "\n"
        + json.dumps({"prompt": "The quick brown fox", "category": "prose"}) + "\n"
        + json.dumps({"prompt": "It was the best of times", "category": "prose"}) + "\n",
        encoding="utf-8",
    )  # fmt: skip
    out = tmp_path / "results"
    code = main([
        "bench", "--quick", "--prompts", str(prompts), "--target", str(tiny_pair.target_dir),
        "--drafter", str(tiny_pair.drafter_dir), "--dtype", "float64", "--redis-url", redis_url,
        "--home", str(tmp_path / "home"), "--threads", "1", "--out", str(out), "--no-progress", "-k", "3",
    ])  # fmt: skip
    stdout, stderr = capsys.readouterr()
    assert code == 0, stdout + stderr

    doc = json.loads((out / "results.json").read_text())
    assert doc["config"]["max_new_tokens"] == 32 and doc["config"]["k"] == 3
    assert {p["id"] for p in doc["prompts"]} == {"code/1", "prose/2"}  # --quick: one per category
    assert set(doc["machine"]) == {f.name for f in fields(report.Machine)} and doc["machine"]["torch"]
    assert doc["models"]["target_dir"] == str(tiny_pair.target_dir)
    assert doc["errors"] == []

    # every registered strategy (others are added over time) and sd at a fixed k, through the
    # services and in-process
    from orchestrator.strategies import STRATEGIES

    ours = {*STRATEGIES, "sd:k4"}
    assert set(doc["config"]["strategies"]) == ours and doc["config"]["strategies"][0] == "ar"
    peers = {"hf-generate", "hf-assisted", "llama-greedy", "llama-lookup"}
    systems = {*ours, *(s + "@local" for s in ours), *peers} - set(doc["skipped"])
    assert {"ar", "sd", "ar@local", "sd@local"} <= systems
    summary_fields = {f.name for f in fields(metrics.Summary)}
    summaries = {(s["system"], s["category"]): s for s in doc["summaries"]}
    assert {system for system, _ in summaries} == systems
    for system in systems:
        for category in ("code", "prose", "all"):
            s = summaries[system, category]
            assert set(s) == summary_fields
            assert (
                s["prompts"] == (2 if category == "all" else 1)
                and s["new_tokens"] > 0
                and s["tokens_per_second"] > 0
                and s["speedup"] > 0
            )
            ours = system not in peers
            for name in (
                "mean_accepted_length",
                "forwards_per_token",
                "rounds",
                "verify_ms_per_round",
                "other_ms_per_round",
            ):
                assert (s[name] is not None) == ours, (system, name)
    for system in ("sd", "sd@local"):
        s = summaries[system, "all"]
        assert s["acceptance_rate"] is not None and len(s["acceptance_by_position"]) == 3
        assert s["mean_accepted_length"] > 1 and s["draft_ms_per_round"] > 0
    assert summaries["sd", "all"]["network_ms_per_round"] > 0 and summaries["sd", "all"]["redis_ms_per_round"] > 0
    assert summaries["sd", "all"]["bytes_sent_per_round"] > 0
    local = summaries["sd@local", "all"]  # no gRPC, and a dict for a session store
    assert local["bytes_sent_per_round"] == 0 and local["network_ms_per_round"] == 0
    # the dict's commits are timed too, and cost less than Redis' (not a fixed bound: a loaded
    # machine stretches both)
    assert local["redis_ms_per_round"] < summaries["sd", "all"]["redis_ms_per_round"]
    assert {(o["strategy"], o["category"]) for o in doc["overheads"]} >= {("ar", "all"), ("sd", "all")}

    records = doc["records"]
    assert {r["system"] for r in records} == systems and len(records) == 2 * len(systems)
    assert set(records[0]) == {f.name for f in fields(RunRecord)}
    # greedy and float64: every system's tokens equal ar's, prompt by prompt; llama-cpp-python
    # runs the GGUF's weights on another runtime, another model: not checked against ar
    checked = systems - {"llama-greedy", "llama-lookup"}
    assert len(doc["checks"]) == 2 * (len(checked) - 1)
    assert all(c["status"] == "match" for c in doc["checks"]), doc["checks"]
    by_prompt = {}
    for r in records:
        if r["system"] in checked:
            by_prompt.setdefault(r["prompt_id"], set()).add(tuple(r["token_ids"]))
    assert all(len(outputs) == 1 for outputs in by_prompt.values())

    for name in ("speedup.png", "acceptance_by_position.png", "time_per_round.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| all | sd |" in stdout and "Distributed overhead" in stdout and "every output equals ar's" in stdout
    assert (out / "results.md").read_text().strip() == stdout.strip()


def test_quick_bench_with_a_drafter_of_another_vocabulary(
    tiny_pair, tiny_foreign, redis_url, tmp_path, monkeypatch, capsys, single_thread_torch
):
    """A foreign drafter: slem, tli and slrs run (services, in-process, and transformers' own
    universal assisted generation as the peer); sd is skipped with the reason, not an error."""
    from specd.cli import main

    for name, value in {"SPECD_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(name, value)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "def add(a, b):\n    return", "category": "code"}) + "\n", encoding="utf-8")
    out = tmp_path / "results"
    code = main([
        "bench", "--quick", "--prompts", str(prompts), "--target", str(tiny_pair.target_dir),
        "--drafter", str(tiny_foreign), "--dtype", "float64", "--redis-url", redis_url,
        "--home", str(tmp_path / "home"), "--threads", "1", "--out", str(out), "--no-progress",
        "--strategies", "ar,sd,slem,tli,slrs", "--max-new-tokens", "16",
    ])  # fmt: skip
    stdout, stderr = capsys.readouterr()
    assert code == 0, stdout + stderr
    doc = json.loads((out / "results.json").read_text())
    assert doc["errors"] == []
    assert {"sd", "sd@local"} <= set(doc["skipped"]) and "slem, tli or slrs" in doc["skipped"]["sd"]
    systems = {r["system"] for r in doc["records"]}
    assert {"ar", "slem", "tli", "slrs", "slem@local", "tli@local", "slrs@local", "hf-assisted"} <= systems
    assert all(c["status"] == "match" for c in doc["checks"]), doc["checks"]


# -- systems, the delay proxy, the network table ---------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("sd", ("sd", None, False)),
        ("sd:k4", ("sd", 4, False)),
        ("cascade:k12", ("cascade", 12, False)),
        ("redrafter:head", ("redrafter", None, True)),
        ("parallel:k3:head", ("parallel", 3, True)),
        ("redrafter:head:k2", ("redrafter", 2, True)),
    ],
)
def test_a_system_names_a_strategy_and_optionally_a_fixed_k_and_the_head_alone(name, expected):
    from specd.bench.runner import parse_system

    assert parse_system(name) == expected


@pytest.mark.parametrize("name", ["sd:4", "sd:k0", "sd:kx", "sd:depth3", "sd:k4:k5", "redrafter:head:head"])
def test_a_bad_system_name_says_how_to_write_one(name):
    from specd.bench.runner import BenchError, parse_system

    with pytest.raises(BenchError, match="STRATEGY\\[:kN\\]"):
        parse_system(name)


def test_the_delay_proxy_delays_each_direction_by_half_the_rtt_and_overlaps_calls():
    """An echo server behind the proxy: one exchange takes the RTT; two sent back to back come
    back together, one RTT later (a delay line, not one call at a time); bytes unchanged."""
    import asyncio
    import time

    from specd.bench.netem import DelayProxy

    async def echo(reader, writer):
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def exchange(proxy: DelayProxy, rtt_ms: float, messages: list[bytes]) -> tuple[float, bytes]:
        proxy.set_rtt_ms(rtt_ms)
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        started = time.perf_counter()
        for m in messages:
            writer.write(m)
        await writer.drain()
        want = sum(map(len, messages))
        got = b""
        while len(got) < want:
            got += await reader.read(1 << 16)
        elapsed = time.perf_counter() - started
        writer.close()
        return elapsed, got

    async def run():
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        proxy = DelayProxy(f"127.0.0.1:{server.sockets[0].getsockname()[1]}")
        await proxy.start()
        try:
            fast = await exchange(proxy, 0, [b"ping"])
            slow = await exchange(proxy, 80, [b"ping"])
            both = await exchange(proxy, 80, [b"a" * 100, b"b" * 70_000])
        finally:
            await proxy.stop()
            server.close()
        return fast, slow, both

    fast, slow, both = asyncio.run(run())
    assert fast[1] == slow[1] == b"ping" and both[1] == b"a" * 100 + b"b" * 70_000
    assert fast[0] < 0.03
    assert 0.08 <= slow[0] < 0.2
    assert 0.08 <= both[0] < 0.2  # not 2 x 80 ms


def test_the_network_table_shows_speed_and_the_round_trips_share():
    """Each system's speed at each round trip and its change from 0 ms, the round trips a round
    waited for and their share of the wall time at that RTT (trips x RTT / wall)."""
    rows = []
    for system, rtt, wall in [("sd", 0, 1.0), ("sd", 10, 2.0), ("sd-pipe", 0, 0.8), ("sd-pipe", 10, 1.0)]:
        name = system if not rtt else f"{system}@rtt{rtt}ms"
        extra = dict(target_forwards=10, rtt_ms=rtt, round_trips=20)  # a draft and a verify a round
        if system == "sd-pipe":  # half its rounds' verifies sent before the round: 5 of 10 rounds wait for none
            extra |= dict(speculative_drafts=10, speculative_ready=4, round_trips=10)
        rows.append(dataclasses.replace(record("p1", name, 10, wall, **extra), path=metrics.SERVICES, strategy=system))
    summaries = metrics.summarize_all(rows, [])
    table = report.rtt_table(summaries, [0.0, 10.0])
    assert "| sd | 10.00 tok/s, 2.00 round trips a round | 5.00 tok/s (-50%), 2.00 round trips a round = network 10.0% |" in table
    assert ("| sd-pipe | 12.50 tok/s, 1.00 round trips a round, ready 40% "
            "| 10.00 tok/s (-20%), 1.00 round trips a round = network 10.0%, ready 40% |") in table  # fmt: skip
    assert "| sd-pipe / sd | 1.25x | 2.00x |" in table
    assert "| sd-pipe / sd: network share | – | 1.00x |" in table
    assert report.rtt_table(summaries, [0.0]) == ""
    # Without the counts (an older results.json), the speeds alone.
    bare = metrics.summarize_all([dataclasses.replace(r, round_trips=None) for r in rows], [])
    assert "| sd | 10.00 tok/s | 5.00 tok/s (-50%) |" in report.rtt_table(bare, [0.0, 10.0])


def test_a_pinned_bench_behind_delay_proxies(tiny_pair, redis_url, tmp_path, monkeypatch, capsys):
    """--pin --rtt-ms on tiny models: every system at every round trip, greedy outputs equal
    to ar's, the network table printed, and the added round trip measured in the runs."""
    from specd.cli import main

    for name, value in {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(name, value)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "def add(a, b):\n    return", "category": "code"}) + "\n", encoding="utf-8")
    out = tmp_path / "results"
    code = main([
        "bench", "--prompts", str(prompts), "--target", str(tiny_pair.target_dir), "--drafter",
        str(tiny_pair.drafter_dir), "--dtype", "float64", "--redis-url", redis_url, "--home", str(tmp_path / "home"),
        "--out", str(out), "--no-progress", "--strategies", "sd,sd-pipe,sd:k3", "--max-new-tokens", "16",
        "--in-process-limit", "0", "--no-peers", "--pin", "--rtt-ms", "0,20",
    ])  # fmt: skip
    stdout, stderr = capsys.readouterr()
    assert code == 0, stdout + stderr
    doc = json.loads((out / "results.json").read_text())
    assert doc["errors"] == [] and doc["skipped"] == {}
    records = {r["system"]: r for r in doc["records"]}
    for system in ("ar", "sd", "sd-pipe", "sd:k3"):
        assert records[system]["rtt_ms"] == 0 and records[f"{system}@rtt20ms"]["rtt_ms"] == 20
        # Every round calls the verifier through its proxy: at least one round trip each.
        slow = records[f"{system}@rtt20ms"]
        assert slow["wall_seconds"] >= slow["target_forwards"] * 0.02
    assert records["sd-pipe"]["speculative_drafts"] > 0
    assert all(c["status"] == "match" for c in doc["checks"]) and len(doc["checks"]) == 7
    assert "Against the network's round trip" in stdout and "| sd-pipe / sd |" in stdout
    assert doc["config"]["pin"] and doc["config"]["rtts_ms"] == [0, 20] and "pinned to a core each" in stdout


def test_a_concurrency_bench_on_tiny_models(tiny_pair, redis_url, tmp_path, monkeypatch, capsys):
    """--concurrency 1,3: every strategy at each level through the real stack, no errors,
    the table with each level's ratio to one session and to ar, the JSON and the plot."""
    from specd.cli import main

    for name, value in {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(name, value)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"def f{i}(a):\n    return", "category": "code"}) + "\n"
                               for i in range(3)), encoding="utf-8")  # fmt: skip
    out = tmp_path / "results"
    code = main([
        "bench", "--prompts", str(prompts), "--target", str(tiny_pair.target_dir), "--drafter",
        str(tiny_pair.drafter_dir), "--dtype", "int8", "--redis-url", redis_url, "--home", str(tmp_path / "home"),
        "--out", str(out), "--no-progress", "--strategies", "sd:k3", "--max-new-tokens", "12", "--quick",
        "--concurrency", "1,3",
    ])  # fmt: skip
    stdout, stderr = capsys.readouterr()
    assert code == 0, stdout + stderr
    levels = json.loads((out / "concurrency.json").read_text())["levels"]
    assert [(lv["strategy"], lv["concurrency"]) for lv in levels] == [("ar", 1), ("sd:k3", 1), ("ar", 3), ("sd:k3", 3)]
    assert all(lv["errors"] == 0 and lv["requests"] == lv["concurrency"] and lv["tokens"] > 0 for lv in levels)
    assert "| ar | 3 |" in stdout and "x one session" in stdout
    assert (out / "concurrency.png").stat().st_size > 0 and (out / "concurrency.md").is_file()


@pytest.mark.parametrize("value", ["0,4", "1,x"])
def test_a_bad_concurrency_list_is_a_usage_error(value, capsys):
    from specd.cli import main

    assert main(["bench", "--concurrency", value]) == 2
    assert "--concurrency" in capsys.readouterr().err


def test_a_bench_serves_one_trained_head_a_run(capsys):
    from specd.cli import main

    assert main(["bench", "--strategies", "ar,redrafter,parallel:k3"]) == 2
    assert "names redrafter and parallel: a run serves one trained head" in capsys.readouterr().err


@pytest.mark.parametrize(
    "value, words",
    [("fr=h-fr", "give the default pool too"), ("h,fr=a,fr=b", "one head per language"), ("h,FR=a", "language code")],
)
def test_a_bad_head_list_is_a_usage_error(value, words, capsys):
    from specd.cli import main

    assert main(["bench", "--strategies", "ar,redrafter", "--head", value]) == 2
    assert words in capsys.readouterr().err


def test_a_head_for_each_language_is_a_process_and_a_pool_of_its_own(tmp_path):
    from specd.stack import StackSpec, parse_heads

    head, languages = parse_heads("h, fr=h-fr ,de=/heads/h-de")
    assert (head, languages) == ("h", {"fr": "h-fr", "de": "/heads/h-de"})
    spec = StackSpec(home=tmp_path, target="t", drafter="d", head=head, head_port=7,
                     language_heads={"fr": ("h-fr", 8), "de": ("/heads/h-de", 9)})  # fmt: skip
    assert [s for s in spec.model_services() if s[0].startswith("head")] == [
        ("head", "drafter_svc", "h", 7, "torch"), ("head-fr", "drafter_svc", "h-fr", 8, "torch"),
        ("head-de", "drafter_svc", "/heads/h-de", 9, "torch"),
    ]  # fmt: skip
    assert spec.pool("head") == "127.0.0.1:7,fr=127.0.0.1:8,de=127.0.0.1:9"  # SPECD_HEAD, as the orchestrator reads it
    assert spec.pool("drafter") == "127.0.0.1:50052"


def test_a_head_named_as_under_home_is_served_from_there(tmp_path):
    from services.models import ModelNotFound
    from specd.bench_cli import _head_folder

    (tmp_path / "heads" / "h-fr").mkdir(parents=True)
    (tmp_path / "heads" / "h-fr" / "redrafter.json").write_text("{}")
    # the bench's stack has a home of its own (HOME/bench): a name must reach it as a folder
    assert _head_folder("h-fr", tmp_path) == str(tmp_path / "heads" / "h-fr")
    assert _head_folder(str(tmp_path / "heads" / "h-fr"), tmp_path) == str(tmp_path / "heads" / "h-fr")
    assert _head_folder("", tmp_path) == ""
    with pytest.raises(ModelNotFound, match="'missing' is neither a model folder"):
        _head_folder("missing", tmp_path)  # said before any process starts
