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
