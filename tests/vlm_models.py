"""The tiny vision-language models moved to :mod:`dreamr.testing_vlm` (benchmarks use them too).

Kept for the tests that still write ``from vlm_models import ...``; new code imports dreamr.testing_vlm.
"""

from dreamr.testing_vlm import *  # noqa: F401,F403
from dreamr.testing_vlm import __all__  # noqa: F401
