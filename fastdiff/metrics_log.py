"""``metrics.jsonl``: one JSON record per logged step, appended as training goes.

The file is opened once per run and flushed after every record, so a killed run loses at
most the line being written.  A resumed run continues from its checkpoint's step ``s``: lines
of steps after ``s`` (written by a run that was killed after its last checkpoint; those steps
are now trained again) and torn lines are dropped first, so every step is logged once.
Writes that fail raise :class:`~fastdiff.errors.OutputError` naming the file and the cause.
"""

from __future__ import annotations

import json
from pathlib import Path

from .atomic import atomic_write_bytes
from .errors import OutputError


class MetricsLog:
    """Append-only JSON-lines log at ``path``; ``resumed_step``: keep records up to it."""

    def __init__(self, path: str | Path, *, resumed_step: int | None = None):
        self.path = Path(path)
        try:
            if resumed_step is not None and self.path.is_file():
                self._keep_up_to(resumed_step)
            self._file = open(self.path, "a")
        except OSError as exc:
            raise OutputError.wrap("metrics log", self.path, exc) from exc

    def _keep_up_to(self, step: int) -> None:
        text = self.path.read_text()
        kept = [line for line in text.splitlines() if _step_of(line) is not None]
        kept = [line for line in kept if _step_of(line) <= step]
        new = "".join(line + "\n" for line in kept)
        if new != text:
            atomic_write_bytes(self.path, new.encode())

    def append(self, record: dict) -> None:
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as exc:
            raise OutputError.wrap("metrics log", self.path, exc) from exc

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass  # the failed write was reported when it happened

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _step_of(line: str) -> int | None:
    """The record's step, or None for a torn or foreign line."""
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None
