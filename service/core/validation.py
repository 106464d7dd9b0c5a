"""Checking a create request before anything is sent to Replicate.

Every refusal is a 400 INVALID_REQUEST naming the field and the rule it broke. Inputs are
checked field by field only for models Relay knows (`qwen/qwen-image-edit-plus`); any other
model's `input` passes through as long as it is an object.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from service.core.errors import InvalidRequest

QWEN_IMAGE_EDIT_PLUS = "qwen/qwen-image-edit-plus"
WEBHOOK_EVENTS = ("start", "output", "logs", "completed")
REQUEST_FIELDS = {"version", "model", "input", "webhook", "webhook_events_filter"}
MODEL_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
PREDICTION_ID = re.compile(r"^[A-Za-z0-9_-]{1,100}$")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _https_url(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    parts = urlsplit(value)
    return parts.scheme == "https" and bool(parts.hostname)


def _image(value: Any) -> str | None:
    if not isinstance(value, list) or not 1 <= len(value) <= 4:
        return "must be a list of 1 to 4 image URLs"
    if not all(_https_url(item) for item in value):
        return "must hold only https:// URLs"
    return None


def _text(maximum: int, minimum: int = 0) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not isinstance(value, str) or not minimum <= len(value) <= maximum:
            return f"must be a string of {minimum} to {maximum} characters"
        return None

    return check


def _integer(minimum: int | None = None, maximum: int | None = None) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if minimum is None:
            return None if _is_int(value) else "must be an integer"
        if not _is_int(value) or not minimum <= value <= maximum:
            return f"must be an integer from {minimum} to {maximum}"
        return None

    return check


def _number(minimum: float, maximum: float) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not _is_number(value) or not minimum <= value <= maximum:
            return f"must be a number from {minimum} to {maximum}"
        return None

    return check


QWEN_RULES: dict[str, Callable[[Any], str | None]] = {
    "image": _image,
    "prompt": _text(1000, minimum=1),
    "negative_prompt": _text(1000),
    "num_outputs": _integer(1, 4),
    "guidance_scale": _number(0.1, 20),
    "num_inference_steps": _integer(1, 500),
    "seed": _integer(),
}
QWEN_REQUIRED = ("image", "prompt")


def check_qwen_input(values: dict[str, Any]) -> None:
    for name in QWEN_REQUIRED:
        if name not in values:
            raise InvalidRequest(f"input.{name} is required for {QWEN_IMAGE_EDIT_PLUS}")
    for name, rule in QWEN_RULES.items():
        if name in values and (problem := rule(values[name])) is not None:
            raise InvalidRequest(f"input.{name} {problem}")


def check_prediction_id(prediction_id: str) -> str:
    if not PREDICTION_ID.fullmatch(prediction_id):  # `$` alone would let a trailing newline in
        raise InvalidRequest("the prediction id must be 1 to 100 letters, digits, '_' or '-'")
    return prediction_id


def _target(body: dict[str, Any]) -> tuple[str, str]:
    """(upstream path, model name or '') for `version` or `model`, exactly one of them."""
    version, model = body.get("version"), body.get("model")
    if (version is None) == (model is None):
        raise InvalidRequest("give exactly one of version (a version id) or model (owner/name)")
    if version is not None:
        if not isinstance(version, str) or not version.strip():
            raise InvalidRequest("version must be a non-empty string")
        named_model = version.partition(":")[0] if ":" in version else ""
        return "predictions", named_model
    if not isinstance(model, str) or not MODEL_NAME.match(model):
        raise InvalidRequest("model must be owner/name, for example qwen/qwen-image-edit-plus")
    return f"models/{model}/predictions", model


def _events_filter(value: Any) -> list[str]:
    if value is None:
        return list(WEBHOOK_EVENTS)
    if not isinstance(value, list) or not value or not all(v in WEBHOOK_EVENTS for v in value):
        allowed = ", ".join(WEBHOOK_EVENTS)
        raise InvalidRequest(f"webhook_events_filter must be a non-empty list drawn from {allowed}")
    return [event for event in WEBHOOK_EVENTS if event in value]


def create_request(body: Any, webhook_url: str) -> tuple[str, dict[str, Any]]:
    """The upstream path and payload for a create, webhook pointed at Relay; 400 if invalid."""
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object with version or model, and input")
    unknown = sorted(set(body) - REQUEST_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown field(s) {unknown}; allowed: {sorted(REQUEST_FIELDS)}")
    if body.get("webhook") not in (None, webhook_url):
        raise InvalidRequest("webhook cannot be changed: Relay always receives the webhooks itself")
    path, model = _target(body)
    values = body.get("input")
    if not isinstance(values, dict):
        raise InvalidRequest("input must be a JSON object")
    if model == QWEN_IMAGE_EDIT_PLUS:
        check_qwen_input(values)
    payload = {
        "input": values,
        "webhook": webhook_url,
        "webhook_events_filter": _events_filter(body.get("webhook_events_filter")),
    }
    if body.get("version") is not None:
        payload["version"] = body["version"]
    return path, payload
