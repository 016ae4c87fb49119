"""Exceptions that fastdiff raises for bad input, so callers (and the CLI) can tell them apart.

Every message names the argument at fault and what was expected.  All derive from
ValueError so that code catching ValueError keeps working.
"""


class FastDiffError(ValueError):
    """Base class: bad input given to fastdiff (an argument, a file, a data set)."""


class DataError(FastDiffError):
    """The training data cannot be used: missing path, no images, NaN values, wrong shape."""


class CheckpointError(FastDiffError):
    """A checkpoint is missing, truncated, or belongs to another configuration."""


class OutputError(OSError):
    """A run's output could not be written: no space left, permission denied, a read-only file
    system, an output path that is a file.  An OSError (``errno`` and ``filename`` are those of
    the failure) whose ``str()`` is one line naming the path and the cause."""

    def __str__(self) -> str:
        return str(self.strerror)

    @classmethod
    def wrap(cls, what: str, path, exc: OSError, note: str = "", verb="write") -> "OutputError":
        """``cannot <verb> <what> '<path>': <cause>[; <note>]`` for the OSError ``exc``."""
        cause = exc.strerror or str(exc) or type(exc).__name__
        note = f"; {note}" if note else ""
        return cls(exc.errno, f"cannot {verb} {what} {str(path)!r}: {cause}{note}", str(path))
