"""`python -m fxsurgery.cli`: the command line, as a process."""

import sys

from . import main

sys.exit(main())
