"""Huge pages for XLA:CPU: restart the command line once with glibc's hugetlb tunable where it helps.

XLA:CPU allocates a step's temporaries as one block (414 MiB for configs/bench/ref.yaml), and
glibc serves a block that large with a fresh mmap each step: every 4 KiB page faults again
(~120k faults per step there, a fifth of the step's CPU time in the kernel). Where transparent
huge pages are opt-in ("madvise", the Debian and Ubuntu default), glibc's hugetlb tunable makes
malloc ask for them: 2 MiB pages, ~200x fewer faults. glibc reads tunables when a process
starts, so the command line starts itself once more with it. Any GLIBC_TUNABLES already set,
even empty, is left as it is (the way to opt out).
"""
from __future__ import annotations

import os
import sys

HUGE_PAGES = "glibc.malloc.hugetlb=1"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_help() -> bool:
    """glibc >= 2.35 (it has the hugetlb tunable) and transparent huge pages on madvise."""
    try:
        name, version = (os.confstr("CS_GNU_LIBC_VERSION") or "none 0").split()
        with open(THP_SETTING) as f:
            opt_in = "[madvise]" in f.read()
    except (AttributeError, OSError, ValueError):  # no os.confstr, no such name, no THP file
        return False
    return opt_in and name == "glibc" and tuple(map(int, version.split(".")[:2])) >= (2, 35)


def restart_with_huge_pages(argv: list[str]) -> None:
    """Re-run `python -m jaxlm argv` with HUGE_PAGES set, where it helps; else return."""
    if "GLIBC_TUNABLES" in os.environ or not sys.executable or not huge_pages_help():
        return
    os.execve(sys.executable, [sys.executable, "-m", "jaxlm", *argv],
              {**os.environ, "GLIBC_TUNABLES": HUGE_PAGES})
