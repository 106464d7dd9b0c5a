"""What a log line costs: one uvicorn access record through Relay's handler, text vs JSON.

Usage:  .venv/bin/python bench/logs.py [--lines 100000]

The access log writes one line per HTTP request, webhooks included, so its cost is per delivery.
Each line goes through the real handler set-up (context filter, access filter with token
redaction, formatter) into an in-memory stream. The baseline is the same record through a bare
stdlib handler and formatter: on a shared machine absolute times move with the load, the ratio
much less. Ceiling: Relay's line (JSON included) costs at most 4x the baseline.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.core.logcontext import bind
from service.web.logs import configure_logging

CEILING_RATIO = 4.0
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


def baseline(lines: int) -> float:
    """The same access record through a bare handler: what any logging costs here."""
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    plain = logging.getLogger("bench.plain")
    plain.addHandler(handler)
    plain.setLevel(logging.INFO)
    plain.propagate = False
    started = time.perf_counter()
    for _ in range(lines):
        plain.info('%s - "%s %s HTTP/%s" %d', *ARGS)
    return (time.perf_counter() - started) / lines * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=100_000)
    options = parser.parse_args()
    base = baseline(options.lines)
    print(f"{'format':<10} {'µs/line':>8} {'x base':>7} {'ceiling':>8}")
    print(f"{'baseline':<10} {base:>8.2f} {1:>7.2f} {'':>8}")
    worst = 0.0
    for log_format in ("text", "json"):
        cost = per_line(log_format, options.lines)
        worst = max(worst, cost / base)
        print(f"{log_format:<10} {cost:>8.2f} {cost / base:>7.2f} {CEILING_RATIO:>8.1f}")
    return 0 if worst <= CEILING_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
