"""``python -m qcow2ovl``: the command line."""

import sys

from qcow2ovl.cli import main

sys.exit(main())
