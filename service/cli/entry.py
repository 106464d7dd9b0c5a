"""The `relay` console script and `python -m service`: Ctrl-C while the modules still load
(half a second) exits 130 like Ctrl-C later, instead of printing an import traceback."""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from service.cli.main import main as run
    except KeyboardInterrupt:
        return 130
    return run()


if __name__ == "__main__":
    sys.exit(main())
