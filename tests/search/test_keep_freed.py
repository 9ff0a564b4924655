"""keep_freed_host_memory: a batch-sized block freed and allocated again costs no page faults."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# Allocate and fill a 40 MB tensor (a 224 px rgb batch of 64 as float32) and free it, 30
# times; print the minor page faults of the last 10 rounds. glibc reaches a steady state
# after a few rounds (the heap then holds a few such blocks; see keep_freed_host_memory).
PROGRAM = """
import resource, sys, torch
from search.trial.prefetch import keep_freed_host_memory
kept = keep_freed_host_memory() if sys.argv[1] == "keep" else False
for _ in range(20):
    torch.empty(10_000_000).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.empty(10_000_000).fill_(1.0)
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> tuple[bool, int]:
    done = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True,
                          cwd=Path(__file__).parents[2], check=True, timeout=120)
    kept, count = done.stdout.split()
    return kept == "True", int(count)


def test_a_freed_batch_is_reused_without_page_faults():
    kept, with_keep = faults("keep")
    if not kept:
        pytest.skip("not glibc: malloc settings cannot be changed here")
    _, default = faults("default")
    # 40 MB is about 9,800 pages, faulted in afresh each round when glibc unmaps on free.
    assert default > 10 * 5_000, default
    assert with_keep < 1_000, with_keep
