"""What a log line costs: one uvicorn access record through Relay's handler, text vs JSON.

Usage:  .venv/bin/python bench/logs.py [--lines 100000]

The access log writes one line per HTTP request, webhooks included, so its cost is per delivery.
Each line goes through the real handler set-up (context filter, access filter with token
redaction, formatter) into a null stream. Prints microseconds per line against a ceiling of
20 µs (about a fifth of a webhook's ~90 µs of server CPU, bench/ingest.py).
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.core.logcontext import bind  # noqa: E402
from service.web.logs import configure_logging  # noqa: E402

CEILING_US = 20.0
ARGS = ("127.0.0.1:50000", "POST", "/webhooks/replicate?token=abc", "1.1", 200)


def per_line(log_format: str, lines: int) -> float:
    configure_logging("INFO", log_format, access_log=True)
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(io.StringIO())  # formatted and written, then dropped
    access = logging.getLogger("uvicorn.access")
    bind(request_id="0123456789abcdef", webhook_id="msg_0123456789", prediction_id="p0123456789", seq=42)
    started = time.perf_counter()
    for _ in range(lines):
        access.info('%s - "%s %s HTTP/%s" %d', *ARGS)
    return (time.perf_counter() - started) / lines * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=100_000)
    options = parser.parse_args()
    print(f"{'format':<8} {'µs/line':>8} {'ceiling':>8}")
    worst = 0.0
    for log_format in ("text", "json"):
        cost = per_line(log_format, options.lines)
        worst = max(worst, cost)
        print(f"{log_format:<8} {cost:>8.2f} {CEILING_US:>8.1f}")
    return 0 if worst <= CEILING_US else 1


if __name__ == "__main__":
    sys.exit(main())
