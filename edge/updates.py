"""Signed model updates received over MQTT: verify, stage, self-test, switch atomically, roll back.

A lab rolls a new model out with ``quantize publish`` instead of walking to each Pi. The device
trusts only what the workstation's Ed25519 key signed: the *statement* names the bundle, carries
its manifest, and gives the SHA-256 of every file and of every chunk of it. So the device can
refuse an unsigned or wrongly signed bundle, a bundle for a crop contract it cannot make, or a
disk too full for it before a byte of the model arrives, and a corrupted chunk the moment it
arrives. In every refusal the running bundle is untouched.

Commands (``<base>/cmd/<name>``, answered like every command):

- ``update_begin``  ``{"statement": {...}, "signature": "<base64>"}``
- ``update_chunk``  ``{"bundle_id", "file", "index", "data": "<base64>"}``; the reply to the last
  chunk says whether the bundle is now active
- ``update_revert`` back to the previous bundle
- ``update_status`` the active and previous bundle ids and any transfer in progress

On disk (``updates.folder``)::

    store/<bundle_id>/     verified bundles: the active one and the previous one
    active -> store/<id>   symlink, replaced atomically (rename) on a switch
    previous -> <folder>   the bundle that ran before (possibly the factory one in the config)
    staging/<bundle_id>/   a transfer in progress; removed on start, on a refusal and when done

A switch is one ``rename`` of a symlink, so a SIGKILL at any moment leaves the old or the new
bundle active, never half of one; a transfer cut short is discarded on the next start. If the
active bundle cannot be opened on start, the device rolls back to the previous one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edge.bundle import MANIFEST, check_manifest, load_bundle, sha256_file
from edge.classifier import Classifier
from edge.config import UpdatesConfig
from edge.errors import BundleError, UserError

log = logging.getLogger(__name__)

UPDATE_FORMAT = "leukoscope-update"
UPDATE_VERSION = 1
MAX_CHUNK = 1 << 20  # a chunk larger than this is refused (a broker's message limit is often 1-256 MiB)
MAX_FILES = 16


def bundle_in_use(config: UpdatesConfig, factory: Path) -> tuple[Path, Path | None]:
    """(the bundle the agent opens at start, the one it rolls back to): the ``active`` and ``previous``
    links in ``updates.folder``, or the configured (factory) bundle when no update was ever installed.
    Reads only, creates nothing: ``edge check`` asks it too, and a self-test must leave nothing behind."""
    folder = Path(config.folder)
    active, previous = (Path(os.readlink(link)) if link.is_symlink() else None
                        for link in (folder / "active", folder / "previous"))
    return active or Path(factory).resolve(), previous


class UpdateRefused(UserError):
    """An update the device will not take; the message is the reply, the device is unchanged."""


def canonical(statement: dict) -> bytes:
    """The bytes that are signed: sorted keys, no spaces, ASCII (identical on both sides)."""
    return json.dumps(statement, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def verify_signature(statement: Any, signature: Any, public_key: str) -> None:
    """Refuse a statement that the holder of ``public_key``'s private half did not sign."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if not isinstance(statement, dict) or not signature:
        raise UpdateRefused("unsigned update refused (no statement or no signature); send bundles with `quantize publish --key`")
    try:
        raw = base64.b64decode(signature, validate=True) if isinstance(signature, str) else b""
    except (binascii.Error, ValueError):
        raw = b""
    try:
        Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key)).verify(raw, canonical(statement))
    except (InvalidSignature, ValueError):
        raise UpdateRefused("update refused: its signature does not verify against updates.public_key "
                            "(signed with another key, or altered); sign with the key whose public half this device has") from None


def chunk_hashes(data: bytes, chunk_size: int) -> list[str]:
    return [hashlib.sha256(data[i:i + chunk_size]).hexdigest() for i in range(0, len(data), chunk_size)]


def _safe_name(name: Any) -> bool:
    return isinstance(name, str) and 0 < len(name) <= 128 and Path(name).name == name and name not in (".", "..") \
        and not name.startswith(".")


@dataclass
class Transfer:
    """A bundle being received: its signed statement, its staging folder and the chunks still missing."""

    bundle_id: str
    statement: dict
    folder: Path
    missing: set[tuple[str, int]]
    started: float = field(default_factory=time.monotonic)

    @property
    def chunks(self) -> int:
        return sum(len(f["chunks"]) for f in self.statement["files"].values())


class Updater:
    """The device's side of model updates; ``open_classifier`` opens a bundle with the device's own
    settings (CPU or Edge TPU), ``install`` makes a classifier the one the pipeline runs."""

    def __init__(self, config: UpdatesConfig, factory: Path, open_classifier: Callable[[Path], Classifier],
                 install: Callable[[Classifier], None]) -> None:
        if not config.public_key:
            raise UserError("updates.enabled needs updates.public_key (from `quantize keygen`)")
        self.config = config
        self.public_key = config.public_key
        self.factory = Path(factory).resolve()
        self.open_classifier = open_classifier
        self.install = install
        self.folder = Path(config.folder)
        self.store = self.folder / "store"
        self.staging = self.folder / "staging"
        self.active_link = self.folder / "active"
        self.previous_link = self.folder / "previous"
        self.transfer: Transfer | None = None
        self.lock = threading.Lock()
        try:
            self.store.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.staging, ignore_errors=True)  # a transfer cut short by a stop or SIGKILL
            self.staging.mkdir(parents=True, exist_ok=True)
            for stale in self.folder.glob(".*.tmp"):
                stale.unlink()
        except OSError as error:
            raise UserError(f"updates.folder {self.folder} cannot be used ({error}); make it writable for the agent") from None

    # -- which bundle runs ------------------------------------------------------------------
    def active_root(self) -> Path:
        return bundle_in_use(self.config, self.factory)[0]

    def previous_root(self) -> Path | None:
        return bundle_in_use(self.config, self.factory)[1]

    def _in_use(self, root: Path) -> bool:
        """Whether ``root`` is the active or the previous bundle (which an update never deletes)."""
        return root.resolve() in {p.resolve() for p in bundle_in_use(self.config, self.factory) if p}

    def start(self) -> Classifier:
        """Open the active bundle; if it fails, roll back to the previous one, then to the factory one."""
        tried: list[str] = []
        for root in dict.fromkeys(r for r in (self.active_root(), self.previous_root(), self.factory) if r):
            try:
                classifier = self.open_classifier(root)
            except UserError as error:
                tried.append(f"{root}: {error}")
                log.error("model bundle %s cannot be opened (%s); rolling back", root, error)
                continue
            if root != self.active_root():
                self._switch(root, previous=None)
                log.warning("rolled back to model bundle %s (%s)", classifier.bundle.id, root)
            return classifier
        raise UserError("no model bundle can be opened: " + "; ".join(tried))

    def _point(self, link: Path, target: Path | None) -> None:
        """Make ``link`` point at ``target`` in one rename (or remove it), durable on return."""
        if target is None:
            link.unlink(missing_ok=True)
        else:
            temporary = link.with_name(f".{link.name}.tmp")
            temporary.unlink(missing_ok=True)
            os.symlink(target, temporary)
            os.replace(temporary, link)
        _fsync(self.folder)

    def _switch(self, root: Path, previous: Path | None) -> None:
        self._point(self.previous_link, previous)
        self._point(self.active_link, root)
        keep = {p.resolve() for p in (root, previous) if p}
        for folder in self.store.iterdir():  # only the active and the previous bundle are kept
            if folder.resolve() not in keep:
                shutil.rmtree(folder, ignore_errors=True)

    # -- commands ---------------------------------------------------------------------------
    def commands(self) -> dict[str, Callable[[dict], dict]]:
        """Handlers for the agent's command table (``edge.commands``), one at a time."""

        def locked(handler: Callable[[dict], dict]) -> Callable[[dict], dict]:
            def run(body: dict) -> dict:
                with self.lock:
                    return handler(body)
            return run

        return {"update_begin": locked(self.begin), "update_chunk": locked(self.chunk),
                "update_revert": locked(self.revert), "update_status": locked(lambda body: self.status())}

    def status(self) -> dict:
        previous = self.previous_root()
        transfer = self.transfer
        return {"active": self._id(self.active_root()), "active_path": str(self.active_root()),
                "previous": self._id(previous) if previous else None,
                "transfer": None if transfer is None else {"bundle_id": transfer.bundle_id, "chunks": transfer.chunks,
                                                           "missing": len(transfer.missing)}}

    @staticmethod
    def _id(root: Path) -> str | None:
        try:
            return load_bundle(root).id
        except BundleError:
            return None

    def begin(self, body: dict) -> dict:
        statement, signature = body.get("statement"), body.get("signature")
        verify_signature(statement, signature, self.public_key)  # nothing else is read before this
        self._abort()
        bundle_id, files, chunk_size = self._check_statement(statement)
        if self._id(self.active_root()) == bundle_id:
            return {"bundle_id": bundle_id, "active": bundle_id, "unchanged": True, "chunks": 0}
        needed = sum(f["size"] for f in files.values())
        free = shutil.disk_usage(self.folder).free
        if free - needed < self.config.reserve_mb * 1e6:
            raise UpdateRefused(f"update {bundle_id} refused: the disk would keep {(free - needed) / 1e6:.0f} MB free, "
                                f"less than updates.reserve_mb={self.config.reserve_mb:g}; free space on the device")
        folder = self.staging / bundle_id
        folder.mkdir(parents=True)
        for name, record in files.items():
            with (folder / name).open("wb") as handle:
                handle.truncate(record["size"])
        missing = {(name, index) for name, record in files.items() for index in range(len(record["chunks"]))}
        self.transfer = Transfer(bundle_id, statement, folder, missing)
        log.info("receiving model bundle %s: %d file(s), %d bytes in %d chunk(s)", bundle_id, len(files), needed, len(missing))
        return {"bundle_id": bundle_id, "chunks": len(missing)}

    def _check_statement(self, statement: dict) -> tuple[str, dict, int]:
        if statement.get("format") != UPDATE_FORMAT or statement.get("version") != UPDATE_VERSION:
            raise UpdateRefused(f"update refused: statement format {statement.get('format')!r} v{statement.get('version')!r}, "
                                f"this leukoscope reads {UPDATE_FORMAT!r} v{UPDATE_VERSION}; upgrade leukoscope or the workstation")
        bundle_id, files, chunk_size, manifest = (statement.get(k) for k in ("bundle_id", "files", "chunk_size", "manifest"))
        if not isinstance(bundle_id, str) or not isinstance(files, dict) or not isinstance(chunk_size, int) \
                or not 0 < chunk_size <= MAX_CHUNK or not 0 < len(files) <= MAX_FILES:
            raise UpdateRefused("update refused: the statement lacks bundle_id, files or a chunk_size up to 1 MiB")
        try:
            check_manifest(manifest, f"bundle {bundle_id}")
        except BundleError as error:
            raise UpdateRefused(f"update refused, device unchanged: {error}") from None
        if not manifest.get("selftest"):
            raise UpdateRefused(f"update {bundle_id} refused: the bundle records no self-test; add one with "
                                "`quantize selftest BUNDLE --data DIR` and publish again")
        for name, record in files.items():
            if not _safe_name(name) or not isinstance(record, dict) or not isinstance(record.get("size"), int) \
                    or record["size"] < 0 or not isinstance(record.get("chunks"), list) \
                    or len(record["chunks"]) != math.ceil(record["size"] / chunk_size):
                raise UpdateRefused(f"update {bundle_id} refused: file {str(name)[:64]!r} is badly described in the statement")
        if MANIFEST not in files or not set(manifest["files"]) <= set(files):
            raise UpdateRefused(f"update {bundle_id} refused: the statement does not send {MANIFEST} and every file it names")
        if files[MANIFEST].get("sha256", "")[:16] != bundle_id:
            raise UpdateRefused(f"update refused: bundle id {bundle_id} is not its manifest's hash")
        return bundle_id, files, chunk_size

    def chunk(self, body: dict) -> dict:
        transfer = self.transfer
        bundle_id, name, index = body.get("bundle_id"), body.get("file"), body.get("index")
        if transfer is None or transfer.bundle_id != bundle_id:
            raise UpdateRefused(f"no update of bundle {str(bundle_id)[:32]!r} in progress; send it again with `quantize publish`")
        files = transfer.statement["files"]
        if name not in files or not isinstance(index, int) or not 0 <= index < len(files[name]["chunks"]):
            raise UpdateRefused(f"update {bundle_id}: no chunk {index!r} of file {str(name)[:64]!r} in its statement")
        try:
            data = base64.b64decode(body.get("data") or "", validate=True)
        except (binascii.Error, ValueError, TypeError):
            data = None
        if data is None or hashlib.sha256(data).hexdigest() != files[name]["chunks"][index]:
            self._abort()
            raise UpdateRefused(f"update {bundle_id} refused: chunk {index} of {name} does not match its signed hash "
                                "(corrupted on the way); the transfer is dropped and the device unchanged; publish again")
        descriptor = os.open(transfer.folder / name, os.O_WRONLY)
        try:
            os.pwrite(descriptor, data, index * transfer.statement["chunk_size"])
        finally:
            os.close(descriptor)
        transfer.missing.discard((name, index))
        if transfer.missing:
            return {"bundle_id": bundle_id, "missing": len(transfer.missing)}
        try:
            return self._finish(transfer)
        finally:
            self._abort()

    def _abort(self) -> None:
        if self.transfer is not None:
            shutil.rmtree(self.transfer.folder, ignore_errors=True)
            self.transfer = None

    def _finish(self, transfer: Transfer) -> dict:
        """Every chunk is here: check the files, self-test, switch, and install; refuse on any failure."""
        bundle_id, files = transfer.bundle_id, transfer.statement["files"]
        for name, record in files.items():
            path = transfer.folder / name
            if sha256_file(path) != record.get("sha256"):
                raise UpdateRefused(f"update {bundle_id} refused: {name} does not match its signed SHA-256; publish again")
        if json.loads((transfer.folder / MANIFEST).read_text()) != transfer.statement["manifest"]:
            raise UpdateRefused(f"update {bundle_id} refused: its manifest is not the one signed")
        for path in transfer.folder.iterdir():
            _fsync(path)
        home = self.store / bundle_id
        if self._in_use(home):
            shutil.rmtree(transfer.folder)
        else:
            shutil.rmtree(home, ignore_errors=True)
            os.replace(transfer.folder, home)
        try:
            classifier = self.open_classifier(home)
            problem = classifier.self_test()
        except UserError as error:
            problem = str(error)
        if problem:
            if not self._in_use(home):
                shutil.rmtree(home, ignore_errors=True)
            raise UpdateRefused(f"update {bundle_id} refused, device unchanged: {problem}")
        old = self.active_root()
        self._switch(home, previous=old)
        try:
            self.install(classifier)
        except Exception as error:  # the new bundle cannot run here: back to the one that did
            self._switch(old, previous=None)
            raise UpdateRefused(f"update {bundle_id} rolled back to the previous bundle: {error}") from None
        seconds = time.monotonic() - transfer.started
        log.info("model bundle %s active (was %s), %.1f s after the update began", bundle_id, self._id(old), seconds)
        return {"bundle_id": bundle_id, "active": bundle_id, "previous": self._id(old), "seconds": round(seconds, 3)}

    def revert(self, body: dict) -> dict:
        """Back to the previous bundle; the one that was active becomes the previous one."""
        self._abort()
        previous, current = self.previous_root(), self.active_root()
        if previous is None:
            raise UpdateRefused("no previous bundle to revert to (none was replaced by an update on this device)")
        started = time.monotonic()
        classifier = self.open_classifier(previous)  # a UserError here leaves everything as it was
        self._switch(previous, previous=current)
        self.install(classifier)
        log.info("reverted to model bundle %s (was %s)", classifier.bundle.id, self._id(current))
        return {"active": classifier.bundle.id, "previous": self._id(current), "seconds": round(time.monotonic() - started, 3)}


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
