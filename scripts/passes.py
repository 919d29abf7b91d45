"""What one forward pass costs on each runtime: the measurement behind SPECD_RUNTIME=auto.

    .venv/bin/python scripts/passes.py                      # the default target and drafter
    .venv/bin/python scripts/passes.py --threads 1 --runtimes llama,int8
    .venv/bin/python scripts/passes.py --runtimes int8-fbgemm,int8-onednn   # the int8 kernels

For each model and runtime: the pass over 1, 3, 5 and 8 new tokens after a context of 200
(best of --repeats, the lengths interleaved round by round so that machine noise hits them
alike), the ratio of the 5-token pass to the 1-token pass (a verifier's need: <= 1.3), and
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
# name: (SPECD_RUNTIME, SPECD_DTYPE, SPECD_INT8_KERNEL); int8: the kernel this CPU gets by default
RUNTIMES = {
    "llama": ("llama", "auto", "auto"), "int8": ("torch", "int8", "auto"), "fp32": ("torch", "float32", "auto"),
    "int8-onednn": ("torch", "int8", "onednn"), "int8-fbgemm": ("torch", "int8", "fbgemm"),
}  # fmt: skip


def measure(model: str, runtime: str, threads: int, repeats: int) -> dict:
    """In this process: load, warm up, time each pass length `repeats` times (best kept)."""
    import torch

    from services.config import ModelServiceConfig, default_home
    from services.runtime import load_runtime
    from services.server import rss_bytes

    name, dtype, kernel = RUNTIMES[runtime]
    config = ModelServiceConfig(
        model=model, listen="", home=default_home(), runtime=name, dtype=dtype, threads=threads, max_sessions=2,
        kv_tokens=4096, int8_kernel=kernel,
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
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "RUNTIME"), help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1], args.threads, args.repeats)))
        return 0
    rows = []
    for model in args.models.split(","):
        for runtime in args.runtimes.split(","):
            command = [sys.executable, __file__, "--one", model, runtime, "--threads", str(args.threads),
                       "--repeats", str(args.repeats)]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(f"{model} on {runtime} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append((model, runtime, json.loads(done.stdout.strip().splitlines()[-1])))
            print(f"measured {model} on {runtime}", file=sys.stderr)
    lengths = " | ".join(f"{n} token" + ("s" if n > 1 else "") for n in TOKENS)
    print(f"| model | runtime | {lengths} | 5 / 1 | resident memory |")
    print("|---|---|" + "---|" * (len(TOKENS) + 2))
    for model, runtime, r in rows:
        ms = r["ms"]
        cells = " | ".join(f"{ms[str(n)]:.0f} ms" for n in TOKENS)
        print(f"| {model} | {runtime} | {cells} | {ms['5'] / ms['1']:.2f} | {r['rss_gb']:.1f} GB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
