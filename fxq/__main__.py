"""`python -m fxq ...` runs the command line (as torchrun -m fxq does)."""

import sys

from fxq.cli import main

sys.exit(main())
