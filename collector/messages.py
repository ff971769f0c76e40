"""What arrives on the lab's topics, checked and sorted: a record to store, or a dead letter with its reason.

Results and sample summaries are validated against the JSON Schemas the device side documents
(``edge/schemas``), so that the collector and the devices cannot drift apart silently. Nothing that
fails is dropped: it becomes a ``DeadLetter`` that the store keeps with the topic and the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import fastjsonschema
from jsonschema import Draft202012Validator, FormatChecker

from edge.topics import BY_NAME, schema

STATUS_VALUES = {"online", "offline"}


@dataclass(frozen=True)
class Message:
    """A message that passed its checks. ``kind``: results, samples, status, stats or reviews."""

    kind: str
    topic: str
    device_id: str
    body: dict | str
    raw: bytes


@dataclass(frozen=True)
class DeadLetter:
    topic: str
    reason: str
    raw: bytes


@lru_cache(maxsize=None)
def validator(name: str) -> Draft202012Validator:
    """The validator of ``edge/schemas/<name>.schema.json`` (read once; ``edge``'s package only, no OpenCV)."""
    return Draft202012Validator(schema(name), format_checker=FormatChecker())


UUID = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"


@lru_cache(maxsize=None)
def fast_check(name: str):
    """The same schema compiled to Python by fastjsonschema: about 40 µs a result where jsonschema takes
    1-2 ms, which alone would cap the collector below 1,000 results/s. It only says yes or no; the
    reason for a no comes from jsonschema (``validator``), which dead letters are rare enough to afford."""
    return fastjsonschema.compile(schema(name), formats={"uuid": UUID})


def subscriptions(prefix: str) -> list[str]:
    """The topic filters the collector subscribes to (QoS 1); ``cmd`` and ``reply`` are not the lab's data."""
    return [f"{prefix}/+/results", f"{prefix}/+/samples/#", f"{prefix}/+/status", f"{prefix}/+/stats", f"{prefix}/+/reviews"]


def _schema_problem(name: str, body: object) -> str | None:
    try:
        fast_check(name)(body)
        return None
    except fastjsonschema.JsonSchemaException as refusal:
        fast = refusal
    error = next(iter(sorted(validator(name).iter_errors(body), key=lambda e: list(e.absolute_path))), None)
    if error is None:  # a format jsonschema does not check without extra packages (date-time): fastjsonschema's words
        where = (fast.name or "data").removeprefix("data").lstrip(".").replace(".", "/") or "(top level)"
        return f"does not match edge/schemas/{name}.schema.json at {where}: {fast.message[:200]}"
    where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
    return f"does not match edge/schemas/{name}.schema.json at {where}: {error.message[:200]}"


def classify(topic: str, payload: bytes, prefix: str) -> Message | DeadLetter:
    """Check one message: its topic names a device and a kind, its payload is what that kind must be."""
    parts = topic[len(prefix) + 1:].split("/") if topic.startswith(prefix + "/") else []
    if len(parts) < 2:
        return DeadLetter(topic, f"topic is not under {prefix}/<device_id>/", payload)
    device_id, kind = parts[0], parts[1]
    if kind == "status" and len(parts) == 2:
        text = payload.decode("utf-8", "replace")
        if text not in STATUS_VALUES:
            return DeadLetter(topic, f"status must be 'online' or 'offline', got {text[:40]!r}", payload)
        return Message("status", topic, device_id, text, payload)
    try:
        body = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return DeadLetter(topic, f"not JSON ({error})", payload)
    if kind in ("results", "reviews") and len(parts) == 2 or kind == "samples" and len(parts) >= 3:
        problem = _schema_problem(BY_NAME[kind].schema, body)
    elif kind == "stats" and len(parts) == 2:
        problem = None if isinstance(body, dict) else "stats must be a JSON object"
    else:
        return DeadLetter(topic, f"unknown topic kind {'/'.join(parts[1:])!r}", payload)
    if problem:
        return DeadLetter(topic, problem, payload)
    if isinstance(body, dict) and body.get("device_id", device_id) != device_id:
        return DeadLetter(topic, f"payload device_id {body['device_id']!r} differs from the topic's {device_id!r}", payload)
    return Message(kind, topic, device_id, body, payload)
