"""`python -m purelens`: the same command line as `purelens`."""

import sys

from ._cli import main

sys.exit(main())
