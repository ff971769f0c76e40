"""``edge check``: the self-test of a device before it is trusted, one line per check.

Kept apart from the agent: it borrows the agent's parts (config, bundle, source, broker client)
but runs none of its threads.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from edge.agent import open_frames
from edge.classifier import Classifier
from edge.config import AgentConfig, load_config
from edge.errors import UserError
from edge.outbox import Outbox


def check(config_path: Path) -> int:
    """Self-test; one line per failure, exit status 1 if any."""
    failures: list[str] = []
    try:
        config = load_config(config_path)
    except UserError as error:
        print(f"FAIL config: {error}")
        return 1
    print(f"ok   config {config_path}")
    try:
        classifier = Classifier(config.classifier.bundle, num_threads=config.classifier.num_threads,
                                edgetpu=config.classifier.edgetpu, cpu_fallback=config.classifier.cpu_fallback)
        print(f"ok   model bundle {config.classifier.bundle} ({'Edge TPU' if classifier.edgetpu else 'CPU'})")
    except UserError as error:
        failures.append(f"model: {error}")
    stop = threading.Event()
    try:
        frame = next(iter(open_frames(config, stop.is_set, lambda reason: (failures.append(f"camera: {reason}"), stop.set()))), None)
        if frame is not None and frame.image is not None:
            print(f"ok   source {config.source.type}: {frame.image.shape[1]}x{frame.image.shape[0]} frame")
        elif not any(f.startswith("camera") for f in failures):
            failures.append(f"camera: source {config.source.type} delivered no readable frame")
    except UserError as error:
        failures.append(f"camera: {error}")
    if config.mqtt.enabled:
        failures.extend(_check_broker(config))
    try:
        Outbox(config.outbox.path, max_messages=config.outbox.max_messages).close()
        print(f"ok   outbox {config.outbox.path}")
    except UserError as error:
        failures.append(f"outbox: {error}")
    for failure in failures:
        print(f"FAIL {failure}")
    return 1 if failures else 0


def _check_broker(config: AgentConfig) -> list[str]:
    from edge.publisher import Publisher

    try:
        probe = Publisher(config.mqtt.model_copy(update={"client_id": f"leukoscope-check-{config.device.id}"}),
                          Outbox(":memory:"), config.device.id)
    except UserError as error:
        return [f"broker: {error}"]
    probe.client.on_connect_fail = lambda client, userdata: setattr(probe, "last_error", "connection failed")
    try:
        probe.client.connect(config.mqtt.host, config.mqtt.port, keepalive=10)
    except (OSError, ValueError) as error:
        return [f"broker: cannot reach {config.mqtt.host}:{config.mqtt.port} ({error}); is the broker running and the port open?"]
    probe.client.loop_start()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not probe.connected.is_set() and not probe.last_error:
        time.sleep(0.05)
    connected = probe.connected.is_set()
    probe.stop(offline=False)
    if not connected:
        return [f"broker: {probe.fatal or probe.last_error or f'no answer from {config.mqtt.host}:{config.mqtt.port} within 5 s'}"]
    print(f"ok   broker {config.mqtt.host}:{config.mqtt.port}")
    return []
