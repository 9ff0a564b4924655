"""A real single-node Slurm (slurmctld + slurmd, CPU only) for the launcher tests.

Installs Debian's ``slurm-wlm`` and ``munge`` when they are missing (as root; a fresh CI
machine starts without them), starts munged if no one runs it, and writes the cluster's
config into a temporary folder. Every Slurm client call needs ``SLURM_CONF`` (``cluster.env``).
Daemons this fixture started are stopped by their pid, never by name.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.db.conftest import postgres_db, workdir  # noqa: F401 (fixtures)
from tests.debian import ensure_packages

MUNGE_DIRS = ("/etc/munge", "/run/munge", "/var/log/munge", "/var/lib/munge")
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_PID = Path("/run/munge/munged.pid")


class SlurmCluster:
    """The running cluster: its config folder and the environment its clients need."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.conf = folder / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *command: str, check: bool = True) -> str:
        done = subprocess.run(command, env=self.env, capture_output=True, text=True,
                              timeout=60)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(command)}: {done.stderr.strip()}\n{self.logs()}")
        return done.stdout

    def tasks(self, job_id: str) -> dict[str, str]:
        """``{task id: state}`` of the array's tasks still known to squeue."""
        out = self.run("squeue", "--noheader", "--array", "--jobs", job_id,
                       "--format=%K %T", check=False)
        return dict(line.split() for line in out.splitlines() if line.strip())

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{(self.folder / name).read_text(errors='replace')[-3000:]}"
                         for name in ("slurmctld.log", "slurmd.log")
                         if (self.folder / name).exists())


def _munge_works() -> bool:
    credential = subprocess.run(["munge", "-n"], capture_output=True, timeout=30)
    if credential.returncode != 0:
        return False
    return subprocess.run(["unmunge"], input=credential.stdout, capture_output=True,
                          timeout=30).returncode == 0


def _start_munge() -> int | None:
    """Start munged unless one answers already; returns the pid of the one started here."""
    if _munge_works():
        return None
    for folder in MUNGE_DIRS:
        Path(folder).mkdir(parents=True, exist_ok=True)
    if not MUNGE_KEY.exists():
        MUNGE_KEY.write_bytes(os.urandom(1024))
    for folder in MUNGE_DIRS:
        shutil.chown(folder, "munge", "munge")
    shutil.chown(MUNGE_KEY, "munge", "munge")
    MUNGE_KEY.chmod(0o400)
    Path("/etc/munge").chmod(0o700)
    subprocess.run(["munged", "--force"], capture_output=True, timeout=30, check=True)
    _wait(_munge_works, 30, "munged did not answer")
    return int(MUNGE_PID.read_text())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_conf(folder: Path) -> None:
    host = socket.gethostname().split(".")[0]
    memory_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    for sub in ("state", "spool"):
        (folder / sub).mkdir()
    (folder / "slurm.conf").write_text(f"""\
ClusterName=fstest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
KillWait=5
# A requeued job waits for its old credential to expire (120 s by default) and for the next
# scheduling pass; short here so that a requeued task comes back within seconds.
AuthInfo=cred_expire=5
SchedulerParameters=sched_interval=1,bf_interval=1
NodeName={host} CPUs={os.cpu_count()} RealMemory={max(1024, memory_mib - 2048)} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")


def _wait(ready, timeout_s: float, message: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            pytest.fail(message)
        time.sleep(0.5)


def _drain(cluster: SlurmCluster) -> None:
    """Cancel what a failed test left and let the job steps end before slurmd does.

    A slurmstepd still reporting to a stopped slurmd would outlive the cluster; each one
    removes its socket in the spool folder when it exits.
    """
    jobs = cluster.run("squeue", "--noheader", "--format=%A", check=False).split()
    if jobs:
        cluster.run("scancel", *jobs, check=False)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (
            cluster.run("squeue", "--noheader", check=False).strip()
            or any(path.is_socket() for path in (cluster.folder / "spool").iterdir())):
        time.sleep(0.5)


def _stop(pid_file: Path) -> None:
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Iterator[SlurmCluster]:
    """slurmctld + slurmd on this machine, one partition ``debug`` with every CPU."""
    ensure_packages(["slurmctld", "slurmd", "munged"], ["slurm-wlm", "munge"])
    munged = _start_munge()
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    _write_conf(cluster.folder)
    try:
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([daemon, "-f", str(cluster.conf)], env=cluster.env, check=True,
                           capture_output=True, timeout=60)

        def idle() -> bool:
            out = cluster.run("sinfo", "--noheader", "--format=%T", check=False)
            return out.strip() == "idle"

        _wait(idle, 60, f"the Slurm node never became idle\n{cluster.logs()}")
        yield cluster
    finally:
        _drain(cluster)
        _stop(cluster.folder / "slurmd.pid")
        _stop(cluster.folder / "slurmctld.pid")
        if munged is not None:
            try:
                os.kill(munged, signal.SIGTERM)
            except ProcessLookupError:
                pass
