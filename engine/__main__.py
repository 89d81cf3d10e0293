"""``python -m engine``: configure logging for a terminal and run the command line."""

import logging
import sys

from engine.cli import main

logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", stream=sys.stderr)
sys.exit(main())
