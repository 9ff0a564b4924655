"""Errors a user can act on.

Every error raised because of the user's input (study file, data set, database URL,
bundle) is a :class:`UserError`. The CLI prints ``str(error)`` as one line and exits
with :attr:`UserError.exit_code`; no traceback is shown for these.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, reported as one line."""

    exit_code = 2


class ConfigError(UserError):
    """The study file is unreadable or invalid; the message names the file and key."""


class DataError(UserError):
    """The data set is invalid; the message names the first offending files and the count."""


class StorageError(UserError):
    """The study's storage cannot be reached or used."""


class WorkersFailedError(UserError):
    """Workers stopped with an error before the study's budget was spent."""

    exit_code = 1


class BundleError(UserError):
    """An export bundle or a prediction input is invalid."""


class Preempted(KeyboardInterrupt):
    """SIGTERM reached a worker: Slurm or Kubernetes is about to take its machine away.

    A ``KeyboardInterrupt`` so that it stops a step wherever it lands, as Ctrl-C does, and Optuna
    ends the running trial FAIL and re-raises it; unlike Ctrl-C the trial is then requeued to
    resume elsewhere, and the worker exits with :attr:`exit_code` ("restart me").
    """

    exit_code = 75  # EX_TEMPFAIL from sysexits.h: a temporary failure, try again
