"""A pytest plugin that writes every failure to a file the moment it is reported.

pytest prints its ``--tb=long`` tracebacks only when the session ends; a suite cut at its time
limit (SIGINT, then SIGKILL) can lose them.  With this plugin loaded (``-p
pytest_failures_plugin``, its directory on PYTHONPATH) and ``GPU_SESSION_FAILURES_LOG`` naming a
file, each failed test phase (setup, call, teardown) and each failed collection is appended to
that file at once, opened and closed per entry::

    #### FAILED tests/test_x.py::test_y (call): AssertionError: ...
    <the long traceback>

(``ERROR`` instead of ``FAILED`` for a failed setup or teardown, and for a collection error;
a crashed xdist worker's test is ``FAILED ... (???)``.)
Under pytest-xdist the reports reach the controller too, so only the controller (or a run
without xdist) writes: every failure once, and a worker that crashes is still recorded.
tools/gpu_session.sh uses it; without the variable the plugin does nothing.
"""

from __future__ import annotations

import os

ENV = "GPU_SESSION_FAILURES_LOG"
_path: str | None = None


def pytest_configure(config) -> None:
    global _path
    # An xdist worker has ``workerinput``; its reports are written by the controller.
    if not hasattr(config, "workerinput"):
        _path = os.environ.get(ENV) or None


def _reason(report) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    message = getattr(crash, "message", "") or ""
    if not message:  # no crash entry: the last "E" line, or else the first line
        lines = [ln for ln in report.longreprtext.splitlines() if ln.strip() and ln[:3] != "[gw"]
        errors = [ln[1:] for ln in lines if ln.startswith("E ")]
        message = errors[-1] if errors else (lines[0] if lines else "")
    first = message.strip().splitlines()[0] if message.strip() else ""
    return first[:300]


def _write(kind: str, nodeid: str, when: str, report) -> None:
    if _path is None:
        return
    text = report.longreprtext
    try:
        with open(_path, "a", encoding="utf-8", errors="replace") as f:
            f.write(f"#### {kind} {nodeid or '(collection)'} ({when}): {_reason(report)}\n")
            f.write(text if text.endswith("\n") else text + "\n")
            f.write("\n")
    except OSError:  # never let the log break the run: suite.log still has the failure
        pass


def pytest_runtest_logreport(report) -> None:
    if report.failed:
        kind = "ERROR" if report.when in ("setup", "teardown") else "FAILED"  # as pytest says
        _write(kind, report.nodeid, report.when, report)


def pytest_collectreport(report) -> None:
    if report.failed:
        _write("ERROR", report.nodeid, "collect", report)
