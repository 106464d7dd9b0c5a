"""WebSocket subscribers kept connected to Relay during its benchmark (the dashboard's view).

Each follows the all-events stream like a real client: it counts events and, if Relay closes
it for falling behind (1013), reconnects with `after=<last seq>`. On SIGTERM prints one JSON line.

Usage: python bench/subscribers.py --port P --token ADMIN_TOKEN [--count N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import signal

import uvloop
import websockets

EVENT_PREFIX = '{"type":"event","seq":'


class Tally:
    def __init__(self) -> None:
        self.events = 0
        self.reconnects = 0
        self.connected = 0


async def follow(url: str, token: str, tally: Tally) -> None:
    after = 0
    while True:
        try:
            async with websockets.connect(
                f"{url}?after={after}",
                additional_headers={"Authorization": f"Bearer {token}"},
                max_size=None,
            ) as socket:
                tally.connected += 1
                async for text in socket:
                    # Events start {"type":"event","seq":N,…}: read just that, so this client
                    # takes as little CPU as possible from the server it shares the machine with.
                    if text.startswith(EVENT_PREFIX):
                        tally.events += 1
                        after = int(text[len(EVENT_PREFIX) : text.index(",", len(EVENT_PREFIX))])
        except (websockets.ConnectionClosed, OSError):
            pass
        tally.reconnects += 1
        await asyncio.sleep(0.05)


async def main(options: argparse.Namespace) -> dict:
    tally = Tally()
    url = f"ws://127.0.0.1:{options.port}/events/ws"
    tasks = [asyncio.create_task(follow(url, options.token, tally)) for _ in range(options.count)]
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    while tally.connected < options.count:
        await asyncio.sleep(0.02)
    print("ready", flush=True)
    await stop.wait()
    for task in tasks:
        task.cancel()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "events": tally.events,
        "reconnects": tally.reconnects,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--count", type=int, default=2)
    print(json.dumps(uvloop.run(main(parser.parse_args()))), flush=True)
