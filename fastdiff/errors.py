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
