"""Errors a user can cause, each with its exit code.

The CLI prints ``str(error)`` as one line and exits with ``error.exit_code``;
nothing else about an error reaches the user unless ``--verbose`` is given.
"""


class PruneError(Exception):
    """Base class: a problem the user can act on."""

    exit_code = 1


class UsageError(PruneError):
    """Bad options or arguments (exit 2, as click does for its own checks)."""

    exit_code = 2


class InputError(PruneError):
    """The model or the calibration data cannot be read or is not valid."""

    exit_code = 3


class OutOfMemory(InputError):
    """onnxruntime ran out of memory: the user's to mend (a smaller batch, another device)."""


class TargetError(PruneError):
    """The requested reduction cannot be reached on this model."""

    exit_code = 4


class InternalError(PruneError):
    """A check on our own output failed: a bug, never written to disk."""

    exit_code = 70
