"""``python -m fastdiff`` is the ``fastdiff`` command."""

import sys

from .cli import main

sys.exit(main())
