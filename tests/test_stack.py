"""`specd up --detach`, `specd generate`, `specd down` as a person runs them: real processes,
a redis-server that `specd up` starts itself, tiny models given as folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from procs import free_port, free_port_run

from specd.stack import read_state


def specd(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "specd.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_up_generate_down(tiny_pair, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "SPECD_THREADS")}
    home = str(tmp_path / "home")
    port = free_port_run(4)  # orchestrator, verifier, two drafters
    metrics = free_port_run(5)  # and the gateway
    redis_port, http_port = free_port(), free_port()
    up = specd(
        "up", "--detach", "--home", home, "--target", str(tiny_pair.target_dir), "--drafter", str(tiny_pair.drafter_dir),
        "--port", str(port), "--redis-port", str(redis_port), "--dtype", "float64", "--drafter-replicas", "2", "--threads", "1",
        "--http-listen", f"127.0.0.1:{http_port}", "--metrics-port", str(metrics), env=env,
    )  # fmt: skip
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"127.0.0.1:{port}" in up.stdout and "healthy" in up.stdout
        assert f"http://127.0.0.1:{http_port}/v1" in up.stdout
        names = {"redis", "verifier", "drafter", "drafter2", "orchestrator", "gateway"}
        assert {p.name for p in read_state(tmp_path / "home")} == names
        logs = {p.name: Path(p.log).read_text() for p in read_state(tmp_path / "home")}
        assert all(" 1 threads" in logs[name] for name in ("verifier", "drafter", "drafter2")), "--threads 1 not applied"

        out = specd("generate", "def f(", "--raw", "--max-new-tokens", "12", "--address", f"127.0.0.1:{port}", "--json", env=env)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        assert len(result["token_ids"]) == result["stats"]["new_tokens"] > 0
        assert isinstance(result["stats"]["bytes_sent"], int) and result["stats"]["bytes_sent"] > 0
        assert result["stats"]["strategy"] == "sd"

        shown = specd("generate", "def f(", "--raw", "--max-new-tokens", "12", "--address", f"127.0.0.1:{port}", env=env)
        assert shown.stdout == result["text"] + "\n"  # streamed text, statistics on stderr
        assert "tok/s" in shown.stderr and "τ" in shown.stderr

        listed = specd("status", "--home", home, "--json", env=env)
        assert listed.returncode == 0, listed.stdout + listed.stderr
        procs = {p["name"]: p for p in json.loads(listed.stdout)}
        assert set(procs) == names and all(p["healthy"] and p["rss_bytes"] > 0 for p in procs.values())
        assert procs["drafter2"]["address"] == f"127.0.0.1:{port + 3}"  # verifier port + 1, drafter + 2, + 3
        assert sum(procs[d]["calls"] for d in ("drafter", "drafter2")) > 0 and procs["orchestrator"]["calls"] is None
        order = ["orchestrator", "verifier", "drafter", "drafter2", "gateway"]
        assert [procs[n]["metrics"] for n in order] == [f"http://127.0.0.1:{metrics + i}/metrics" for i in range(5)]
        with urllib.request.urlopen(procs["orchestrator"]["metrics"], timeout=10) as reply:
            assert 'specd:request_success_total{finished_reason="length",strategy="sd"} 2.0' in reply.read().decode()
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/models", timeout=10) as reply:
            assert json.loads(reply.read())["data"][0]["id"] == tiny_pair.target_dir.name
        table = specd("status", "--home", home, env=env)
        assert table.returncode == 0 and "drafter2" in table.stdout and "healthy" in table.stdout
    finally:
        down = specd("down", "--home", home, env=env)
    assert down.returncode == 0 and "stopped orchestrator" in down.stdout
    assert read_state(tmp_path / "home") == []

    gone = specd("generate", "hi", "--address", f"127.0.0.1:{port}", "--timeout", "5", env=env)
    assert gone.returncode == 1 and "UNAVAILABLE" in gone.stderr and "specd up" in gone.stderr
