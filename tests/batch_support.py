"""Helpers shared by the batch tests and the batch bench: submitting and waiting for batches."""

from __future__ import annotations

import time
from typing import Any

import httpx

from .fake_replicate import QWEN, FakeReplicate
from .support import relay_cli

__all__ = ["relay_cli"]  # the batch tests take it from here with the batch helpers

CREATES = r"/models/.*/predictions"


def qwen_inputs(count: int) -> list[dict[str, Any]]:
    return [{"image": [f"https://example.com/{i}.png"], "prompt": f"make {i} blue"} for i in range(count)]


def submit(api: httpx.Client, count: int, concurrency: int, **extra: Any) -> dict[str, Any]:
    body = {"model": QWEN, "inputs": qwen_inputs(count), "concurrency": concurrency, **extra}
    response = api.post("/api/batches", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def batch_of(api: httpx.Client, batch_id: str, **params: Any) -> dict[str, Any]:
    response = api.get(f"/api/batches/{batch_id}", params={"limit": 1000, **params})
    assert response.status_code == 200, response.text
    return response.json()


def wait_until_ended(api: httpx.Client, batch_id: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        batch = batch_of(api, batch_id)
        if batch["status"] != "running":
            return batch
        assert time.monotonic() < deadline, f"the batch did not end: {batch['counts']} held={batch['held']}"
        time.sleep(0.1)


def creates(fake: FakeReplicate) -> list[dict[str, Any]]:
    """The create requests Replicate accepted since its reset (scripted refusals excluded)."""
    return list(fake.created.values())


def wait_for(condition: Any, timeout: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
