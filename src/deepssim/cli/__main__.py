"""``python -m deepssim.cli``."""

import sys

from deepssim.cli import main

sys.exit(main())
