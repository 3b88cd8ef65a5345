"""User-facing errors: one line naming the field or file and the fix.

Everything a user can get wrong raises `DropeError` (or a subclass); the CLI prints its message as a
single line and exits non-zero. Library bugs stay ordinary exceptions with tracebacks.
"""


class DropeError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


class CheckpointError(DropeError):
    """A checkpoint is missing, incomplete, unsafe or of the wrong architecture."""


class StorageError(DropeError):
    """A storage location cannot be read or written (bucket, prefix, disk, credentials)."""


class SpecError(DropeError):
    """A workflow or stage spec field is invalid."""


def one_line(exc: BaseException) -> str:
    """The line of an exception a user reads in a ledger record, a log or a FAILED run: its message's
    last non-empty line (an error that crossed a process as traceback text ends with its message), or
    the exception's type when it has no message."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
