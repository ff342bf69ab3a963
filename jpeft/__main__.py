"""``python -m jpeft``: the ``jpeft`` command line (see :mod:`jpeft.cli`)."""

import sys

from jpeft.cli import main

if __name__ == "__main__":
    sys.exit(main())
