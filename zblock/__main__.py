"""`python -m zblock ...`: the same as the `zblock` console script."""

import sys

from .cli import main

sys.exit(main())
