"""Command-line entry point: ``python -m server`` / ``jetmoe-serve``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Start the HTTP server. The HTTP layer is not part of this release yet."""
    del argv
    print(
        "jetmoe-serve: the HTTP server is not available yet in this version; "
        "the model and engine can be used from Python (see README).",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
