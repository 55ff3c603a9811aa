"""`python -m reconciler` is `rq-reconciler`."""

import sys

from reconciler.cli import main

sys.exit(main())
