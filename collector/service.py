"""``collect run``: subscribe with a persistent session and store in batches, acknowledging after the commit.

The session is persistent (fixed client id, clean_session=False, QoS 1): while the collector is down
the broker queues what the devices publish, and delivers it at the next start. Acknowledgements are
manual (paho's ``manual_ack``): a message is acknowledged (PUBACK) only once its batch is committed,
so a crash or a kill between receipt and commit makes the broker send it again instead of losing it.
Redeliveries are harmless: the store ignores a ``message_id`` it has.
"""

from __future__ import annotations

import logging
import queue
import signal
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from collector.config import CollectorConfig
from collector.messages import DeadLetter, Message, classify, subscriptions
from collector.store import Store, open_store
from edge.errors import UserError
from edge.notify import notify, watchdog_interval

log = logging.getLogger(__name__)

#: CONNACK reasons that retrying cannot fix: stop and tell the user.
FATAL_REASONS = {"Bad user name or password", "Not authorized", "Client identifier not valid", "Banned"}
#: How long a batch waits for one more message before it is committed: under load messages come faster;
#: when the broker waits for our acknowledgements (its in-flight window is full) waiting longer is useless.
LINGER_S = 0.002


class BrokerUnreachable(Exception):
    """The broker cannot be reached now; a later start may succeed (exit status 1, systemd restarts)."""


class Collector:
    def __init__(self, config: CollectorConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self.received: queue.Queue[tuple[int, int, Message | DeadLetter]] = queue.Queue()
        self.stop_event = threading.Event()
        self.connected = threading.Event()
        self.fatal: str | None = None
        self.stored = self.repeated = self.dead = 0
        self._last_sequence: dict[str, int] = {}
        self.client = self._make_client()

    def _make_client(self) -> mqtt.Client:
        c = self.config.mqtt
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=c.client_id, clean_session=False,
                             protocol=mqtt.MQTTv311, manual_ack=True)
        if c.username:
            client.username_pw_set(c.username, c.password())
        client.reconnect_delay_set(1, int(max(1, c.reconnect_max_s)))
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    # -- paho callbacks (network thread) ------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        c = self.config.mqtt
        if reason_code.is_failure:
            reason = str(reason_code)
            if reason in FATAL_REASONS:
                self.fatal = (f"broker {c.host}:{c.port} refused the collector: {reason}; "
                              "check mqtt.username, mqtt.password_file and the broker's ACL")
                client.disconnect()
            else:
                log.warning("broker %s:%d refused the connection: %s; retrying", c.host, c.port, reason)
            return
        # With a kept session the broker remembers the subscriptions; subscribing again is harmless and
        # covers a broker that lost its state.
        client.subscribe([(topic, 1) for topic in subscriptions(c.topic_prefix)])
        log.info("connected to %s:%d (%s session)", c.host, c.port, "resumed" if flags.session_present else "new")
        self.connected.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        """The broker's SUBACK: from here on every result published is queued for this session (a
        result published before it, to a session that never subscribed, is not)."""
        refused = [str(code) for code in reason_codes if code.is_failure]
        if refused:
            log.warning("the broker refused a subscription (%s); check its ACL for the collector", ", ".join(refused))
        else:
            log.info("subscribed (QoS 1, %d topic filters)", len(reason_codes))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if not self.stop_event.is_set() and not self.fatal:
            c = self.config.mqtt
            log.warning("disconnected from %s:%d (%s); reconnecting with backoff, the broker queues meanwhile",
                        c.host, c.port, reason_code)

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        item = classify(message.topic, message.payload, self.config.mqtt.topic_prefix)
        self.received.put((message.mid, message.qos, item))

    # -- writing (our thread) -------------------------------------------------------------------
    def _next_batch(self) -> list[tuple[int, int, Message | DeadLetter]]:
        """The messages of one batch: up to batch.max_messages, for at most batch.max_delay_ms."""
        try:
            batch = [self.received.get(timeout=0.2)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.config.batch.max_delay_ms / 1000
        while len(batch) < self.config.batch.max_messages:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(self.received.get(timeout=min(remaining, LINGER_S)))
            except queue.Empty:
                break
        return batch

    def write_pending(self) -> int:
        """Store one batch, then acknowledge it; returns how many messages it held."""
        batch = self._next_batch()
        if not batch:
            return 0
        items = [item for _, _, item in batch]
        added = self.store.write(items)
        for mid, qos, _ in batch:
            if qos > 0:
                self.client.ack(mid, qos)
        self._account(items, added)
        return len(batch)

    def _account(self, items: list[Message | DeadLetter], added: int) -> None:
        """Counters, and a warning line for what a person must know now: dead letters and sequence jumps."""
        dead = [item for item in items if isinstance(item, DeadLetter)]
        self.dead += len(dead)
        for letter in dead:
            log.warning("dead letter from %s: %s", letter.topic, letter.reason)
        results = [item for item in items if isinstance(item, Message) and item.kind == "results"]
        self.stored += added - len(dead)
        for item in results:
            sequence, last = item.body["sequence"], self._last_sequence.get(item.device_id)
            if last is not None and sequence > last + 1:
                log.warning("device %s: sequence jumped from %d to %d (%d not received yet; `collect gaps` keeps count)",
                            item.device_id, last, sequence, sequence - last - 1)
            if last is None or sequence > last:
                self._last_sequence[item.device_id] = sequence

    # -- running --------------------------------------------------------------------------------
    def connect(self) -> None:
        """Connect and wait for the broker's answer; one-line errors for the broker down or refusing us."""
        c = self.config.mqtt
        try:
            self.client.connect(c.host, c.port, keepalive=c.keepalive_s)
        except OSError as error:
            raise BrokerUnreachable(f"cannot reach the broker at {c.host}:{c.port} ({error.strerror or error}); "
                                    "start mosquitto there or fix mqtt.host and mqtt.port") from None
        self.client.loop_start()
        deadline = time.monotonic() + c.connect_timeout_s
        while not self.connected.is_set() and not self.fatal and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.fatal:
            self.client.loop_stop()
            raise UserError(self.fatal)
        if not self.connected.is_set():
            self.client.loop_stop()
            raise BrokerUnreachable(f"the broker at {c.host}:{c.port} did not answer within {c.connect_timeout_s:g} s; "
                                    "is it an MQTT broker, and is it overloaded?")

    def run(self) -> int:
        self.connect()
        notify("READY=1")
        heartbeat = watchdog_interval()
        next_beat = time.monotonic()
        while not self.stop_event.is_set():
            self.write_pending()
            if self.fatal:
                raise UserError(self.fatal)
            if heartbeat and time.monotonic() >= next_beat:
                notify("WATCHDOG=1")
                next_beat = time.monotonic() + heartbeat
        notify("STOPPING=1")
        while not self.received.empty():  # what arrived before the stop is committed and acknowledged
            self.write_pending()
        self.client.disconnect()
        self.client.loop_stop()
        log.info("stopped: %d stored, %d dead letters", self.stored, self.dead)
        return 0


def run(config: CollectorConfig) -> int:
    """The service: until SIGTERM or SIGINT. Exit 1 if the broker cannot be reached (systemd retries)."""
    store = open_store(config.database)
    collector = Collector(config, store)
    previous = {signum: signal.signal(signum, lambda *_: collector.stop_event.set()) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        return collector.run()
    except BrokerUnreachable as error:
        print(f"collect: error: {error}", file=sys.stderr)
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        store.close()
