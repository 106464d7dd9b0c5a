"""Several Relay processes on one Postgres: every subscriber gets its events, wherever they landed."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
from websockets.asyncio.client import connect

from service.core.auth import mint_token
from service.core.signatures import signed_headers
from service.ops.simulate import lifecycle

from .support import (
    SUBSCRIBE_KEY,
    WEBHOOK_KEY,
    RelayProcess,
    admin_headers,
    new_prediction_id,
    new_webhook_id,
    relay_env,
)

INSTANCES = 3
PREDICTIONS = 12


async def watch(instance: RelayProcess, prediction_id: str) -> list[dict]:
    """Every event message until the server closes the stream (1000 after the terminal event)."""
    token = mint_token(SUBSCRIBE_KEY, prediction_id)
    url = f"{instance.ws_url}/predictions/{prediction_id}/ws?after=0&token={token}"
    events = []
    async with connect(url) as socket:
        async for text in socket:
            message = json.loads(text)
            if message["type"] == "event":
                events.append(message)
        assert socket.close_code == 1000
    return events


async def deliver(http: httpx.AsyncClient, urls: list[str], index: int, body: dict) -> int:
    raw = json.dumps(body).encode()
    headers = signed_headers(WEBHOOK_KEY, new_webhook_id(), raw)
    response = await http.post(f"{urls[index % len(urls)]}/webhooks/replicate", content=raw, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()["seq"]


async def scenario(instances: list[RelayProcess]) -> tuple[dict, dict]:
    """Per prediction: one subscriber connected before any delivery, one joining after the third,
    each on its own instance; deliveries go round-robin over all instances."""
    urls = [i.url for i in instances]
    counter = iter(range(10**6))
    received: dict[str, list[list[dict]]] = {}

    async def one(n: int, http: httpx.AsyncClient) -> None:
        prediction_id = new_prediction_id()
        early = asyncio.create_task(watch(instances[n % INSTANCES], prediction_id))
        await asyncio.sleep(0.3)  # let the early subscriber's handshake finish
        late = None
        for step, body in enumerate(lifecycle(prediction_id, ["succeeded", "failed", "canceled"][n % 3])):
            await deliver(http, urls, next(counter), body)
            if step == 2:
                late = asyncio.create_task(watch(instances[(n + 1) % INSTANCES], prediction_id))
        received[prediction_id] = list(await asyncio.gather(early, late))

    async with httpx.AsyncClient(timeout=30) as http:
        await asyncio.wait_for(asyncio.gather(*(one(n, http) for n in range(PREDICTIONS))), 60)
        stored = {}
        for prediction_id in received:
            page = await http.get(f"{urls[0]}/predictions/{prediction_id}/events", headers=admin_headers())
            stored[prediction_id] = page.json()["events"]
    return received, stored


def test_subscribers_on_any_instance_get_exactly_their_events_in_order(postgres):
    """Three instances, one database: no event missing, none twice, seq order, for everyone."""
    env = relay_env(postgres.new_database())
    instances = [RelayProcess(env) for _ in range(INSTANCES)]
    try:
        with ThreadPoolExecutor(INSTANCES) as pool:
            list(pool.map(RelayProcess.start, instances))
        received, stored = asyncio.run(scenario(instances))
    finally:
        for instance in instances:
            instance.stop()
    assert len(received) == PREDICTIONS
    for prediction_id, streams in received.items():
        expected = [(e["seq"], e["webhook_id"], e["status"]) for e in stored[prediction_id]]
        assert len(expected) >= 5 and expected[-1][2] in ("succeeded", "failed", "canceled")
        assert [s for s, _, _ in expected] == sorted({s for s, _, _ in expected})
        for events in streams:
            assert [(e["seq"], e["webhook_id"], e["status"]) for e in events] == expected
            assert all(e["prediction_id"] == prediction_id for e in events)
