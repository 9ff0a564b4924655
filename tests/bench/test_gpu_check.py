"""bench/gpu_check.sh, in its short form on the CPU: every part runs and prints its figure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.search.conftest import make_dataset

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.sh"


def test_the_short_gpu_check_runs_on_a_cpu(workdir):
    data = make_dataset(workdir / "data", counts={"red": 10, "green": 10, "yellow": 10},
                        modalities=("rgb", "depth"))
    env = {**os.environ, "GPU_CHECK_SHORT": "1", "GPU_CHECK_DATA": str(data),
           "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    # About 40 s of CPU time; the timeout leaves room for a CPU shared with other jobs.
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout
    assert "end-to-end" in out and "model-only" in out  # the ratio line
    assert "| torchvision | b0 | 32 |" in out  # the throughput table
    assert "3/3 done (3 complete" in out + done.stderr  # the search
    assert not list(workdir.glob("runs/gpu-check"))  # nothing left behind here


def test_without_the_project_importable_it_says_so_in_one_line(workdir):
    env = {**os.environ, "PYTHON": "/usr/bin/env"}  # not a Python at all
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert "cannot import the project" in done.stderr
