"""``python -m xenback.sim --run-dir DIR``: the same as ``xenback-sim``."""

import sys

from ._daemon import main

sys.exit(main())
