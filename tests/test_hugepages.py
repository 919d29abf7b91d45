"""Backing loaded weights with 2 MB pages (services/hugepages.py): which regions are chosen,
and that the kernel really maps them so where it can."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from services.config import ConfigError, ModelServiceConfig
from services.hugepages import HUGE, Region, Report, candidates, parse_smaps, thp_mode

MB = 1 << 20

SMAPS = """\
55d0a0000000-55d0a0400000 rw-p 00000000 00:00 0                          [heap]
Size:               4096 kB
Rss:                4000 kB
AnonHugePages:         0 kB
7f0000000000-7f0001000000 rw-p 00000000 00:00 0 
Size:              16384 kB
Rss:               16384 kB
AnonHugePages:      4096 kB
7f0001000000-7f0002000000 r--p 00000000 08:01 1234                       /usr/lib/libtorch_cpu.so
Size:              16384 kB
Rss:               16384 kB
AnonHugePages:         0 kB
7f0002000000-7f0002800000 rw-s 00000000 00:01 99                         /dev/shm/x
Size:               8192 kB
Rss:                8192 kB
AnonHugePages:         0 kB
7f0003000000-7f0003800000 ---p 00000000 00:00 0 
Size:               8192 kB
Rss:                   0 kB
AnonHugePages:         0 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
Rss:                  64 kB
AnonHugePages:         0 kB
"""


def test_smaps_keeps_the_private_writable_anonymous_regions_and_sums_huge_pages():
    regions, huge = parse_smaps(SMAPS)
    assert regions == [
        Region(0x55D0A0000000, 0x55D0A0400000, 4000 * 1024),  # the heap
        Region(0x7F0000000000, 0x7F0001000000, 16 * MB),  # anonymous
    ]  # not the library, the shared mapping, the guard (---p) or the stack
    assert huge == 4 * MB


@pytest.mark.parametrize(
    ("size", "resident", "chosen"),
    [
        (16 * MB, 16 * MB, True),
        (16 * MB, int(0.95 * 16 * MB), True),
        (16 * MB, 8 * MB, False),  # half untouched: collapsing would make it all resident
        (3 * MB, 3 * MB, False),  # under two 2 MB pages
        (4 * MB, 4 * MB, True),
    ],
)
def test_only_large_nearly_resident_regions_are_candidates(size, resident, chosen):
    region = Region(0x7F0000000000, 0x7F0000000000 + size, resident)
    assert (candidates([region]) == [region]) is chosen


@pytest.mark.parametrize(
    ("start", "end", "aligned"),
    [
        (0, 4 * MB, (0, 4 * MB)),
        (1 * MB, 7 * MB, (2 * MB, 6 * MB)),
        (HUGE + 4096, 2 * HUGE + 4096, (2 * HUGE, 2 * HUGE)),  # no whole 2 MB page inside
    ],
)
def test_regions_are_advised_on_whole_2mb_pages(start, end, aligned):
    assert Region(start, end, end - start).aligned() == aligned


@pytest.mark.parametrize(
    ("text", "mode"),
    [
        ("always [madvise] never\n", "madvise"),
        ("[always] madvise never\n", "always"),
        ("always madvise [never]\n", "never"),
    ],
)
def test_the_kernel_mode_is_the_bracketed_one(tmp_path: Path, text, mode):
    setting = tmp_path / "enabled"
    setting.write_text(text)
    assert thp_mode(setting) == mode


def test_a_kernel_without_the_setting_reads_as_unavailable(tmp_path: Path):
    assert thp_mode(tmp_path / "absent") == ""
    assert "unavailable" in Report("", 0, 0, 0, 0, 0.0).describe()


RESIDENT_TENSOR = """
import json, sys, torch
from services.hugepages import use_huge_pages
weights = torch.ones(64 << 20, dtype=torch.int8)  # resident: every page written
report = use_huge_pages()
print(json.dumps(dict(regions=report.regions, advised=report.advised, collapsed=report.collapsed,
                      huge=report.huge, sum=int(weights.sum()), text=report.describe())))
"""


def test_a_resident_tensor_ends_up_in_2mb_pages_where_the_kernel_allows():
    """In a process of its own, so that only its own memory is moved."""
    if thp_mode() in ("", "never"):
        pytest.skip("this kernel has no transparent huge pages")
    if _kernel() < (6, 1):
        pytest.skip("this kernel has no MADV_COLLAPSE (Linux 6.1): khugepaged collapses later")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", RESIDENT_TENSOR], cwd=root, capture_output=True, text=True, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["regions"] >= 1 and report["collapsed"] >= 32 * MB, report["text"]
    assert report["huge"] >= 32 * MB, report["text"]
    assert report["sum"] == 64 * MB  # the same bytes, mapped differently


def _kernel() -> tuple[int, int]:
    major, minor = (re.findall(r"\d+", os.uname().release) + ["0", "0"])[:2]
    return int(major), int(minor)


def test_huge_pages_are_on_unless_the_service_turns_them_off():
    env = {"SPECD_MODEL": "tiny"}
    assert ModelServiceConfig.from_env(env, "127.0.0.1:1").huge_pages is True
    assert ModelServiceConfig.from_env({**env, "SPECD_HUGE_PAGES": "0"}, "127.0.0.1:1").huge_pages is False
    with pytest.raises(ConfigError, match="SPECD_HUGE_PAGES"):
        ModelServiceConfig.from_env({**env, "SPECD_HUGE_PAGES": "maybe"}, "127.0.0.1:1")
