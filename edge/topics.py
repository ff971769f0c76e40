"""The MQTT surface in one place: every topic a device uses, its QoS and retain flag, and the JSON
Schema of its payload (``edge/schemas/``).

The prefix is applied here and nowhere else: the agent, the publisher and the demo ask ``Topics``
for a topic, so a configured ``mqtt.topic_prefix`` cannot be honoured by one and forgotten by
another. The README's topic table is checked against ``SURFACE`` by a test. Light on purpose (no
OpenCV, no paho) so that the collector and other subscribers can read it too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

DEFAULT_PREFIX = "leukoscope"


@dataclass(frozen=True)
class TopicSpec:
    """One topic under ``<prefix>/<device_id>/``: ``name`` may hold one ``<placeholder>`` level."""

    name: str
    qos: int
    retained: bool
    schema: str  #: ``edge/schemas/<schema>.schema.json``
    what: str

    @property
    def schema_path(self) -> str:
        return f"edge/schemas/{self.schema}.schema.json"


#: Everything a device publishes or listens to, in the README's order.
SURFACE: tuple[TopicSpec, ...] = (
    TopicSpec("status", 1, True, "status", "`online` (once the broker has its command subscription: a command sent on it is heard), or `offline` (on a clean stop, or the broker's last will)"),
    TopicSpec("results", 1, False, "frame-result", "one per analysed frame"),
    TopicSpec("samples/<sample_id>", 1, True, "sample-summary", "running per-sample tally, `final: true` when closed"),
    TopicSpec("stats", 0, False, "stats", "health: fps, stage latencies, queue depth, outbox backlog, dropped counts"),
    TopicSpec("cmd/<name>", 1, False, "command", "commands to the device (below)"),
    TopicSpec("reply/<name>", 1, False, "command-reply", "the answer to each command (or to `reply_to` given in the command)"),
    TopicSpec("reviews", 1, False, "review-label", "a person's label of a cell on the local page, with its provenance"),
)
BY_NAME = {spec.name.split("/")[0]: spec for spec in SURFACE}


class Topics:
    """The topics of one device: ``<prefix>/<device_id>/...``."""

    def __init__(self, prefix: str, device_id: str) -> None:
        self.prefix = prefix
        self.device_id = device_id
        self.base = f"{prefix}/{device_id}"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def results(self) -> str:
        return f"{self.base}/results"

    @property
    def stats(self) -> str:
        return f"{self.base}/stats"

    @property
    def commands(self) -> str:
        """The filter the device subscribes to for its commands."""
        return f"{self.base}/cmd/#"

    @property
    def reviews(self) -> str:
        return f"{self.base}/reviews"

    def sample(self, sample_id: str) -> str:
        return f"{self.base}/samples/{sample_id}"

    def command(self, name: str) -> str:
        return f"{self.base}/cmd/{name}"

    def reply(self, name: str) -> str:
        return f"{self.base}/reply/{name}"

    def command_name(self, topic: str) -> str:
        """The command's name in one of this device's ``cmd/<name>`` topics (the topic itself otherwise)."""
        head = f"{self.base}/cmd/"
        return topic[len(head):] if topic.startswith(head) else topic

    def everything(self) -> str:
        """The filter for every device's topics under this prefix (what a watcher subscribes to)."""
        return f"{self.prefix}/#"

    def kind(self, topic: str) -> str | None:
        """Which entry of ``SURFACE`` a topic of any device under this prefix is (``results``, ``samples`` ...)."""
        parts = topic[len(self.prefix) + 1:].split("/") if topic.startswith(self.prefix + "/") else []
        if len(parts) < 2 or parts[1] not in BY_NAME:
            return None
        placeholder = "/" in BY_NAME[parts[1]].name
        return parts[1] if (len(parts) > 2) == placeholder else None


@lru_cache(maxsize=None)
def schema(name: str) -> dict:
    """The JSON Schema ``edge/schemas/<name>.schema.json`` (package data: works from a wheel too)."""
    return json.loads(resources.files("edge").joinpath("schemas", f"{name}.schema.json").read_text())
