"""A process that publishes from the project's own outbox, for tests that must SIGKILL the publisher.

    python -m tests.publishing_child OUTBOX PORT

Line protocol on stdin/stdout, so that the test decides when the network is cut:
prints ``ready`` once connected (the ``online`` status and three QoS 0 ``stats`` are sent by then);
on ``store N`` it moves paho's message-id counter to just before the 65,535 wrap, stores N results
and prints ``stored <message_id> ...``; then it keeps publishing until it is killed, and on each
``flush`` it removes the rows it takes as acknowledged and prints ``pending <rows left>``.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

from edge.config import MQTTConfig
from edge.outbox import Outbox
from edge.publisher import Publisher

TOPIC = "leukoscope/wrap/results"


def main(outbox_path: str, port: str) -> None:
    outbox = Outbox(Path(outbox_path))
    publisher = Publisher(MQTTConfig(host="127.0.0.1", port=int(port)), outbox, "wrap")
    publisher.start()
    if not publisher.connected.wait(10):
        sys.exit(f"publishing_child: no connection to 127.0.0.1:{port}")
    for _ in range(3):  # like the agent's periodic stats: QoS 0, not from the outbox
        publisher.publish_now(publisher.topics.stats, b"{}", qos=0)
    print("ready", flush=True)
    command, count = sys.stdin.readline().split()
    assert command == "store"
    # The ids of the status and stats messages above come round again after the wrap.
    publisher.client._last_mid = 65533
    stored = []
    for _ in range(int(count)):
        message_id = str(uuid.uuid4())
        outbox.put(TOPIC, json.dumps({"message_id": message_id}).encode())
        stored.append(message_id)
    publisher.notify()
    print("stored", *stored, flush=True)
    for line in sys.stdin:  # until it is killed
        if line.strip() == "flush":
            publisher._flush_acks()  # what the sending thread does every turn: drop acknowledged rows
            print("pending", len(outbox), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
