"""Errors that the command line turns into one line and an exit status, without a traceback."""

from __future__ import annotations


class LorafitError(Exception):
    """A problem with the user's input or environment: printed as ``lorafit: error: <message>``.

    The message must be one line and name what is wrong where (file, line, column, flag), since
    the user sees nothing else. ``exit_code`` 2 matches argparse's usage errors.
    """

    exit_code = 2


class TrainingDiverged(LorafitError):
    """The loss became NaN or infinite; the run stopped before applying that step."""

    exit_code = 1


class Interrupted(LorafitError):
    """Ctrl-C or SIGTERM: a resumable checkpoint was written. Exit status 128 + signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
