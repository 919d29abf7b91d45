"""What 2 MB pages do for the torch runtime's passes (services/hugepages.py, SPECD_HUGE_PAGES).

    .venv/bin/python scripts/pages.py                      # the int8 target, 2 threads
    .venv/bin/python scripts/pages.py --threads 1 --model qwen2.5-coder-0.5b-instruct

Loads the model twice in one process: the first copy is moved to 2 MB pages as a service
does after loading, the second stays on 4 KB pages. Then passes over 1 and 5 new tokens
(after 200 of context) alternate between the copies, so that whatever else the machine does
hits both alike; prints each copy's median and best. Needs twice the model's memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONTEXT = 200


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kernel", default="auto", help="the int8 kernel: auto, onednn or fbgemm")
    parser.add_argument("--passes", type=int, default=16, help="passes of each length per copy")
    args = parser.parse_args()

    import torch

    from services.config import ModelServiceConfig, default_home
    from services.hugepages import parse_smaps
    from services.runtime import load_runtime

    def load(huge_pages: bool):
        config = ModelServiceConfig(
            model=args.model, listen="", home=default_home(), runtime="torch", dtype="int8", threads=args.threads,
            max_sessions=2, kv_tokens=4096, int8_kernel=args.kernel, huge_pages=huge_pages,
        )  # fmt: skip
        return load_runtime(config, "verifier")

    def in_huge_pages() -> float:
        return parse_smaps(Path("/proc/self/smaps_rollup").read_text())[1] / 2**30

    copies = {"2 MB pages": load(True)}
    huge = in_huge_pages()
    copies["4 KB pages"] = load(False)
    print(f"{args.model}, {args.threads} threads: {huge:.2f} GiB in 2 MB pages after the first copy, "
          f"{in_huge_pages():.2f} GiB after the second", flush=True)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    context = torch.randint(100, 20000, (CONTEXT,), generator=generator).tolist()
    seqs = {name: list(context) for name in copies}
    for name, runtime in copies.items():
        runtime.logits(name, context, 1)
    for rows in (1, 5):
        times: dict[str, list[float]] = {name: [] for name in copies}
        for i in range(args.passes * 2):
            order = list(copies.items()) if i % 2 else list(reversed(copies.items()))
            for name, runtime in order:
                seq = seqs[name]
                seq.append(int(torch.randint(100, 20000, (1,), generator=generator)))
                started = time.perf_counter()
                runtime.logits(name, seq + [7] * (rows - 1), rows)
                times[name].append(time.perf_counter() - started)
        for name, ts in times.items():
            print(f"{rows} token{'s' if rows > 1 else ''}, {name}: median {statistics.median(ts) * 1000:.1f} ms, "
                  f"best {min(ts) * 1000:.1f} ms", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
