"""Install the Debian packages a test needs (CI starts on a fresh machine without them)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

_updated = False  # `apt-get update` once per test session


def ensure_packages(binaries: list[str], packages: list[str], *,
                    recommends: bool = True) -> None:
    """Install ``packages`` with apt-get unless every one of ``binaries`` is on the PATH.

    Skips the test where that cannot be done (not root, no apt-get); fails it when apt-get
    itself fails, so a broken install is never mistaken for a passing run.
    """
    global _updated
    if all(shutil.which(binary) for binary in binaries):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"{', '.join(packages)} not installed and cannot be installed here "
                    "(needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    commands = [] if _updated else [["apt-get", "update", "-qq"]]
    install = ["apt-get", "install", "-y", "-qq"]
    if not recommends:
        install.append("--no-install-recommends")
    commands.append([*install, *packages])
    for command in commands:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}")
    _updated = True
