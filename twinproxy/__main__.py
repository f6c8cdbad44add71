"""``python -m twinproxy``: the same as the ``twinproxy`` command."""

import sys

from twinproxy.cli import main

sys.exit(main())
