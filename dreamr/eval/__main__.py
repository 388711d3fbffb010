"""``python -m dreamr.eval``: see :mod:`dreamr.eval.cli`."""

import sys

from dreamr.eval.cli import main

sys.exit(main())
