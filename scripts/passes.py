"""What one forward pass costs on each runtime: the measurement behind SPECD_RUNTIME=auto.

    .venv/bin/python scripts/passes.py                      # the default target and drafter
    .venv/bin/python scripts/passes.py --threads 1 --runtimes llama,int8
    .venv/bin/python scripts/passes.py --runtimes int8-fbgemm,int8-onednn   # the int8 kernels
    .venv/bin/python scripts/passes.py --runtimes int8,int8-4k --rounds 3   # 2 MB pages or not

For each model and runtime: the pass over 1, 3, 5 and 8 new tokens after a context of 200
(best of --repeats, the lengths interleaved round by round so that machine noise hits them
alike; with --rounds, the runtimes measured in turn that many times and the best kept), the
ratio of the 5-token pass to the 1-token pass (a verifier's need: <= 1.3), and
the process's resident memory with the model loaded. Each runtime is measured in a process of
its own, one after another, so that one model's memory never counts towards another's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

TOKENS = (1, 3, 5, 8)
CONTEXT = 200
# name: SPECD_RUNTIME, SPECD_DTYPE, SPECD_INT8_KERNEL, SPECD_HUGE_PAGES; int8: the kernel this CPU
# gets by default; int8-4k: the same with 4 KB pages
RUNTIMES = {
    "llama": ("llama", "auto", "auto", True), "int8": ("torch", "int8", "auto", True),
    "fp32": ("torch", "float32", "auto", True), "int8-onednn": ("torch", "int8", "onednn", True),
    "int8-fbgemm": ("torch", "int8", "fbgemm", True), "int8-4k": ("torch", "int8", "auto", False),
}  # fmt: skip


def measure(model: str, runtime: str, threads: int, repeats: int) -> dict:
    """In this process: load, warm up, time each pass length `repeats` times (best kept)."""
    import torch

    from services.config import ModelServiceConfig, default_home
    from services.runtime import load_runtime
    from services.server import rss_bytes

    name, dtype, kernel, huge_pages = RUNTIMES[runtime]
    config = ModelServiceConfig(
        model=model, listen="", home=default_home(), runtime=name, dtype=dtype, threads=threads, max_sessions=2,
        kv_tokens=4096, int8_kernel=kernel, huge_pages=huge_pages,
    )  # fmt: skip
    rt = load_runtime(config, "verifier")
    generator = torch.Generator().manual_seed(0)
    context = torch.randint(100, 20000, (CONTEXT,), generator=generator).tolist()
    rt.logits("s", context, 1)
    for n in TOKENS:  # first passes of each length build kernels and buffers
        rt.logits("s", context + [5] * n, n)
    best = {n: float("inf") for n in TOKENS}
    for _ in range(repeats):
        for n in TOKENS:
            seq = context + torch.randint(100, 20000, (n,), generator=generator).tolist()
            started = time.perf_counter()
            rt.logits("s", seq, n)
            best[n] = min(best[n], time.perf_counter() - started)
    rss = rss_bytes()
    return {"ms": {n: round(best[n] * 1000, 1) for n in TOKENS}, "rss_gb": round(rss / 1e9, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="qwen2.5-coder-1.5b-instruct,qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--runtimes", default="llama,int8,fp32", help=f"comma-separated: {', '.join(RUNTIMES)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=1, help="measure every runtime this many times, in turn (best kept)")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "RUNTIME"), help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1], args.threads, args.repeats)))
        return 0
    rows: dict[tuple[str, str], dict] = {}
    for _ in range(args.rounds):
        for model in args.models.split(","):
            for runtime in args.runtimes.split(","):
                command = [sys.executable, __file__, "--one", model, runtime, "--threads", str(args.threads),
                           "--repeats", str(args.repeats)]  # fmt: skip
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    print(f"{model} on {runtime} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                    continue
                r = json.loads(done.stdout.strip().splitlines()[-1])
                seen = rows.setdefault((model, runtime), r)
                seen["ms"] = {n: min(seen["ms"][n], r["ms"][n]) for n in r["ms"]}
                print(f"measured {model} on {runtime}: {r['ms']}", file=sys.stderr)
    lengths = " | ".join(f"{n} token" + ("s" if n > 1 else "") for n in TOKENS)
    print(f"| model | runtime | {lengths} | 5 / 1 | resident memory |")
    print("|---|---|" + "---|" * (len(TOKENS) + 2))
    for (model, runtime), r in rows.items():
        ms = r["ms"]
        cells = " | ".join(f"{ms[str(n)]:.0f} ms" for n in TOKENS)
        print(f"| {model} | {runtime} | {cells} | {ms['5'] / ms['1']:.2f} | {r['rss_gb']:.1f} GB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
