"""`relay simulate`: a Replicate stand-in that sends realistic, signed prediction lifecycles.

Each lifecycle is what Replicate sends for one prediction: `starting`, several `processing`
deliveries with growing tqdm-style logs, one with the output, then `succeeded` (or `failed` /
`canceled`). Like Replicate, only the final delivery is retried after a 5xx or network error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import string
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx

from service.core.errors import ConfigError
from service.core.retry import Backoff, retryable_status
from service.core.settings import Settings, decode_webhook_secret, simulate_outputs_port
from service.core.signatures import signed_headers
from service.ops.outputs import OutputServer

MODEL = "qwen/qwen-image-edit-plus"
VERSION = "5a8b5e4bd4e1b1d3b9a8c9e1f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5"
STEPS = 50
FINAL_RETRIES = 5
# Like Replicate's own sender: 0.2 s, 0.4 s, … up to 2 s between tries of the final delivery.
SENDER_BACKOFF = Backoff(attempts=FINAL_RETRIES + 1, base=0.2, cap=2.0, max_retry_after=0.0)


def new_id(rng: random.Random, length: int = 26) -> str:
    return "".join(rng.choices(string.ascii_lowercase + string.digits, k=length))


def progress_line(step: int, total: int = STEPS) -> str:
    percent = step * 100 // total
    bar = ("█" * (percent // 10)).ljust(10)
    return f"{percent:3d}%|{bar}| {step}/{total} [00:0{step // 12}<00:04, 11.2it/s]"


def lifecycle(
    prediction_id: str,
    outcome: str = "succeeded",
    *,
    start: datetime | None = None,
    webhook: str | None = None,
    predict_time: float = 4.61,
    output_url: str | None = None,
) -> list[dict[str, Any]]:
    """The bodies Replicate would deliver for one prediction (to `webhook`), in sending order;
    the output is `output_url` when given (a file really served), else a replicate.delivery URL."""
    created = start or datetime.now(UTC)
    base: dict[str, Any] = {
        "id": prediction_id,
        "model": MODEL,
        "version": VERSION,
        "input": {
            "image": [f"https://replicate.delivery/pbxt/{prediction_id}/in.png"],
            "prompt": "Remove the background",
            "num_inference_steps": STEPS,
        },
        "logs": "",
        "output": None,
        "data_removed": False,
        "error": None,
        "source": "api",
        "status": "starting",
        "created_at": _ts(created),
        "started_at": None,
        "completed_at": None,
        "webhook": webhook,
        "webhook_events_filter": ["start", "output", "logs", "completed"],
        "metrics": {},
        "urls": {
            "get": f"https://api.replicate.com/v1/predictions/{prediction_id}",
            "cancel": f"https://api.replicate.com/v1/predictions/{prediction_id}/cancel",
            "web": f"https://replicate.com/p/{prediction_id}",
        },
    }
    bodies = [dict(base)]
    logs = "Using seed: 1423\n"
    running = {**base, "status": "processing", "started_at": _ts(created + timedelta(seconds=1))}
    for step in (5, 23, 41):
        logs += progress_line(step) + "\n"
        bodies.append({**running, "logs": logs})
    logs += progress_line(STEPS) + "\n"
    output = [output_url or f"https://replicate.delivery/xezq/{prediction_id}/out-0.webp"]
    total_time = round(predict_time + 1.39, 2)  # plus queueing and setup, as Replicate counts it
    final = {
        **running,
        "logs": logs,
        "completed_at": _ts(created + timedelta(seconds=total_time)),
        "metrics": {"predict_time": predict_time, "total_time": total_time},
    }
    if outcome == "succeeded":
        bodies.append({**running, "logs": logs, "output": output})
        bodies.append({**final, "status": "succeeded", "output": output})
    elif outcome == "failed":
        bodies.append({**final, "status": "failed", "error": "CUDA out of memory"})
    else:
        bodies.append({**final, "status": outcome, "metrics": {"predict_time": round(predict_time / 2, 2)}})
    return bodies


def _ts(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


@dataclass
class Report:
    sent: int = 0
    acknowledged: int = 0
    duplicates: int = 0
    expected_duplicates: int = 0
    rejected: int = 0
    failed: int = 0
    acked_ids: list[str] = field(default_factory=list)
    final_status: dict[str, str] = field(default_factory=dict)

    def unexpected(self) -> list[str]:
        problems = []
        if self.rejected:
            problems.append(f"{self.rejected} deliveries rejected")
        if self.failed:
            problems.append(f"{self.failed} deliveries failed (5xx or network)")
        if self.duplicates != self.expected_duplicates:
            problems.append(f"{self.duplicates} duplicates acknowledged, {self.expected_duplicates} sent")
        return problems

    def summary(self) -> str:
        return (
            f"sent {self.sent}, acknowledged {self.acknowledged}, duplicates {self.duplicates}, "
            f"rejected {self.rejected}, failed {self.failed}, "
            f"predictions {len(self.final_status)}"
        )


class RateLimiter:
    def __init__(self, rate: float):
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._next = time.monotonic()

    async def wait(self) -> None:
        if not self._interval:
            return
        now = time.monotonic()
        self._next = max(self._next + self._interval, now)
        if self._next > now:
            await asyncio.sleep(self._next - now)


class Simulator:
    def __init__(
        self,
        client: httpx.AsyncClient,
        url: str,
        key: bytes,
        rng: random.Random,
        limiter: RateLimiter,
        options: argparse.Namespace,
    ):
        self.client, self.url, self.key, self.rng = client, url, key, rng
        self.limiter, self.options = limiter, options
        self.report = Report()
        self.outputs: OutputServer | None = None

    def _outcome(self) -> str:
        if self.rng.random() < self.options.failures:
            return self.rng.choice(["failed", "canceled"])
        return "succeeded"

    def _predict_time(self) -> float:
        return round(self.rng.uniform(2.0, 12.0), 2)  # seconds on the GPU, as Replicate reports

    async def run_one(self) -> None:
        prediction_id = new_id(self.rng)
        outcome = self._outcome()
        deliveries = [
            (f"msg_{new_id(self.rng, 24)}", json.dumps(b).encode())
            for b in lifecycle(
                prediction_id,
                outcome,
                webhook=self.url,
                predict_time=self._predict_time(),
                output_url=self.outputs.url(prediction_id) if self.outputs is not None else None,
            )
        ]
        if self.rng.random() < self.options.reorder and len(deliveries) > 3:
            i = self.rng.randrange(1, len(deliveries) - 2)
            deliveries[i], deliveries[i + 1] = deliveries[i + 1], deliveries[i]
        for index, (webhook_id, body) in enumerate(deliveries):
            final = index == len(deliveries) - 1
            await self.deliver(webhook_id, body, retries=FINAL_RETRIES if final else 0)
            if self.rng.random() < self.options.duplicates:
                self.report.expected_duplicates += 1
                await self.deliver(webhook_id, body, retries=0)
        self.report.final_status[prediction_id] = outcome

    async def deliver(self, webhook_id: str, body: bytes, retries: int) -> None:
        for attempt in range(retries + 1):
            await self.limiter.wait()
            self.report.sent += 1
            try:
                response = await self.client.post(
                    self.url, content=body, headers=signed_headers(self.key, webhook_id, body)
                )
            except httpx.HTTPError:
                status = 0
            else:
                status = response.status_code
                if 200 <= status < 300:
                    self._acknowledged(webhook_id, response.json())
                    return
            if status and not retryable_status(status):
                self.report.rejected += 1
                return
            wait = SENDER_BACKOFF.delay(attempt + 1) if attempt < retries else None
            if wait is not None:
                await asyncio.sleep(wait)
        self.report.failed += 1

    def _acknowledged(self, webhook_id: str, answer: dict[str, Any]) -> None:
        self.report.acknowledged += 1
        if answer.get("duplicate"):
            self.report.duplicates += 1
        else:
            self.report.acked_ids.append(webhook_id)


async def simulate(
    options: argparse.Namespace, url: str, key: bytes, outputs: OutputServer | None = None
) -> Report:
    rng = random.Random(options.seed)
    limits = httpx.Limits(max_connections=options.concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        simulator = Simulator(client, url, key, rng, RateLimiter(options.rate), options)
        simulator.outputs = outputs
        queue = list(range(options.predictions))

        async def worker() -> None:
            while queue:
                queue.pop()
                await simulator.run_one()

        await asyncio.gather(*(worker() for _ in range(max(1, options.concurrency))))
    return simulator.report


async def simulate_serving(options: argparse.Namespace, url: str, key: bytes, port: int) -> Report:
    """`simulate` with the outputs served on 127.0.0.1:`port`, kept up until the instance has
    fetched every succeeded prediction's file (or --serve-for seconds have passed)."""
    outputs = OutputServer("127.0.0.1", port)
    try:
        await outputs.start()
    except OSError as error:
        raise ConfigError(
            f"cannot serve outputs on 127.0.0.1:{port} ({error.strerror}); pick --outputs-port"
        ) from None
    try:
        report = await simulate(options, url, key, outputs)
        wanted = {p for p, status in report.final_status.items() if status == "succeeded"}
        deadline = time.monotonic() + options.serve_for
        while not wanted <= outputs.served and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        print(f"served {len(wanted & outputs.served)} of {len(wanted)} output files from {outputs.origin}")
        return report
    finally:
        await outputs.stop()


def validate(options: argparse.Namespace) -> None:
    if options.predictions < 0 or options.concurrency < 1 or options.rate < 0:
        raise ConfigError("--predictions must be >= 0, --concurrency >= 1 and --rate >= 0")
    for name in ("duplicates", "reorder", "failures"):
        if not 0.0 <= getattr(options, name) <= 1.0:
            raise ConfigError(f"--{name} must be a share between 0 and 1")


def run_simulation(options: argparse.Namespace, settings: Settings) -> int:
    validate(options)
    secret = options.secret or (settings.webhook_secrets[0] if settings.webhook_secrets else None)
    if secret is None:
        raise ConfigError("no webhook secret: pass --secret whsec_… or set REPLICATE_WEBHOOK_SECRET")
    key = decode_webhook_secret(secret, "--secret")
    url = options.url or settings.webhook_url
    if getattr(options, "serve_outputs", False):
        port = options.outputs_port or simulate_outputs_port(urlsplit(url).port or 80)
        report = asyncio.run(simulate_serving(options, url, key, port))
    else:
        report = asyncio.run(simulate(options, url, key))
    print(report.summary())
    if options.report:
        with open(options.report, "w") as handle:
            json.dump({**report.__dict__}, handle)
    problems = report.unexpected()
    for problem in problems:
        print(f"unexpected: {problem}", file=sys.stderr)
    return 1 if problems else 0
