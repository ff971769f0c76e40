"""MQTT publishing from the durable outbox (paho-mqtt 2.x, QoS 1, TLS, credentials).

The publisher never holds the only copy of a result: it reads rows from the outbox, publishes
them, and deletes a row only when the broker's PUBACK for it arrives. While connected, paho
retransmits unacknowledged messages itself after a reconnect; after a restart of the process
the outbox still holds every unacknowledged row and they are sent again, oldest first
(subscribers drop duplicates by ``message_id``).

A row is matched to its acknowledgement through the ``MQTTMessageInfo`` paho returned for that very
publish, never through the bare message id: ids wrap after 65,535 publishes and are shared with the
status, stats and command replies, so an id alone cannot say which message the broker acknowledged.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import threading
import time
from typing import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge.config_mqtt import MQTTConfig
from edge.errors import UserError
from edge.outbox import Outbox
from edge.topics import Topics

log = logging.getLogger(__name__)

#: CONNACK reasons that retrying cannot fix: stop and tell the user.
FATAL_REASONS = {"Bad user name or password", "Not authorized", "Client identifier not valid", "Banned"}
#: Failed connects are logged at once, then at most every 10 s, 20 s, ... up to 10 min: never silent, never a flood.
UNREACHABLE_LOG_FIRST_S, UNREACHABLE_LOG_MAX_S = 10.0, 600.0


def why_unreachable(host: str, port: int) -> str:
    """Why a connect failed, in words: paho's on_connect_fail does not say, so try the TCP part once more."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return "the TCP connection opens, but the MQTT (or TLS) handshake failed"
    except OSError as error:
        return error.strerror or str(error) or type(error).__name__


class _SocketErrors(logging.Handler):
    """Keeps paho's last socket error line ("failed to receive on socket: ...") to say why a connection ended.

    paho reports both a clean close by the broker and a reset as "Unspecified error"; only its log
    tells them apart, and the line then goes into the one disconnect warning.
    """

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.last: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "on socket" in message:
            self.last = message


def describe_disconnect(reason: str, socket_error: str | None, keepalive_s: int) -> str:
    """What happened, in words, from paho's on_disconnect reason and its last socket error."""
    if reason == "Keep alive timeout":
        return f"the broker stopped answering (nothing back within keepalive_s={keepalive_s})"
    if socket_error and f"[Errno {errno.ECONNRESET}]" in socket_error:
        # What a broker that stops with our data still unread sends; a firewall or NAT may too.
        return "the connection was reset (by the broker, or on the way)"
    if socket_error:
        return f"the connection failed ({socket_error})"
    if reason == "Unspecified error":  # paho's name for a connection that simply ended
        return "the broker closed the connection"
    return reason


def mqtt_client(c: MQTTConfig, client_id: str) -> mqtt.Client:
    """A paho client with the configured credentials and TLS, and nothing else (no will, no callbacks):
    the publisher's base, and the probe of ``edge check``, which must leave nothing on the broker."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311, clean_session=True)
    if c.username:
        client.username_pw_set(c.username, c.password())
    if c.tls:
        try:
            client.tls_set(ca_certs=str(c.tls.ca_file) if c.tls.ca_file else None,
                           certfile=str(c.tls.cert_file) if c.tls.cert_file else None,
                           keyfile=str(c.tls.key_file) if c.tls.key_file else None,
                           cert_reqs=ssl.CERT_NONE if c.tls.insecure_skip_verify else ssl.CERT_REQUIRED)
        except (OSError, ssl.SSLError) as error:
            raise UserError(f"mqtt.tls: certificate files cannot be loaded ({error}); check ca_file, cert_file and key_file") from None
        client.tls_insecure_set(c.tls.insecure_skip_verify)
    return client


class Publisher:
    def __init__(self, config: MQTTConfig, outbox: Outbox, device_id: str,
                 on_command: Callable[[str, bytes], None] = lambda topic, payload: None) -> None:
        self.config = config
        self.outbox = outbox
        self.topics = Topics(config.topic_prefix, device_id)
        self.on_command = on_command
        self.connected = threading.Event()
        self.fatal: str | None = None
        self.last_error: str | None = None
        self.published = 0
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inflight: dict[int, mqtt.MQTTMessageInfo] = {}  # outbox id -> paho's handle on that publish
        self._cursor = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._connect_failures = 0
        self._unreachable_since = time.monotonic()
        self._next_unreachable_log = 0.0  # the first failed connect is logged at once
        self._unreachable_log_every = UNREACHABLE_LOG_FIRST_S
        self.client = self._make_client(device_id)

    # -- set-up ---------------------------------------------------------------------------
    def _make_client(self, device_id: str) -> mqtt.Client:
        c = self.config
        client = mqtt_client(c, c.client_id or f"leukoscope-{device_id}")
        client.will_set(self.topics.status, b"offline", qos=1, retain=True)
        client.reconnect_delay_set(1, int(max(1, c.reconnect_max_s)))
        client.max_inflight_messages_set(c.max_inflight)
        client.max_queued_messages_set(0)
        paho_log = logging.Logger("paho", logging.ERROR)  # unregistered: it goes away with this publisher
        self._socket_errors = _SocketErrors()
        paho_log.addHandler(self._socket_errors)
        client.enable_logger(paho_log)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    # -- paho callbacks (network thread) --------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            reason = str(reason_code)
            self.last_error = f"broker {self.config.host}:{self.config.port} refused the connection: {reason}"
            if reason in FATAL_REASONS:
                self.fatal = self.last_error + " (check mqtt.username and the password file)"
                log.error("%s", self.fatal)
                client.disconnect()
            else:
                log.warning("%s", self.last_error)
            return
        log.info("connected to %s:%d", self.config.host, self.config.port)
        self.last_error = self._socket_errors.last = None
        self._connect_failures = 0
        # "online" only once the broker has the command subscription (``_on_subscribe``): a command sent
        # the moment a device shows online (`quantize publish` right after a start) must not be lost.
        client.subscribe(self.topics.commands, qos=1)
        with self._wake:
            self.connected.set()
            self._wake.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if any(code.is_failure for code in reason_codes):
            log.warning("broker %s:%d refused the subscription to %s (%s): commands will not reach this device; "
                        "check the broker's ACL for this user", self.config.host, self.config.port, self.topics.commands,
                        ", ".join(str(code) for code in reason_codes))
        client.publish(self.topics.status, b"online", qos=1, retain=True)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        socket_error, self._socket_errors.last = self._socket_errors.last, None
        if not self._stopping:
            what = describe_disconnect(str(reason_code), socket_error, self.config.keepalive_s)
            self.last_error = f"disconnected from {self.config.host}:{self.config.port}: {what}"
            log.warning("%s; reconnecting with backoff", self.last_error)
            # That line said it: the failed reconnects that follow are logged on the backoff, not at once.
            self._unreachable_since = time.monotonic()
            self._unreachable_log_every = UNREACHABLE_LOG_FIRST_S
            self._next_unreachable_log = self._unreachable_since + self._unreachable_log_every

    def _on_connect_fail(self, client, userdata) -> None:
        """A connect that did not get as far as a CONNACK (no broker there, network down, TLS)."""
        self._connect_failures += 1
        now = time.monotonic()
        if self._stopping or now < self._next_unreachable_log:
            return
        self.last_error = (f"cannot connect to broker {self.config.host}:{self.config.port} "
                           f"({why_unreachable(self.config.host, self.config.port)})")
        waited = now - self._unreachable_since
        again = f"{self._connect_failures} attempts in {waited:.0f} s; " if self._connect_failures > 1 else ""
        log.warning("%s; %sretrying with backoff (up to mqtt.reconnect_max_s=%g s); results wait in the outbox",
                    self.last_error, again, self.config.reconnect_max_s)
        self._next_unreachable_log = now + self._unreachable_log_every
        self._unreachable_log_every = min(2 * self._unreachable_log_every, UNREACHABLE_LOG_MAX_S)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        """Only a wake-up: which rows are acknowledged is read from their own MQTTMessageInfo.

        The mid may belong to a status, stats or reply message, or be one that an outbox row got
        again after the wrap; and paho marks the message published only after this returns.
        """
        with self._wake:
            self._wake.notify_all()

    def _on_message(self, client, userdata, message) -> None:
        try:
            self.on_command(message.topic, message.payload)
        except Exception:  # a bad command must never take the network thread down
            log.exception("command handler failed on %s", message.topic)

    # -- sending (our thread) ---------------------------------------------------------------
    def start(self) -> None:
        try:
            self.client.connect_async(self.config.host, self.config.port, keepalive=self.config.keepalive_s)
        except (OSError, ValueError) as error:
            raise UserError(f"mqtt.host {self.config.host!r} cannot be used ({error})") from None
        self.client.loop_start()
        self._thread = threading.Thread(target=self._send_loop, name="publisher", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        """A new row is in the outbox."""
        with self._wake:
            self._wake.notify_all()

    def _flush_acks(self) -> None:
        """Delete the rows whose own publish the broker acknowledged (PUBACK) from the outbox."""
        with self._wake:
            acked = [row for row, info in self._inflight.items() if info.is_published()]
            for row in acked:
                del self._inflight[row]
        if acked:
            self.outbox.ack(acked)
            self.published += len(acked)

    def _send_loop(self) -> None:
        window = max(1, self.config.max_inflight)
        while not self._stopping:
            self._flush_acks()
            with self._wake:
                if not self.connected.is_set() or len(self._inflight) >= window:
                    self._wake.wait(0.05)
                    continue
                room = window - len(self._inflight)
                cursor = self._cursor
            batch = self.outbox.pending(limit=room, after=cursor)
            if not batch:
                with self._wake:
                    self._wake.wait(0.05)
                continue
            for message in batch:
                info = self.client.publish(message.topic, message.payload, qos=message.qos, retain=message.retain)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    # A publish whose PUBACK cannot be followed: the cursor stays put and the row goes again.
                    # QUEUE_SIZE: not sent; after a wrap, its id is still held by an unacknowledged status or reply.
                    # NO_CONN: the connection died a moment ago. paho keeps this copy and sends it after the
                    # reconnect, but its MQTTMessageInfo then never reports the PUBACK (is_published() raises
                    # for that rc); the copy is a duplicate with the same message_id, which subscribers drop.
                    with self._wake:
                        self._wake.wait(0.05)  # let on_disconnect land: one such copy, not one per row
                    break
                with self._wake:
                    self._inflight[message.id] = info
                    self._cursor = message.id

    def publish_now(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1) -> None:
        """Fire-and-forget for things that are not results (status, stats, command replies); ``topic`` from ``self.topics``."""
        self.client.publish(topic, payload, qos=qos, retain=retain)

    def sending(self) -> bool:
        """False once the sending thread has died (a bug: its traceback is in the log)."""
        return self._thread is not None and self._thread.is_alive()

    def inflight(self) -> int:
        with self._wake:
            return len(self._inflight)

    def wait_drained(self, timeout: float) -> bool:
        """Wait until the outbox is empty and everything is acknowledged (or the timeout passes)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._flush_acks()
            if len(self.outbox) == 0:
                return True
            time.sleep(0.02)
        return False

    def stop(self, *, offline: bool = True) -> None:
        if offline and self.connected.is_set():
            info = self.client.publish(self.topics.status, b"offline", qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=2)
            except (RuntimeError, ValueError):
                pass
        self._stopping = True
        with self._wake:
            self._wake.notify_all()
        if self._thread:
            self._thread.join(timeout=2)
        self._flush_acks()
        self.client.disconnect()
        self.client.loop_stop()
