"""``quantize keygen``, ``quantize selftest`` and ``quantize publish``: signed model updates for a fleet.

The workstation signs a *statement* about the bundle (its manifest, every file's SHA-256 and the
SHA-256 of every chunk) with an Ed25519 key, and sends the statement and then the chunks to each
device over MQTT. The device's side, and the reasons for the format, are in ``edge.updates``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.bundle import MANIFEST, load_bundle, record_self_test
from edge.errors import UserError
from edge.updates import UPDATE_FORMAT, UPDATE_VERSION, canonical, chunk_hashes

log = logging.getLogger(__name__)

CHUNK_SIZE = 64 * 1024  # base64 in JSON: about 87 KB a message, well under any broker's limit
SELFTEST_CROPS = 8


# -- keys ------------------------------------------------------------------------------------
def keygen(out: Path) -> str:
    """Write ``<out>`` (PKCS#8 PEM, mode 0600) and return the public key in base64 for the devices' config."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if out.exists():
        raise UserError(f"{out} exists; refusing to overwrite a signing key (devices trust its public half)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    out.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(pem)
    return public_key_of(key)


def public_key_of(key) -> str:
    from cryptography.hazmat.primitives import serialization

    return base64.b64encode(key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


def load_key(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        raise UserError(f"--key {path} cannot be read as a PEM private key ({error}); make one with `quantize keygen`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UserError(f"--key {path} is not an Ed25519 key; make one with `quantize keygen`")
    return key


# -- self-test -------------------------------------------------------------------------------
def choose_self_test(crops: np.ndarray, scores: np.ndarray, threshold: float, count: int = SELFTEST_CROPS) -> np.ndarray:
    """Indices of ``count`` crops spread over the score range, on both sides of the threshold, so a
    runtime that computes something else shows up as a changed score or decision."""
    order = np.argsort(scores)
    below, above = order[scores[order] < threshold], order[scores[order] >= threshold]
    half = count // 2
    picks = [side[np.linspace(0, len(side) - 1, min(len(side), n)).round().astype(int)]
             for side, n in ((below, count - min(half, len(above))), (above, half)) if len(side)]
    return np.unique(np.concatenate(picks)) if picks else np.arange(0)


def tolerance_for(manifest: dict) -> float:
    """Two steps of the output's quantization (an Edge TPU or another CPU kernel may round differently)."""
    scale = float((manifest["output"].get("quantization") or {}).get("scale") or 0.0)
    return max(2 * scale, 0.002)


def add_self_test(root: Path, crops: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """Record self-test crops and their scores in the bundle at ``root``; returns the new manifest."""
    chosen = choose_self_test(crops, scores, threshold)
    if len(chosen) == 0:
        raise UserError("no crops to record a self-test from; pass data with cells")
    manifest = json.loads((root / MANIFEST).read_text())
    record_self_test(root, crops[chosen], scores[chosen], tolerance_for(manifest))
    return json.loads((root / MANIFEST).read_text())


def selftest_from_data(root: Path, data: list[str], limit: int = 200) -> dict:
    """``quantize selftest``: score up to ``limit`` cells of ``data`` with the bundle and record a self-test."""
    from edge.classifier import Classifier
    from trainer.dataset import load_arrays, scan_sources

    classifier = Classifier(root, num_threads=2)
    samples = scan_sources(data, require_both=False)[0]
    step = max(1, len(samples) // limit)
    images, _ = load_arrays(samples[::step][:limit], classifier.contract)
    return add_self_test(root, images, classifier.scores(images), classifier.threshold)


# -- the statement ---------------------------------------------------------------------------
@dataclass
class SignedBundle:
    bundle_id: str
    statement: dict
    signature: str
    payloads: dict[str, bytes]

    @property
    def size(self) -> int:
        return sum(len(data) for data in self.payloads.values())


def sign_bundle(root: Path, key, chunk_size: int = CHUNK_SIZE) -> SignedBundle:
    """Verify the bundle as a device would, then sign a statement of its manifest and chunks."""
    bundle = load_bundle(root)
    if not bundle.manifest.get("selftest"):
        raise UserError(f"bundle {root} records no self-test, and devices refuse such a bundle; add one with "
                        f"`quantize selftest {root} --data DIR`")
    names = [MANIFEST, *sorted(bundle.manifest["files"])]
    payloads = {name: (root / name).read_bytes() for name in names}
    statement = {
        "format": UPDATE_FORMAT, "version": UPDATE_VERSION, "bundle_id": bundle.id, "chunk_size": chunk_size,
        "manifest": bundle.manifest, "signed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "chunks": chunk_hashes(data, chunk_size)}
                  for name, data in payloads.items()},
    }
    signature = base64.b64encode(key.sign(canonical(statement))).decode()
    return SignedBundle(bundle.id, statement, signature, payloads)


def chunk_messages(signed: SignedBundle) -> list[dict]:
    size = signed.statement["chunk_size"]
    return [{"bundle_id": signed.bundle_id, "file": name, "index": index,
             "data": base64.b64encode(data[index * size:(index + 1) * size]).decode()}
            for name, data in signed.payloads.items() for index in range(len(signed.statement["files"][name]["chunks"]))]


# -- sending ---------------------------------------------------------------------------------
@dataclass
class Outcome:
    device: str
    ok: bool
    reply: dict
    seconds: float


class Sender:
    """One paho client that sends commands to devices and waits for their replies (``reply_to``)."""

    def __init__(self, host: str, port: int, prefix: str, *, username: str | None = None, password: str | None = None,
                 tls_ca: Path | None = None) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.prefix = prefix
        self.tag = uuid.uuid4().hex[:12]
        self.replies: dict[str, queue.Queue[dict]] = {}
        self.statuses: dict[str, bytes] = {}
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"leukoscope-publish-{self.tag}", clean_session=True)
        if username:
            self.client.username_pw_set(username, password)
        if tls_ca:
            self.client.tls_set(ca_certs=str(tls_ca))
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda client, userdata, mid, codes, properties: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.max_inflight_messages_set(32)
        try:
            self.client.connect(host, port, keepalive=30)
        except (OSError, ValueError) as error:
            raise UserError(f"cannot reach the broker {host}:{port} ({error}); check --host and --port") from None
        self.client.loop_start()
        if not self.connected.wait(10) or not self.subscribed.wait(10):
            self.close()
            raise UserError(f"the broker {host}:{port} did not accept the connection within 10 s; check credentials and TLS")

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            return
        client.subscribe([(f"{self.prefix}/+/reply/publish-{self.tag}", 1), (f"{self.prefix}/+/status", 1)])
        self.connected.set()

    def _on_message(self, client, userdata, message) -> None:
        device = message.topic[len(self.prefix) + 1:].split("/", 1)[0]
        if message.topic.endswith("/status"):
            self.statuses[device] = message.payload
            return
        try:
            reply = json.loads(message.payload)
        except ValueError:
            return
        self.replies.setdefault(device, queue.Queue()).put(reply)

    def devices(self, settle_s: float = 1.0) -> list[str]:
        """Devices whose retained status the broker holds (every device that ever connected)."""
        seen = -1
        while seen != len(self.statuses):  # retained statuses arrive right after subscribing
            seen = len(self.statuses)
            time.sleep(settle_s)
        return sorted(d for d, status in self.statuses.items() if status == b"online")

    def command(self, device: str, name: str, body: dict, *, qos: int = 1):
        payload = json.dumps({**body, "reply_to": f"publish-{self.tag}"}).encode()
        return self.client.publish(f"{self.prefix}/{device}/cmd/{name}", payload, qos=qos)

    def reply(self, device: str, timeout: float) -> dict | None:
        try:
            return self.replies.setdefault(device, queue.Queue()).get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish(sender: Sender, signed: SignedBundle, devices: list[str], timeout_s: float = 120.0) -> list[Outcome]:
    """Send the signed bundle to each device and wait for its verdict (one device at a time: a
    Pi's self-test is the slow part, and a refusal on the first says what is wrong with all)."""
    chunks = chunk_messages(signed)
    outcomes = []
    for device in devices:
        started = time.monotonic()
        sender.replies.pop(device, None)
        sender.command(device, "update_begin", {"statement": signed.statement, "signature": signed.signature})
        reply = sender.reply(device, timeout_s)
        if reply is None or not reply.get("ok") or reply.get("unchanged") or not reply.get("chunks"):
            outcomes.append(Outcome(device, bool(reply and reply.get("ok")), reply or {"error": f"no reply within {timeout_s:g} s; "
                                    "is the device online with updates.enabled?"}, time.monotonic() - started))
            continue
        for message in chunks:
            sender.command(device, "update_chunk", message)
        final = None
        deadline = time.monotonic() + timeout_s
        for _ in chunks:  # every chunk is answered; the verdict is the first refusal or the answer to the last
            reply = sender.reply(device, max(0.0, deadline - time.monotonic()))
            if reply is None:
                break
            if final is None and (not reply.get("ok") or "active" in reply):
                final = reply
        ok = bool(final and final.get("ok") and final.get("active") == signed.bundle_id)
        outcomes.append(Outcome(device, ok, final or {"error": f"no verdict within {timeout_s:g} s"}, time.monotonic() - started))
    return outcomes


def revert(sender: Sender, devices: list[str], timeout_s: float = 60.0) -> list[Outcome]:
    outcomes = []
    for device in devices:
        started = time.monotonic()
        sender.replies.pop(device, None)
        sender.command(device, "update_revert", {})
        reply = sender.reply(device, timeout_s) or {"error": f"no reply within {timeout_s:g} s"}
        outcomes.append(Outcome(device, bool(reply.get("ok")), reply, time.monotonic() - started))
    return outcomes
