"""Backing a loaded model's memory with 2 MB pages (Linux transparent huge pages).

A one-token pass on a CPU streams every weight from memory once. With 4 KB pages that is a
TLB miss every 4 KB, and the hardware prefetchers stop at each page boundary; with 2 MB pages
both go away. llama.cpp gets this for free: it maps its GGUF file, and the kernel's page cache
maps it in 2 MB folios where it can (measured: 408 of the 0.5B file's 474 MB PMD-mapped). The
torch runtime's weights are anonymous memory that the kernel backs with 4 KB pages unless
asked (transparent_hugepage = madvise, the usual default), so after loading, the service asks:
`madvise(MADV_HUGEPAGE)` on each large, resident, anonymous region of the process, then
`madvise(MADV_COLLAPSE)` (Linux 6.1+) to rebuild it in 2 MB pages at once.

Measured on the int8 1.5B target (scripts/pages.py: both page sizes in one process, passes
interleaved, medians, 2 threads): one-token pass 165 ms against 196 ms on 4 KB pages, five
tokens 177 against 209 (docs/runtimes.md).

Only regions at least `MIN_RESIDENT` resident are touched: collapsing a region makes all of
it resident, which must not grow a service's memory by its untouched reservations. Where
the kernel has no transparent huge pages (or they are off) this does nothing; where it has
no MADV_COLLAPSE the regions stay advised and the kernel's khugepaged collapses them in
the background. Page size never changes a result: the same bytes, mapped differently.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass
from pathlib import Path

HUGE = 1 << 21  # 2 MB, the x86-64 and arm64 (4 KB granule) PMD size
MIN_RESIDENT = 0.9  # resident fraction of a region for it to be collapsed
MIN_REGION = 2 * HUGE  # smaller regions hold at most one aligned 2 MB page: not worth a call
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@dataclass(frozen=True)
class Region:
    start: int
    end: int
    resident: int  # bytes

    @property
    def size(self) -> int:
        return self.end - self.start

    def aligned(self) -> tuple[int, int]:
        """The 2 MB-aligned span inside the region (empty when start >= end)."""
        return -(-self.start // HUGE) * HUGE, self.end // HUGE * HUGE


@dataclass(frozen=True)
class Report:
    mode: str  # the kernel's transparent_hugepage setting, "" where it has none
    regions: int  # regions advised
    advised: int  # bytes in them (2 MB-aligned)
    collapsed: int  # bytes MADV_COLLAPSE moved to 2 MB pages now (the rest: left to khugepaged)
    huge: int  # bytes of the process in 2 MB pages afterwards (AnonHugePages)
    seconds: float

    def describe(self) -> str:
        if self.mode in ("", "never"):
            return "huge pages: unavailable (transparent_hugepage " + (self.mode or "absent") + ")"
        gib = 2**30
        return (
            f"huge pages: {self.regions} regions advised ({self.advised / gib:.2f} GiB), "
            f"{self.collapsed / gib:.2f} GiB collapsed at once in {self.seconds:.1f}s (khugepaged takes the rest); "
            f"{self.huge / gib:.2f} GiB in 2 MB pages"
        )


def thp_mode(path: Path = THP_MODE) -> str:
    """The selected mode in the kernel's setting ("always [madvise] never" -> "madvise")."""
    try:
        text = path.read_text()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else ""


def parse_smaps(text: str) -> tuple[list[Region], int]:
    """The anonymous, writable, private regions of a /proc/PID/smaps text (the heap
    included), and the process's AnonHugePages in bytes."""
    regions: list[Region] = []
    huge = 0
    current: tuple[int, int] | None = None
    for line in text.splitlines():
        head, _, rest = line.partition(" ")
        if "-" in head and not head.endswith(":"):
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            name = fields[5] if len(fields) > 5 else ""
            anonymous = name in ("", "[heap]")
            current = (lo, hi) if anonymous and fields[1].startswith("rw") and fields[1][3] == "p" else None
        elif head == "Rss:" and current is not None:
            regions.append(Region(current[0], current[1], int(rest.split()[0]) * 1024))
        elif head == "AnonHugePages:":
            huge += int(rest.split()[0]) * 1024
    return regions, huge


def candidates(regions: list[Region]) -> list[Region]:
    """The regions worth backing with 2 MB pages: large and nearly all resident."""
    return [r for r in regions if r.size >= MIN_REGION and r.resident >= MIN_RESIDENT * r.size]


def use_huge_pages() -> Report:
    """Asks the kernel to back this process's large resident anonymous memory (a loaded
    model's weights) with 2 MB pages; see the module docstring. Never raises: page size is
    an optimisation, and a kernel without it serves the same results."""
    watch = time.perf_counter()
    mode = thp_mode()
    if mode in ("", "never"):
        return Report(mode, 0, 0, False, 0, 0.0)
    try:
        regions, _ = parse_smaps(Path("/proc/self/smaps").read_text())
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return Report("", 0, 0, False, 0, 0.0)
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    advised = collapsed = count = 0
    for region in candidates(regions):
        lo, hi = region.aligned()
        if hi <= lo or madvise(lo, hi - lo, MADV_HUGEPAGE) != 0:
            continue
        count += 1
        advised += hi - lo
        # Fails on a kernel before 6.1 (EINVAL), and for a region the kernel will not collapse
        # now (EAGAIN, ENOMEM): khugepaged collapses advised regions in the background.
        if madvise(lo, hi - lo, MADV_COLLAPSE) == 0:
            collapsed += hi - lo
    try:
        _, huge = parse_smaps(Path("/proc/self/smaps_rollup").read_text())
    except OSError:
        huge = 0
    return Report(mode, count, advised, collapsed, huge, time.perf_counter() - watch)
