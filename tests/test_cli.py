"""The command line: options become the right GenerateRequest; help covers every command."""

from __future__ import annotations

import pytest

from services.pb import specd_pb2 as pb
from specd.cli import build_parser, build_request, format_stats


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


def test_a_prompt_is_sent_as_a_chat_message_with_only_the_options_given():
    request = build_request(parse("generate", "hello", "--max-new-tokens", "7", "--seed", "3", "-k", "5"))
    assert request.WhichOneof("input") == "chat"
    assert [(m.role, m.content) for m in request.chat.messages] == [("user", "hello")]
    assert request.max_new_tokens == 7 and request.seed == 3 and request.options.k == 5
    # Unset options stay unset, so the server's (or the session's) values apply.
    assert not request.HasField("temperature") and not request.HasField("top_p")


def test_raw_prompt_system_message_stops_and_sampling():
    raw = build_request(parse("generate", "def f(", "--raw", "--temperature", "0.7", "--top-p", "0.9", "--stop", "\n\n"))
    assert raw.prompt == "def f(" and raw.temperature == pytest.approx(0.7) and list(raw.stop) == ["\n\n"]
    chat = build_request(parse("generate", "hi", "--system", "be brief", "--session", "abc", "--strategy", "ar"))
    assert [m.role for m in chat.chat.messages] == ["system", "user"]
    assert chat.session_id == "abc" and chat.strategy == "ar"


def test_the_stats_line_shows_rounds_round_trips_and_pipelining():
    stats = pb.GenerationStats(
        strategy="sd-pipe", new_tokens=40, wall_seconds=4.0, tokens_per_second=10.0, target_forwards=10,
        round_trips=13, mean_accepted_length=4.0, acceptance_rate=0.75, speculative_drafts=9, speculative_ready=2,
        speculative_verified=6, speculative_plain=3, speculative_continued=4, finish_reason="length", session_id="abc",
    )  # fmt: skip
    line = format_stats(stats)
    assert line.startswith("[sd-pipe] 40 tokens in 4.00s = 10.00 tok/s | target forwards 10 | round trips 13 | ")
    assert "next drafts ready 2/10 | verified ahead 6/10 | plain steps sent ahead 3 | drafted going on 4/10 | " in line
    assert line.endswith("| finish length | session abc")
    assert "failovers" not in format_stats(pb.GenerationStats(strategy="ar"))


@pytest.mark.parametrize("command", ["up", "down", "generate", "demo", "models"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(command, "--help")
    assert exit_.value.code == 0
    assert "usage: specd " + command in capsys.readouterr().out


def test_a_dash_reads_the_prompt_from_stdin():
    import io

    request = build_request(parse("generate", "-", "--raw"), stdin=io.StringIO("def main():\n"))
    assert request.prompt == "def main():\n"


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse("--version")
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("specd ")


def test_the_command_line_starts_without_torch():
    """`specd --help` and every parser must not pay for importing torch (seconds)."""
    import subprocess
    import sys

    code = "import sys; from specd.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
