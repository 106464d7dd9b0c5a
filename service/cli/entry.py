"""The `relay` console script and `python -m service`: Ctrl-C while the modules still load or
the parser is built (half a second) exits 130 like Ctrl-C later, instead of a traceback."""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from service.cli.main import main as run

        return run()  # Ctrl-C while it builds its parser, too
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
