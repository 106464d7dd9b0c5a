"""Checking a create request before anything is sent to Replicate.

Every refusal is a 400 INVALID_REQUEST naming the field and the rule it broke. Inputs are
checked field by field for the models in `MODELS` (`qwen/qwen-image-edit-plus`), whichever
form names them: `model: owner/name`, `version: owner/name`, `version: owner/name:id`, or a bare
`version: id` that Relay knows to be that model. Any other model's `input` passes through as
long as it is an object.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from service.core.errors import InvalidRequest

QWEN_IMAGE_EDIT_PLUS = "qwen/qwen-image-edit-plus"
WEBHOOK_EVENTS = ("start", "output", "logs", "completed")
REQUEST_FIELDS = {"version", "model", "input", "webhook", "webhook_events_filter", "cache"}
# The patterns are plain ASCII so that /openapi.json states them exactly (core/openapi.py).
NAME_PART = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
MODEL_PATTERN = rf"^{NAME_PART}/{NAME_PART}$"
PREDICTION_ID_PATTERN = r"^[A-Za-z0-9_-]{1,100}$"
# Replicate's version ids are 64 hex digits; letters, digits, "-" and "_" are allowed as ids.
ID_PART = r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}"
VERSION_ID_PATTERN = rf"^{ID_PART}$"
VERSION_PATTERN = rf"^(?:{NAME_PART}/{NAME_PART}(?::{ID_PART})?|{ID_PART})$"
# Always `fullmatch`: with `match`, `$` also matches before a trailing newline, so
# "qwen/qwen-image-edit-plus\n" would name no known model and skip its input checks.
MODEL_NAME = re.compile(MODEL_PATTERN)
PREDICTION_ID = re.compile(PREDICTION_ID_PATTERN)
VERSION_ID = re.compile(VERSION_ID_PATTERN)


# The deepest nesting of arrays/objects a delivered body may have (ingest refuses deeper ones:
# json's recursion limit depends on the caller's stack). A create's input sits one level down
# in every delivery of its prediction, so it may nest one level less.
MAX_DEPTH = 128


def nesting_depth(value: Any) -> int:
    """How deeply arrays and objects nest in a parsed JSON value (iteratively: no recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def is_json_integer(value: Any) -> bool:
    """JSON has one number type: 4.0 is the integer 4 (as JSON Schema's "integer" says), 4.5 is not."""
    if isinstance(value, float):
        return value.is_integer()
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _https_url(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        parts = urlsplit(value)
        return parts.scheme == "https" and bool(parts.hostname)
    except ValueError:  # an unbalanced "[" in the host (an IPv6 literal) is not a URL
        return False


Check = Callable[[Any], str | None]


@dataclass(frozen=True)
class Rule:
    """One input field's check, and the same rule as JSON Schema (for /openapi.json)."""

    check: Check
    schema: dict[str, Any]


def _image_check(value: Any) -> str | None:
    if not isinstance(value, list) or not 1 <= len(value) <= 4:
        return "must be a list of 1 to 4 image URLs"
    if not all(_https_url(item) for item in value):
        return "must hold only https:// URLs"
    return None


# What the schema promises is accepted: https, a plain host name or address, a port, then anything.
HTTPS_URL_PATTERN = r"^https://[A-Za-z0-9._~-]+(?::[0-9]{1,5})?(?:[/?#]\S*)?$"
IMAGES = Rule(
    _image_check,
    {
        "type": "array",
        "minItems": 1,
        "maxItems": 4,
        "items": {"type": "string", "pattern": HTTPS_URL_PATTERN},
    },
)


def _text(maximum: int, minimum: int = 0) -> Rule:
    def check(value: Any) -> str | None:
        if not isinstance(value, str) or not minimum <= len(value) <= maximum:
            return f"must be a string of {minimum} to {maximum} characters"
        return None

    return Rule(check, {"type": "string", "minLength": minimum, "maxLength": maximum})


def _integer(minimum: int | None = None, maximum: int | None = None) -> Rule:
    def check(value: Any) -> str | None:
        if minimum is None or maximum is None:
            return None if is_json_integer(value) else "must be an integer"
        if not is_json_integer(value) or not minimum <= value <= maximum:
            return f"must be an integer from {minimum} to {maximum}"
        return None

    bounds = {} if minimum is None else {"minimum": minimum, "maximum": maximum}
    return Rule(check, {"type": "integer", **bounds})


def _number(minimum: float, maximum: float) -> Rule:
    def check(value: Any) -> str | None:
        if not _is_number(value) or not minimum <= value <= maximum:
            return f"must be a number from {minimum} to {maximum}"
        return None

    return Rule(check, {"type": "number", "minimum": minimum, "maximum": maximum})


@dataclass(frozen=True)
class ModelSchema:
    """What Relay checks in `input` for one model, before any upstream call.

    `versions` are version ids known to be this model, so that a bare id in `version` is checked
    too; Relay also learns ids from Replicate's answers (`upstream.versions`), so none need be
    listed here for the check to apply once the model has been used through Relay.
    """

    name: str
    rules: Mapping[str, Rule]
    required: tuple[str, ...] = ()
    versions: frozenset[str] = frozenset()

    def input_schema(self) -> dict[str, Any]:
        """The rules as JSON Schema, for the OpenAPI description of a create."""
        properties = {name: rule.schema for name, rule in self.rules.items()}
        return {"type": "object", "required": list(self.required), "properties": properties}

    def check(self, values: Mapping[str, Any]) -> None:
        for name in self.required:
            if name not in values:
                raise InvalidRequest(f"input.{name} is required for {self.name}")
        for name, rule in self.rules.items():
            if name in values and (problem := rule.check(values[name])) is not None:
                raise InvalidRequest(f"input.{name} {problem}")


# The models whose input Relay validates: a second model is one more entry.
MODELS: dict[str, ModelSchema] = {
    schema.name: schema
    for schema in (
        ModelSchema(
            name=QWEN_IMAGE_EDIT_PLUS,
            rules={
                "image": IMAGES,
                "prompt": _text(1000, minimum=1),
                "negative_prompt": _text(1000),
                "num_outputs": _integer(1, 4),
                "guidance_scale": _number(0.1, 20),
                "num_inference_steps": _integer(1, 500),
                "seed": _integer(),
            },
            required=("image", "prompt"),
        ),
    )
}


@dataclass(frozen=True)
class Target:
    """What a create names: the upstream path, the model (`owner/name`) when the request says
    it, and the version id when it pins one (`owner/name:id` or a bare id)."""

    path: str
    model: str | None
    version_id: str | None

    @property
    def cache_key(self) -> str:
        """The version id when pinned, else the model: what decides which code runs."""
        return self.version_id or self.model or ""


def parse_version(version: str) -> tuple[str | None, str | None]:
    """(model, version id) of Replicate's three `version` forms: owner/name, owner/name:id, id."""
    name, colon, version_id = version.partition(":")
    if colon:
        if not MODEL_NAME.fullmatch(name) or not VERSION_ID.fullmatch(version_id):
            raise InvalidRequest("version must be owner/name, owner/name:version_id or a version id")
        return name, version_id
    if "/" in version:
        if not MODEL_NAME.fullmatch(version):
            raise InvalidRequest("version must be owner/name, owner/name:version_id or a version id")
        return version, None
    if not VERSION_ID.fullmatch(version):
        raise InvalidRequest("version must be owner/name, owner/name:version_id or a version id")
    return None, version


def known_model(target: Target, learned: Mapping[str, str]) -> ModelSchema | None:
    """The schema of the model a create names, directly or through a version id Relay knows
    (bare, or pinned after another `owner/name`: Replicate runs the version the id names)."""
    by_name = MODELS.get(target.model) if target.model is not None else None
    if by_name is not None or target.version_id is None:
        return by_name
    for schema in MODELS.values():
        if target.version_id in schema.versions:
            return schema
    return MODELS.get(learned.get(target.version_id, ""))


def _texts(value: Any) -> Iterator[str]:
    """Every key and string inside a JSON value. Iterative: nesting depth cannot overflow it."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, str):
            yield item


def _not_unicode(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return True
    return False


UNPAIRED = "holds an unpaired UTF-16 surrogate, which is not Unicode text"


def unpaired_surrogate(value: Any) -> str | None:
    """JSON can escape a lone surrogate (\\ud800); no UTF-8 request can carry it upstream."""
    return UNPAIRED if any(_not_unicode(text) for text in _texts(value)) else None


def unstorable(value: Any) -> str | None:
    """Why Postgres `jsonb` could not hold this JSON value (a NUL, or an unpaired UTF-16
    surrogate, in any key or string), else None."""
    for text in _texts(value):
        if "\x00" in text:
            return "holds a NUL character (\\u0000), which Postgres cannot store"
        if _not_unicode(text):
            return UNPAIRED
    return None


def check_prediction_id(prediction_id: str) -> str:
    if not PREDICTION_ID.fullmatch(prediction_id):  # `$` alone would let a trailing newline in
        raise InvalidRequest("the prediction id must be 1 to 100 letters, digits, '_' or '-'")
    return prediction_id


def target(body: Mapping[str, Any]) -> Target:
    """What `version` or `model` (exactly one of them) names; 400 if neither or malformed."""
    version, model = body.get("version"), body.get("model")
    if (version is None) == (model is None):
        raise InvalidRequest("give exactly one of version (a version id) or model (owner/name)")
    if version is not None:
        if not isinstance(version, str) or not version.strip():
            raise InvalidRequest("version must be a non-empty string")
        named, version_id = parse_version(version)
        return Target("predictions", named, version_id)
    if not isinstance(model, str) or not MODEL_NAME.fullmatch(model):
        raise InvalidRequest("model must be owner/name, for example qwen/qwen-image-edit-plus")
    return Target(f"models/{model}/predictions", model, None)


def _events_filter(value: Any) -> list[str]:
    if value is None:
        return list(WEBHOOK_EVENTS)
    if not isinstance(value, list) or not value or not all(v in WEBHOOK_EVENTS for v in value):
        allowed = ", ".join(WEBHOOK_EVENTS)
        raise InvalidRequest(f"webhook_events_filter must be a non-empty list drawn from {allowed}")
    return [event for event in WEBHOOK_EVENTS if event in value]


def pinned_version(body: Any) -> str | None:
    """The version id a create body pins, bare or as `owner/name:id`: the id whose model
    Relay may have learned."""
    version = body.get("version") if isinstance(body, dict) else None
    if not isinstance(version, str):
        return None
    version_id = version.partition(":")[2] if ":" in version else version
    return version_id if VERSION_ID.fullmatch(version_id) else None


def create_request(
    body: Any, webhook_url: str, learned: Mapping[str, str] | None = None
) -> tuple[Target, dict[str, Any]]:
    """The target and upstream payload for a create, webhook pointed at Relay; 400 if invalid.

    `learned` maps bare version ids to models (Relay's memory of Replicate's answers), so a bare
    id of a known model is validated like `model` and `owner/name:id`.
    """
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object with version or model, and input")
    unknown = sorted(set(body) - REQUEST_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown field(s) {unknown}; allowed: {sorted(REQUEST_FIELDS)}")
    if "webhook" in body:  # DESIGN: a field Relay owns is refused, even when it names Relay
        raise InvalidRequest(
            "webhook is Relay's own (RELAY_PUBLIC_URL/webhooks/replicate): leave it out of the request"
        )
    if not isinstance(body.get("cache", False), bool):
        raise InvalidRequest("cache must be true or false")
    found = target(body)
    values = body.get("input")
    if not isinstance(values, dict):
        raise InvalidRequest("input must be a JSON object")
    if (problem := unpaired_surrogate(values)) is not None:
        raise InvalidRequest(f"input {problem}")
    if nesting_depth(values) > MAX_DEPTH - 1:
        # Replicate would run it, but Relay would refuse every delivery of it (400).
        raise InvalidRequest(f"input nests arrays/objects deeper than {MAX_DEPTH - 1} levels")
    schema = known_model(found, learned or {})
    if schema is not None:
        schema.check(values)
    payload = {
        "input": values,
        "webhook": webhook_url,
        "webhook_events_filter": _events_filter(body.get("webhook_events_filter")),
    }
    if body.get("version") is not None:
        payload["version"] = body["version"]
    return found, payload
