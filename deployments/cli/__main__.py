"""``python -m deployments.cli``: the ``pr-preview`` console script."""

import sys

from deployments.cli import main

sys.exit(main())
