"""The local page's HTTP server: the standard library's ThreadingHTTPServer, TLS from ``ssl``, guarded.

Why the standard library: it ships and is maintained with CPython, adds nothing to install on a Pi and
no memory beyond a thread per open connection; what its documentation warns it lacks for exposure
(access control, limits) is added here, in ``security.Guard`` and in bounded connections, bodies and
time-outs. The page is small and polled by a browser or two, so nothing heavier earns its place.

Frames are streamed as MJPEG (multipart/x-mixed-replace), which every browser shows in a plain <img>
without script, encoded only while someone watches and at most ``stream_fps`` per viewer.
"""

from __future__ import annotations

import json
import logging
import random
import re
import socket
import ssl
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import cv2
import numpy as np

from edge.errors import UserError
from edge.gate import FRAME_PROBLEMS
from edge.pipeline import annotate
from edge.sources import Frame
from edge.step import Analysed
from edge.topics import BY_NAME
from edge.web.reviews import LABELS, ReviewStore
from edge.web.security import Guard, RateLimiter

if TYPE_CHECKING:
    from edge.agent import Agent

log = logging.getLogger(__name__)

PAGES = {"/": "live.html", "/sample": "sample.html", "/review": "review.html", "/login": "login.html"}
STATIC = {"/static/app.js": "text/javascript; charset=utf-8", "/static/style.css": "text/css; charset=utf-8"}
CROP_PATH = re.compile(r"/crop/([0-9]{1,12})\.(jpg|png)")
REVIEW_PATH = re.compile(r"/api/review/([0-9]{1,12})")
REVIEWER = re.compile(r"[A-Za-z0-9 ._@-]{1,64}")
MAX_PATH = 2048
LIVE_WIDTH = 960  # frames are shrunk to this width for the page: a fraction of the encoding cost
RECENT_FRAMES = 64  # results kept to match a viewer's picture: seconds of frames at any rate the Pi reaches
MAX_VIEWERS = 32
VIEWER = re.compile(r"[A-Za-z0-9]{8,32}")


def stamp_frame_number(canvas: np.ndarray, sequence: int | None) -> None:
    """Draw "#<sequence>" in the picture's top left corner (white on black), the number the panel names:
    a person can always see which frame the picture is, even if the panel's numbers are of another."""
    label = "#" + (str(sequence) if sequence is not None else "-")
    scale = max(canvas.shape[1] / LIVE_WIDTH, 0.5) * 0.8
    (width, height), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 2)
    cv2.rectangle(canvas, (0, 0), (width + 12, height + base + 12), (0, 0, 0), -1)
    cv2.putText(canvas, label, (6, height + 6), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 2, cv2.LINE_AA)
FLAGGED_PER_FRAME = 8  # at most this many flagged crops of one frame are kept for review
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
                               "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
}


class LiveView:
    """The latest frame and result, kept by reference (the inference thread pays nothing more), and
    annotated and encoded as JPEG only when a viewer asks, once per frame however many viewers."""

    def __init__(self, positive_label: str) -> None:
        self.positive_label = positive_label
        self.changed = threading.Condition()
        self.image: np.ndarray | None = None
        self.result: dict | None = None
        self.times: deque[float] = deque(maxlen=20)
        self._jpeg: tuple[int, bytes] | None = None
        self._encode = threading.Lock()
        self.version = 0
        #: The results of the last frames by version, so that the panel can show the numbers of the frame a
        #: viewer's picture shows, not of a newer one analysed since (the picture and the JSON come separately).
        self.recent: dict[int, dict] = {}
        #: viewer id (chosen by the page) -> the version of the last picture streamed to it
        self.streamed: dict[str, int] = {}

    def observe(self, image: np.ndarray, result: dict) -> None:
        with self.changed:
            self.image, self.result = image, result
            self.version += 1
            self.recent[self.version] = result
            self.recent.pop(self.version - RECENT_FRAMES, None)
            self.times.append(time.monotonic())
            self.changed.notify_all()

    def streamed_to(self, viewer: str, version: int) -> None:
        with self.changed:
            self.streamed.pop(viewer, None)
            self.streamed[viewer] = version
            while len(self.streamed) > MAX_VIEWERS:  # the oldest viewer goes (dicts keep insertion order)
                self.streamed.pop(next(iter(self.streamed)))

    def shown(self, viewer: str | None) -> tuple[int, dict | None, bool]:
        """(version, result, whether it is the picture ``viewer`` was last sent): the streamed frame's
        result while it is among the recent ones, else the newest."""
        with self.changed:
            version = self.streamed.get(viewer) if viewer else None
            if version is not None and version in self.recent:
                return version, self.recent[version], True
            return self.version, self.result, False

    def fps(self) -> float | None:
        """Frames per second over the last frames (not since start: the page shows what happens now)."""
        with self.changed:
            times = list(self.times)
        if len(times) < 2 or time.monotonic() - times[-1] > 5:
            return None if len(times) < 2 else 0.0
        return round((len(times) - 1) / (times[-1] - times[0]), 2)

    def jpeg(self) -> tuple[int, bytes] | None:
        with self.changed:
            version, image, result = self.version, self.image, self.result
        if image is None or result is None:
            return None
        with self._encode:
            if self._jpeg is None or self._jpeg[0] != version:
                canvas = annotate(image, result, self.positive_label)
                if canvas.shape[1] > LIVE_WIDTH:
                    height = int(canvas.shape[0] * LIVE_WIDTH / canvas.shape[1])
                    canvas = cv2.resize(canvas, (LIVE_WIDTH, height), interpolation=cv2.INTER_AREA)
                stamp_frame_number(canvas, result.get("sequence"))
                ok, data = cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, 80])
                self._jpeg = (version, data.tobytes())
            return self._jpeg

    def wait(self, after: int, timeout: float) -> int:
        with self.changed:
            self.changed.wait_for(lambda: self.version != after, timeout=timeout)
            return self.version


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 16

    def __init__(self, address: tuple[str, int], handler: type, page: "WebPage") -> None:
        self.page = page
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.slots = threading.BoundedSemaphore(page.config.max_connections)
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        """At most ``max_connections`` at once: one more is closed at once rather than given a thread."""
        if not self.slots.acquire(blocking=False):
            self.page.counters["connections_refused"] += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class WebPage:
    """The page, its review store and its server; started and stopped by the agent."""

    def __init__(self, agent: "Agent") -> None:
        self.agent = agent
        self.config = agent.config.web
        self.store = ReviewStore(self.config.review_db, max_crops=self.config.review_max_crops)
        token = self.config.token()
        self.ssl_context: ssl.SSLContext | None = None
        if self.config.tls:
            self.ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.ssl_context.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                self.ssl_context.load_cert_chain(str(self.config.tls.cert_file), str(self.config.tls.key_file))
            except (OSError, ssl.SSLError) as error:
                raise UserError(f"web.tls: certificate or key cannot be loaded ({error}); check cert_file and key_file") from None
        self.guard = Guard(token=token, host=self.config.host, port_is_tls=self.ssl_context is not None,
                           allowed_hosts=self.config.allowed_hosts, rate_per_s=self.config.rate_per_s,
                           rate_burst=self.config.rate_burst)
        self.live = LiveView(agent.classifier.bundle.positive_label)
        self.counters = {"requests": 0, "refused": 0, "connections_refused": 0, "review_crops": 0, "review_skipped": 0,
                         "labels": 0}
        self.files = {name: (resources.files("edge.web") / "static" / name).read_bytes()
                      for name in [*PAGES.values(), *(p.rsplit("/", 1)[1] for p in STATIC)]}
        self.rng = random.Random()
        self.crop_budget = RateLimiter(self.config.review_crops_per_minute / 60.0, FLAGGED_PER_FRAME)
        self._pending: deque[tuple[np.ndarray, dict, np.ndarray]] = deque(maxlen=2)
        self._work = threading.Condition()
        self.stopping = threading.Event()
        #: Picture streams being served: ``stop`` waits for them, so that no handler thread is inside
        #: OpenCV's JPEG encoder while the process exits (that aborts it: exit -6, not 0).
        self.streams = 0
        self.server: _Server | None = None
        self.threads: list[threading.Thread] = []
        self._last_backlog: int | None = None

    # -- life ------------------------------------------------------------------------------
    def start(self) -> None:
        try:
            self.server = _Server((self.config.host, self.config.port), Handler, self)
        except OSError as error:
            raise UserError(f"web: cannot listen on {self.config.host}:{self.config.port} ({error.strerror}); "
                            "is another program on that port? change web.port") from None
        if self.ssl_context:
            self.server.socket = self.ssl_context.wrap_socket(self.server.socket, server_side=True,
                                                              do_handshake_on_connect=False)
        self.publish_unpublished()
        self.threads = [threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2}, name="web", daemon=True),
                        threading.Thread(target=self._review_worker, name="web-review", daemon=True)]
        for thread in self.threads:
            thread.start()
        if self.guard.mode == "token" and not self.ssl_context:
            log.warning("web page on %s without TLS: the token and labels cross the network in clear; set [web.tls]",
                        self.config.host)
        log.info("web page at %s (%s)", self.url, "token required" if self.guard.mode == "token" else "loopback only")

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"{'https' if self.ssl_context else 'http'}://{host}:{self.port}/"

    def stop(self) -> None:
        self.stopping.set()
        with self._work:
            self._work.notify_all()
        with self.live.changed:
            self.live.changed.notify_all()
        if self.server:
            self.server.shutdown()
            self.server.server_close()
        for thread in self.threads:
            thread.join(timeout=5)
        with self.live.changed:
            self.live.changed.wait_for(lambda: self.streams == 0, timeout=5)
        self.store.close()

    # -- the frame step's observer (the agent's inference thread, under its lock) --------------------
    def analysed(self, done: Analysed) -> None:
        """Every analysed frame, after its result is kept: O(1) here, no encoding or disk (the pipeline's fps)."""
        self.observe(done.frame.image, done.result, done.crops)  # type: ignore[arg-type]  # analysed: has an image

    def skipped(self, frame: Frame, reason: str) -> None:
        """Unreadable frames: the agent counts and logs them; the page shows the last good frame."""

    def observe(self, image: np.ndarray, result: dict, crops: np.ndarray) -> None:
        """Keep the frame for the live view and offer its cells for review (another thread stores them)."""
        self.live.observe(image, result)
        if not self.crop_budget.ready("crops"):
            return  # kept enough for now: the next crops are no more useful than the ones waiting
        if any(c["label"] == self.live.positive_label for c in result["cells"]) or self.config.unflagged_fraction:
            with self._work:
                if len(self._pending) == self._pending.maxlen:
                    self.counters["review_skipped"] += 1  # the store is behind: skip a frame, never stall inference
                self._pending.append((image, result, crops))
                self._work.notify()

    def _review_worker(self) -> None:
        while not self.stopping.is_set():
            with self._work:
                self._work.wait_for(lambda: self._pending or self.stopping.is_set(), timeout=1.0)
                if not self._pending:
                    continue
                image, result, crops = self._pending.popleft()
            try:
                self._keep_for_review(image, result, crops)
            except Exception:  # a full disk must not end the page; the log says what happened
                log.exception("could not store review crops of %s", result.get("source"))

    def _keep_for_review(self, image: np.ndarray, result: dict, crops: np.ndarray) -> None:
        flagged = 0
        for cell, crop in zip(result["cells"], crops):
            if cell["label"] == self.live.positive_label:
                if flagged >= FLAGGED_PER_FRAME:
                    continue
                flagged += 1
                selected = "flagged"
            elif self.rng.random() < self.config.unflagged_fraction:
                selected = "random"
            else:
                continue
            if self.crop_budget.allow("crops"):
                self.counters["review_skipped"] += 1
                continue
            self.store.add(image=image, cell=cell, model_input=crop, result=result, selected=selected,
                           provenance=self.provenance())
            self.counters["review_crops"] += 1

    def provenance(self) -> dict:
        """Where a crop came from: device, model bundle, the frame's scale and the stain reference the crop
        was normalised to (the bundle's crop contract)."""
        agent = self.agent
        bundle = agent.classifier.bundle
        return {"device_id": agent.device_id,
                "bundle": {"folder": bundle.root.name, "files": bundle.manifest["files"], "threshold": bundle.threshold},
                "scale": {"um_per_px": agent.pipeline.um_per_px, "measured_um_per_px": agent.scale_watch.measured},
                "contract": bundle.manifest["preprocessing"],
                "selection": {"unflagged_fraction": self.config.unflagged_fraction}}

    # -- labels -----------------------------------------------------------------------------------
    def label(self, crop_id: int, label: str, reviewer: str, access: str) -> dict:
        stored = self.store.label(crop_id, label, reviewer, access, self.agent.device_id)
        self.counters["labels"] += 1
        self._publish(stored.id, stored.payload)
        return {"crop_id": crop_id, "label": label, "stored": True}

    def publish_unpublished(self) -> None:
        """Labels stored but not yet in the outbox (the agent stopped in between): hand them over now."""
        for stored in self.store.unpublished():
            self._publish(stored.id, stored.payload)

    def _publish(self, label_id: int, payload: bytes) -> None:
        agent = self.agent
        if agent.outbox.put(agent.topics.reviews, payload, qos=BY_NAME["reviews"].qos) is not None:
            self.store.mark_published(label_id)
        if agent.publisher:
            agent.publisher.notify()

    # -- what the pages show --------------------------------------------------------------------------
    def live_state(self, viewer: str | None = None) -> dict:
        """The panel's numbers. With ``viewer`` (the id the page streams with), they are those of the frame
        last streamed to it, the one in its picture; ``picture`` says whether they are, and ``latest_sequence``
        names the newest frame analysed."""
        version, result, is_picture = self.live.shown(viewer)
        with self.live.changed:
            latest = self.live.result
        stats = self.agent.stats()
        warnings = []
        if result and result.get("out_of_focus"):
            warnings.append(f"out of focus (nuclei focus {result['focus']}); refocus the microscope")
        if stats["scale"]["warning"]:
            warnings.append(stats["scale"]["warning"])
        warnings += [f"frames {problem.doing}: {problem.hint}" for name, problem in FRAME_PROBLEMS.items() if stats[name]]
        cells = []
        if result:
            cells = [{"label": "ALL blast" if c["label"] == self.live.positive_label else "normal", "p_all": c["p_all"]}
                     for c in result["cells"]] + \
                    [{"label": "not classified", "reason": c["reason"]} for c in result.get("unclassified", [])]
        return {"version": version, "sequence": result and result.get("sequence"), "source": result and result["source"],
                "picture": is_picture, "latest_sequence": latest and latest.get("sequence"),
                "sample_id": result and result.get("sample_id"), "counts": result and result["counts"],
                "focus": result and result.get("focus"), "cells": cells, "warnings": warnings,
                "fps": self.live.fps(), "timings_ms": result and result["timings_ms"], "stage_ms": stats["stage_ms"]}

    def sample_state(self) -> dict:
        agent = self.agent
        summary = agent.current_summary()
        backlog = len(agent.outbox)
        connected = bool(agent.publisher and agent.publisher.connected.is_set())
        previous, self._last_backlog = self._last_backlog, backlog
        if not agent.config.mqtt.enabled:
            delivery = "MQTT is off in the config: results stay in the outbox"
        elif backlog == 0 and connected:
            delivery = "delivered: nothing waiting"
        elif connected:
            delivery = f"draining: {backlog} waiting" if previous is None or backlog <= previous else f"connected, {backlog} waiting"
        else:
            delivery = f"not delivering: broker unreachable, {backlog} waiting in the outbox"
        return {"summary": summary, "outbox": {"backlog": backlog, "connected": connected, "delivery": delivery},
                "reviews": self.store.counts()}

    def sample_command(self, name: str, body: dict) -> dict:
        """The page's sample actions go through the agent's command table, the very handlers that MQTT's
        ``cmd/start_sample`` and ``cmd/stop_sample`` call: one validation, one behaviour, one reply."""
        with self.agent.lock:
            self.agent.counters["commands"] += 1
        return self.agent.commands[name](body)


class Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "leukoscope"
    sys_version = ""
    timeout = 15  # a client that sends nothing for this long is dropped (slow-loris)

    @property
    def page(self) -> WebPage:
        return self.server.page

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.client_address[0], format % args)

    # -- plumbing -----------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, content_type: str = "application/json", headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in {**SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data: dict, headers: dict | None = None) -> None:
        self._send(status, json.dumps(data, default=str).encode(), headers=headers)

    def _refuse(self, status: int, why: str, headers: dict | None = None) -> None:
        self.page.counters["refused"] += 1
        self.close_connection = True
        self._json(status, {"ok": False, "error": why}, {"Connection": "close", **(headers or {})})

    def _admit(self) -> str | None:
        """Checks every request passes; returns how it is authenticated, or None after refusing it."""
        page = self.page
        page.counters["requests"] += 1
        wait = page.guard.limiter.allow(self.client_address[0])
        if wait:
            self._refuse(429, "too many requests; slow down", {"Retry-After": str(max(1, round(wait)))})
            return None
        if len(self.path) > MAX_PATH:
            self._refuse(414, "request path too long")
            return None
        if not page.guard.host_allowed(self.headers.get("Host")):
            self._refuse(421, "unknown Host; open the page at http://127.0.0.1 or add the name to web.allowed_hosts")
            return None
        access = page.guard.authenticated(self.headers.get("Cookie"), self.headers.get("Authorization"))
        path = self.path.split("?", 1)[0]
        if access is None and path not in ("/login", "/static/style.css"):
            if self.command == "GET" and path in PAGES:
                self._send(303, b"", "text/plain", {"Location": "/login"})
            else:
                self._refuse(401, "log in first (POST /login with the token, or send Authorization: Bearer <token>)")
            return None
        return access or "anonymous"

    def _body(self) -> dict | None:
        """The request's JSON (or form) body, bounded by web.max_body_bytes; None after refusing it."""
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding"):
            self._refuse(411, "send a Content-Length, not a chunked body")
            return None
        if length is None or not length.isdigit():
            self._refuse(411, "Content-Length required")
            return None
        if int(length) > self.page.config.max_body_bytes:
            self._refuse(413, f"request body over {self.page.config.max_body_bytes} bytes")
            return None
        raw = self.rfile.read(int(length))
        kind = self.headers.get("Content-Type", "").split(";")[0].strip()
        try:
            if kind == "application/x-www-form-urlencoded":
                return {k: v[0] for k, v in parse_qs(raw.decode("utf-8"), max_num_fields=16).items()}
            body = json.loads(raw.decode("utf-8")) if raw.strip() else {}
        except (UnicodeDecodeError, ValueError, RecursionError):
            self._refuse(400, "body is not valid UTF-8 JSON")
            return None
        if not isinstance(body, dict):
            self._refuse(400, "body must be a JSON object")
            return None
        return body

    def _csrf(self, access: str, offered: str | None) -> bool:
        if access == "bearer":  # a token in a header: no browser sends that across sites
            return True
        session = self.page.guard.session_of(self.headers.get("Cookie"))
        why = self.page.guard.csrf_ok(session=session, offered=offered, origin=self.headers.get("Origin"),
                                      referer=self.headers.get("Referer"), host=self.headers.get("Host"))
        if why:
            self._refuse(403, why)
            return False
        return True

    # -- GET --------------------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        access = self._admit()
        if access is None:
            return
        path = self.path.split("?", 1)[0]
        page = self.page
        try:
            if path in PAGES:
                session = page.guard.session_of(self.headers.get("Cookie"))
                html = page.files[PAGES[path]].replace(b"{{csrf}}", page.guard.csrf_token(session).encode())
                html = html.replace(b"{{device}}", page.agent.device_id.encode())
                self._send(200, html, "text/html; charset=utf-8")
            elif path in STATIC:
                self._send(200, page.files[path.rsplit("/", 1)[1]], STATIC[path])
            elif path == "/api/live":
                self._json(200, page.live_state(self._viewer()))
            elif path == "/api/sample":
                self._json(200, page.sample_state())
            elif path == "/api/review":
                self._json(200, {"pending": page.store.pending(), "reviewed": page.store.reviewed(),
                                 "counts": page.store.counts(), "labels": list(LABELS)})
            elif path == "/frame.jpg":
                frame = page.live.jpeg()
                if frame is None:
                    self._json(404, {"ok": False, "error": "no frame analysed yet"})
                else:
                    self._send(200, frame[1], "image/jpeg")
            elif path == "/stream.mjpg":
                self._stream()
            elif (match := CROP_PATH.fullmatch(path)):
                data = page.store.image(int(match.group(1)), "view" if match.group(2) == "jpg" else "model_input")
                if data is None:
                    self._json(404, {"ok": False, "error": "no such crop"})
                else:
                    self._send(200, data, "image/jpeg" if match.group(2) == "jpg" else "image/png")
            else:
                self._json(404, {"ok": False, "error": "not found"})
        except (BrokenPipeError, ConnectionResetError, socket.timeout, ssl.SSLError):
            self.close_connection = True

    def _viewer(self) -> str | None:
        """``?viewer=ID``: the page's own random id, tying its picture stream to its panel's JSON."""
        values = parse_qs(self.path.split("?", 1)[1]).get("viewer", []) if "?" in self.path else []
        return values[0] if values and VIEWER.fullmatch(values[0]) else None

    def _stream(self) -> None:
        """MJPEG: one JPEG part per new frame, at most stream_fps, until the viewer leaves or the agent stops.
        Each part names its frame (``X-Frame-Sequence``; the number is drawn in the picture's corner too),
        and with ``?viewer=ID`` the panel's JSON for that id is the streamed frame's."""
        page = self.page
        viewer = self._viewer()
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.send_header("Cache-Control", "no-store")
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        with page.live.changed:
            page.streams += 1
        try:
            self._stream_parts(page, viewer)
        finally:
            with page.live.changed:
                page.streams -= 1
                page.live.changed.notify_all()

    def _stream_parts(self, page: "WebPage", viewer: str | None) -> None:
        interval = 1.0 / page.config.stream_fps
        seen = -1
        while not page.stopping.is_set():
            started = time.monotonic()
            seen = page.live.wait(seen, timeout=1.0)
            frame = page.live.jpeg()
            if frame is None:
                continue
            with page.live.changed:
                shown = page.live.recent.get(frame[0]) or {}
            if viewer:  # before the write: once the page has the picture, its JSON already names it
                page.live.streamed_to(viewer, frame[0])
            self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: " + str(len(frame[1])).encode()
                             + f"\r\nX-Frame-Sequence: {shown.get('sequence')}\r\n\r\n".encode() + frame[1] + b"\r\n")
            self.wfile.flush()
            rest = interval - (time.monotonic() - started)
            if rest > 0 and page.stopping.wait(rest):
                break

    # -- POST -------------------------------------------------------------------------------------
    def do_POST(self) -> None:
        access = self._admit()
        if access is None:
            return
        body = self._body()
        if body is None:
            return
        path = self.path.split("?", 1)[0]
        page = self.page
        if path == "/login":
            self._login(body)
            return
        if not self._csrf(access, self.headers.get("X-CSRF-Token") or body.get("csrf")):
            return
        try:
            if path == "/logout":
                page.guard.end_session(page.guard.session_of(self.headers.get("Cookie")))
                self._send(303, b"", "text/plain", {"Location": "/login", "Set-Cookie": page.guard.cookie("x").replace(
                    "Max-Age=43200", "Max-Age=0")})
            elif path == "/api/sample/start":
                self._json(200, {"ok": True, **page.sample_command("start_sample", {"sample_id": body.get("sample_id")})})
            elif path == "/api/sample/stop":
                self._json(200, {"ok": True, **page.sample_command("stop_sample", {})})
            elif (match := REVIEW_PATH.fullmatch(path)):
                reviewer = body.get("reviewer")
                if not isinstance(reviewer, str) or not REVIEWER.fullmatch(reviewer):
                    raise ValueError("reviewer: give your name or initials (1-64 letters, digits, spaces, '.', '_', '@', '-')")
                label = body.get("label")
                if not isinstance(label, str) or label not in LABELS:
                    raise ValueError(f"label must be one of {', '.join(LABELS)}")
                self._json(200, {"ok": True, **page.label(int(match.group(1)), label, reviewer, access)})
            else:
                self._json(404, {"ok": False, "error": "not found"})
        except LookupError as error:
            self._json(404, {"ok": False, "error": str(error)})
        except (ValueError, TypeError, UserError) as error:
            self._json(400, {"ok": False, "error": str(error)})

    def _login(self, body: dict) -> None:
        guard = self.page.guard
        if guard.mode == "open":
            self._send(303, b"", "text/plain", {"Location": "/"})
            return
        if not self._csrf("login", body.get("csrf")):
            return
        client = self.client_address[0]
        wait = guard.login_limiter.allow(client)  # before the token is even looked at: no guessing at speed
        if wait:
            self._refuse(429, "too many login attempts; wait a minute", {"Retry-After": str(max(1, round(wait)))})
            return
        token = body.get("token")
        if not isinstance(token, str) or not guard.check_token(token):
            log.warning("web: failed login from %s", client)
            self._refuse(401, "wrong token")
            return
        session = guard.new_session()
        self._send(303, b"", "text/plain", {"Location": "/", "Set-Cookie": guard.cookie(session)})
