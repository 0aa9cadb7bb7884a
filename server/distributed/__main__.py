"""Entry point: ``python -m server.distributed`` (see ``server.distributed.cli`` for the flags)."""

import sys

from server.distributed.cli import main

if __name__ == "__main__":
    sys.exit(main())
