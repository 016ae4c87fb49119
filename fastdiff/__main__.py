"""``python -m fastdiff`` is the ``fastdiff`` command."""

from .cli import run

run()
