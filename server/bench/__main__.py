"""``python -m server.bench``: benchmark an OpenAI-compatible server (see ``server.bench.cli``)."""

from __future__ import annotations

import sys

from server.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
