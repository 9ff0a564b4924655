"""``search run``'s workers, kept alive: a worker that dies is restarted and its trial resumed.

What Ray Tune's ``FailureConfig(max_failures)`` does for its actors, for our worker processes:
when one dies (a signal such as the OOM killer's SIGKILL, or an unexpected exit code) its
running trial goes through the one requeue path (:mod:`search.study.requeue`: FAIL with the
reason, plus a copy that resumes from the last finished epoch), and the worker is started
again, up to ``[study] max_worker_restarts`` times per worker. This works with a single worker:
nobody has to wait for a heartbeat to go stale.

Not restarted: a clean finish (exit 0), a study-file or data error (exit 2: it would only fail
again the same way), and our own Ctrl-C (the runner stops the supervisor first). A preempted
worker (SIGTERM, exit 75) has requeued its own trial and is restarted without counting as a
crash.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState
from rich.console import Console

from search.errors import Preempted
from search.study.budget import StudyLock, budget_state
from search.study.requeue import requeue
from search.study.storage import retrying

USER_ERROR_EXIT = 2  # search.cli maps UserError to this; a restart cannot fix it


@dataclass
class WorkerSlot:
    """One planned worker and the process currently filling it."""

    index: int
    process: subprocess.Popen
    restarts: int = 0
    finished: bool = False


def describe_exit(code: int) -> str:
    """``-9`` -> ``"killed by SIGKILL"``; ``3`` -> ``"exited with code 3"``."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class Supervisor:
    """Start the workers and, on each :meth:`poll`, requeue and restart the dead ones.

    Args:
        study: The study the workers run.
        n_trials: Its budget; no worker is restarted once the budget is spent.
        start: ``start(index) -> Popen`` starts worker ``index``.
        max_restarts: Restarts allowed per worker.
        console: Where a restart is announced.
        lock: The workers' study lock (none behind the gRPC proxy). Requeues run under it,
            as the workers' stale-trial sweeps do, so a dead trial gets one copy.
    """

    def __init__(self, study: optuna.Study, n_trials: int, start: Callable[[int], subprocess.Popen],
                 count: int, *, max_restarts: int, console: Console,
                 lock: StudyLock | None = None) -> None:
        self.study = study
        self.lock = lock
        self.n_trials = n_trials
        self._start = start
        self.max_restarts = max_restarts
        self.console = console
        self.slots = [WorkerSlot(i, start(i)) for i in range(count)]

    @property
    def processes(self) -> list[subprocess.Popen]:
        """The current process of every slot (the last one, for a finished slot)."""
        return [slot.process for slot in self.slots]

    def poll(self) -> bool:
        """Handle the workers that exited since the last call; True while any is running."""
        for slot in self.slots:
            code = slot.process.poll()
            if code is None or slot.finished:
                continue
            if code in (0, USER_ERROR_EXIT):
                slot.finished = True
                continue
            what = f"worker {slot.index} (pid {slot.process.pid}) {describe_exit(code)}"
            requeued = self._requeue_orphans(slot.process.pid, what)
            spent = retrying(budget_state, self.study, self.n_trials).spent
            if code == Preempted.exit_code and not spent:
                # It requeued its own trial and asked to be restarted; that is no crash.
                slot.process = self._start(slot.index)
                self.console.print(f"worker {slot.index} was preempted; restarted it")
                continue
            if slot.restarts >= self.max_restarts or spent:
                slot.finished = True
                if spent:  # it died on its way out (say, killed as its last trial ended)
                    self.console.print(f"{what} after the budget was spent; not restarted")
                else:
                    self.console.print(f"{what}; it was restarted {slot.restarts} time(s), "
                                       "the most `max_worker_restarts` allows")
                continue
            slot.restarts += 1
            slot.process = self._start(slot.index)
            self.console.print(f"{what}; requeued {requeued} trial(s) to resume from their last "
                               f"epoch, restarted it ({slot.restarts}/{self.max_restarts})")
        # A slot is finished only once its exit was handled above, so a worker that dies
        # right after this loop is still handled on the next call.
        return not all(slot.finished for slot in self.slots)

    def _requeue_orphans(self, pid: int, reason: str) -> int:
        if self.lock is None:
            return requeue_orphans(self.study, pid, reason)
        self.lock.acquire()
        try:
            return requeue_orphans(self.study, pid, reason)
        finally:
            self.lock.release()


def requeue_orphans(study: optuna.Study, pid: int, reason: str) -> int:
    """Requeue the RUNNING trials that worker ``pid`` was running; returns how many."""
    count = 0
    for trial in retrying(study.get_trials, deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get("worker_pid") == pid and requeue(study, trial, reason):
            count += 1
    return count
