"""`python -m fxsurgery`: the command line, as `fxsurgery` is (torchrun launches modules this way)."""

import sys

from .cli import main

sys.exit(main())
