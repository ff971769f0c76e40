"""Signed model updates over a real broker to a real agent (``edge run``) with real int8 bundles:
publish switches the device and its stats say so, revert goes back, and every refusal (unsigned,
wrong key, altered statement, corrupted chunk, another crop contract, a failing self-test, a full
disk) is answered in one line with the device unchanged; a transfer cut by SIGKILL is discarded and
a broken active bundle is rolled back on start."""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edge.bundle import MANIFEST, load_bundle, write_manifest
from edge.classifier import Classifier
from edge.config import UpdatesConfig
from edge.updates import UpdateRefused, Updater, canonical
from quantize import publish as P
from tests.conftest import ROOT
from tests.test_service import Agent, Subscriber, wait_for, write_config

pytestmark = pytest.mark.slow

DEFAULT = ROOT / "models" / "default"
FRAMES = ROOT / "samples" / "frames"


def variant(tmp_path: Path, name: str, change=lambda manifest: None) -> Path:
    """The default bundle with a changed threshold (so another bundle id), then ``change`` applied."""
    root = tmp_path / name
    shutil.copytree(DEFAULT, root)
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["threshold"] = round(manifest["threshold"] - 0.01, 6)
    change(manifest)
    write_manifest(root, manifest)
    return root


@pytest.fixture
def key(tmp_path):
    path = tmp_path / "signing.pem"
    P.keygen(path)
    return P.load_key(path)


class Device:
    """``edge run`` with updates enabled, trusting ``key``'s public half."""

    def __init__(self, tmp_path: Path, port: int, key, device: str = "pi1") -> None:
        self.folder = tmp_path / f"{device}-bundles"
        self.config = write_config(tmp_path / f"{device}.toml", port=port, frames=FRAMES, outbox=tmp_path / f"{device}.sqlite3",
                                   fps=4, loop=True, device=device,
                                   extra=f'[updates]\nenabled = true\npublic_key = "{P.public_key_of(key)}"\nfolder = "{self.folder}"\n')
        self.id = device
        self.process: Agent | None = None

    def start(self, sender: P.Sender) -> "Device":
        sender.statuses.pop(self.id, None)
        self.process = Agent(self.config)
        assert wait_for(lambda: sender.statuses.get(self.id) == b"online", 30), self.process.log()
        return self

    def status(self, sender: P.Sender) -> dict:
        sender.replies.pop(self.id, None)
        sender.command(self.id, "update_status", {})
        reply = sender.reply(self.id, 10)
        assert reply and reply["ok"], reply
        return reply

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(30)


@pytest.fixture
def sender(broker):
    s = P.Sender("127.0.0.1", broker.port, "leukoscope")
    yield s
    s.close()


@pytest.fixture
def device(tmp_path, broker, key, sender):
    d = Device(tmp_path, broker.port, key).start(sender)
    yield d
    d.stop()
    assert "Traceback" not in d.process.log()


def test_publish_switches_reports_in_stats_and_reverts(tmp_path, broker, key, sender, device):
    default_id, new = load_bundle(DEFAULT).id, variant(tmp_path, "new")
    new_id = load_bundle(new).id
    assert device.status(sender)["active"] == default_id

    [outcome] = P.publish(sender, P.sign_bundle(new, key), [device.id])
    assert outcome.ok, outcome.reply
    assert outcome.reply["active"] == new_id and outcome.reply["previous"] == default_id
    status = device.status(sender)
    assert status["active"] == new_id and status["previous"] == default_id and status["transfer"] is None
    stats = Subscriber(broker.port, "leukoscope/pi1/stats", client_id="stats-watcher")
    try:  # the collector reads the active bundle from stats
        assert stats.wait_for(lambda: any(json.loads(p)["bundle"] == new_id for p in stats.payloads("/stats")), 10)
        # reload_model would switch behind the updater's back (stats naming one bundle, update_status another):
        # refused, naming the update commands, and the bundle that scores stays the one reported
        for body in ({"bundle": str(DEFAULT)}, {}):
            sender.command(device.id, "reload_model", body)
            refused = sender.reply(device.id, 10)
            assert refused and not refused["ok"], refused
            assert refused["error"].startswith("reload_model is off while updates.enabled") and new_id in refused["error"]
            assert "update_revert" in refused["error"] and "update_status" in refused["error"]
        seen = len(stats.payloads("/stats"))
        assert stats.wait_for(lambda: len(stats.payloads("/stats")) >= seen + 2, 10)
        assert {json.loads(p)["bundle"] for p in stats.payloads("/stats")[seen:]} == {new_id}
        assert device.status(sender)["active"] == new_id
    finally:
        stats.close()
    # `edge check` opens the bundle the agent runs, the updater's active one, not classifier.bundle
    check = subprocess.run([sys.executable, "-m", "edge.cli", "check", "--config", str(device.config)], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"ok   model bundle {device.folder / 'store' / new_id} {new_id} (CPU, the updater's active bundle" in check.stdout
    assert sorted(p.name for p in (device.folder / "store").iterdir()) == [new_id]

    [again] = P.publish(sender, P.sign_bundle(new, key), [device.id])  # publishing twice changes nothing
    assert again.ok and again.reply.get("unchanged")

    [back] = P.revert(sender, [device.id])
    assert back.ok and back.reply["active"] == default_id and back.reply["previous"] == new_id
    device.stop()  # the switch outlives a restart
    device.start(sender)
    assert device.status(sender)["active"] == default_id


def from_newer_workstation(signed: P.SignedBundle, key, change) -> P.SignedBundle:
    """``signed`` with its manifest changed by ``change`` and signed again, as a workstation with
    another leukoscope (whose ``sign_bundle`` would accept the change) would send it."""
    import hashlib

    manifest = copy.deepcopy(signed.statement["manifest"])
    change(manifest)
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    size = signed.statement["chunk_size"]
    statement = copy.deepcopy(signed.statement)
    statement["manifest"] = manifest
    statement["files"][MANIFEST] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                    "chunks": [hashlib.sha256(data[i:i + size]).hexdigest() for i in range(0, len(data), size)]}
    statement["bundle_id"] = statement["files"][MANIFEST]["sha256"][:16]
    return P.SignedBundle(statement["bundle_id"], statement, base64.b64encode(key.sign(canonical(statement))).decode(),
                          {**signed.payloads, MANIFEST: data})


def _refused(sender: P.Sender, device: Device, signed: P.SignedBundle, chunks: list[dict] | None = None) -> str:
    [outcome] = P.publish(sender, signed, [device.id], timeout_s=30) if chunks is None else [_send(sender, device, signed, chunks)]
    assert not outcome.ok, outcome.reply
    return outcome.reply["error"]


def _send(sender: P.Sender, device: Device, signed: P.SignedBundle, chunks: list[dict]) -> P.Outcome:
    sender.replies.pop(device.id, None)
    sender.command(device.id, "update_begin", {"statement": signed.statement, "signature": signed.signature})
    assert sender.reply(device.id, 10)["ok"]
    for message in chunks:
        sender.command(device.id, "update_chunk", message)
    replies = [sender.reply(device.id, 30) for _ in chunks]  # every chunk is answered, refused ones too
    verdict = next(r for r in replies if not r["ok"] or "active" in r)
    return P.Outcome(device.id, verdict["ok"], verdict, 0.0)


def test_every_refusal_is_one_line_and_leaves_the_device_unchanged(tmp_path, key, sender, device):
    default_id = load_bundle(DEFAULT).id
    good = P.sign_bundle(variant(tmp_path, "good"), key)
    P.keygen(tmp_path / "other.pem")
    other_key = P.load_key(tmp_path / "other.pem")

    unsigned = copy.deepcopy(good)
    unsigned.signature = ""
    altered = copy.deepcopy(good)
    altered.statement["manifest"]["threshold"] = 0.01
    corrupted = P.chunk_messages(good)
    corrupted[1]["data"] = base64.b64encode(b"x" + base64.b64decode(corrupted[1]["data"])[1:]).decode()

    def bad_self_test(manifest):
        manifest["selftest"]["scores"] = [round(1 - s, 6) for s in manifest["selftest"]["scores"]]

    cases = [
        (lambda: _refused(sender, device, unsigned), "unsigned update refused"),
        (lambda: _refused(sender, device, P.sign_bundle(variant(tmp_path, "other-key"), other_key)), "does not verify"),
        (lambda: _refused(sender, device, altered), "does not verify"),
        (lambda: _refused(sender, device, good, corrupted), f"chunk {corrupted[1]['index']} of {corrupted[1]['file']} does not match its signed hash"),
        (lambda: _refused(sender, device, from_newer_workstation(good, key, lambda m: m["preprocessing"].update(name="cell-um-lab-v9"))),
         "expects preprocessing 'cell-um-lab-v9'"),
        (lambda: _refused(sender, device, P.sign_bundle(variant(tmp_path, "selftest", bad_self_test), key)), "self-test failed"),
    ]
    for attempt, expected in cases:
        error = attempt()
        assert "\n" not in error
        assert re.search(expected, error), error
        status = device.status(sender)
        assert status["active"] == default_id and status["previous"] is None and status["transfer"] is None, status
        assert list((device.folder / "staging").iterdir()) == [] and list((device.folder / "store").iterdir()) == []

    [outcome] = P.publish(sender, good, [device.id])  # and a good bundle still goes through afterwards
    assert outcome.ok and outcome.reply["active"] == good.bundle_id


def test_sigkill_mid_transfer_discards_it_and_a_broken_active_bundle_rolls_back(tmp_path, key, sender, device):
    default_id = load_bundle(DEFAULT).id
    signed = P.sign_bundle(variant(tmp_path, "new"), key, chunk_size=16 * 1024)
    chunks = P.chunk_messages(signed)
    sender.command(device.id, "update_begin", {"statement": signed.statement, "signature": signed.signature})
    assert sender.reply(device.id, 10)["ok"]
    for message in chunks[: len(chunks) // 2]:
        sender.command(device.id, "update_chunk", message)
    for _ in chunks[: len(chunks) // 2]:
        assert sender.reply(device.id, 10)["ok"]
    device.process.send_signal(signal.SIGKILL)
    device.process.wait(10)
    device.start(sender)
    status = device.status(sender)
    assert status["active"] == default_id and status["transfer"] is None
    assert list((device.folder / "staging").iterdir()) == []

    [outcome] = P.publish(sender, signed, [device.id])
    assert outcome.ok, outcome.reply
    device.stop()
    (device.folder / "store" / signed.bundle_id / "model_int8.tflite").write_bytes(b"not a model")  # disk damage
    check = subprocess.run([sys.executable, "-m", "edge.cli", "check", "--config", str(device.config)], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 1 and "Traceback" not in check.stderr
    assert f"FAIL model: the updater's active bundle {device.folder / 'store' / signed.bundle_id}: " in check.stdout
    assert f"the agent would roll back to {DEFAULT.resolve()} at start" in check.stdout
    device.start(sender)
    assert device.status(sender)["active"] == default_id
    assert "rolling back" in device.process.log()


def test_a_full_disk_is_refused_before_any_chunk(tmp_path, key):
    """In-process: no disk can be filled for a test, so the reserve is set beyond the free space."""
    installed = []
    updater = Updater(UpdatesConfig(enabled=True, public_key=P.public_key_of(key), folder=tmp_path / "b", reserve_mb=1e12),
                      DEFAULT, lambda root: Classifier(root, num_threads=1), installed.append)
    signed = P.sign_bundle(variant(tmp_path, "new"), key)
    with pytest.raises(UpdateRefused, match="less than updates.reserve_mb"):
        updater.commands()["update_begin"]({"statement": signed.statement, "signature": signed.signature})
    assert updater.active_root() == DEFAULT.resolve() and not installed and updater.transfer is None


def test_the_default_bundle_passes_its_own_self_test():
    assert Classifier(DEFAULT, num_threads=1).self_test() is None
