"""Make ``fastdiff.kernels`` importable when fastdiff runs from a source checkout.

The source tree keeps the Triton kernels in the top-level ``kernels/`` folder; the built wheel
(and an editable install's finder) maps that folder to ``fastdiff.kernels``.  Python started in
the repository root puts the checkout's ``fastdiff/`` ahead of any installed copy on sys.path,
and then nothing maps ``kernels/``: importing this module mounts the checkout's ``kernels/``
under that name, so the checkout's code runs with its own kernels.  In an installed wheel
(``fastdiff/kernels/`` exists) it does nothing.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

NAME = "fastdiff.kernels"


def mount_checkout_kernels() -> bool:
    """Mount ``<checkout>/kernels`` as ``fastdiff.kernels`` if needed; True if it did."""
    if NAME in sys.modules:
        return False
    package = Path(__file__).resolve().parent
    source = package.parent / "kernels"
    if (package / "kernels").is_dir() or not (source / "__init__.py").is_file():
        return False
    spec = importlib.util.spec_from_file_location(
        NAME, source / "__init__.py", submodule_search_locations=[str(source)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[NAME] = module
    spec.loader.exec_module(module)
    return True


mount_checkout_kernels()
