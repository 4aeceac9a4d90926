"""``python -m diffalign``: the ``diffalign`` command."""

import sys

from diffalign.cli import main

if __name__ == "__main__":
    sys.exit(main())
