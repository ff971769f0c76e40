"""The local page with real HTTP requests against a real agent: off by default, loopback unless a token
is configured, TLS, CSRF on every POST, no path traversal, bounded bodies and request rates, and review
labels that are stored durably and reach a real broker through the outbox."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import jsonschema
import pytest

from edge.commands import answer
from edge.config import parse_config
from edge.errors import UserError
from edge.web.reviews import ReviewStore
from tests.broker import Broker
from tests.conftest import ROOT
from tests.test_service import Subscriber
from tests.web_helpers import FRAMES, RunningAgent, agent_config, csrf_of, request, wait_for

pytestmark = pytest.mark.slow


def test_off_by_default_on_loopback_and_a_token_is_required_elsewhere(tmp_path):
    config = parse_config({"source": {"type": "folder", "path": str(FRAMES)}})
    assert config.web.enabled is False and config.web.host == "127.0.0.1"
    with pytest.raises(UserError) as refused:
        parse_config({"source": {"type": "folder", "path": str(FRAMES)}, "web": {"enabled": True, "host": "0.0.0.0"}})
    assert "web.token_file" in str(refused.value) and "\n" not in str(refused.value)
    short = tmp_path / "token"
    short.write_text("abc\n")
    with pytest.raises(UserError, match="at least 12 characters"):
        parse_config({"source": {"type": "folder", "path": str(FRAMES)},
                      "web": {"enabled": True, "host": "0.0.0.0", "token_file": str(short)}}).web.token()


def test_loopback_page_serves_and_refuses_foreign_host_names(tmp_path):
    with RunningAgent(agent_config(tmp_path)) as running:
        port = running.port
        assert running.agent.web.server.server_address[0] == "127.0.0.1"
        for path in ("/", "/sample", "/review", "/static/app.js", "/static/style.css"):
            response = request(port, "GET", path)
            assert response.status == 200, path
            assert response.headers["X-Frame-Options"] == "DENY" and "script-src 'self'" in response.headers["Content-Security-Policy"]
        assert b"cdn" not in request(port, "GET", "/").body.lower()
        # DNS rebinding: a page on another name that resolves to 127.0.0.1 is refused
        assert request(port, "GET", "/api/live", headers={"Host": "evil.example:80"}).status == 421
        assert request(port, "GET", "/api/live", headers={"Host": f"localhost:{port}"}).status == 200


def test_the_live_view_follows_the_frames(tmp_path):
    with RunningAgent(agent_config(tmp_path)) as running:
        port = running.port
        assert wait_for(lambda: request(port, "GET", "/api/live").json()["sequence"] is not None, 30)
        first = request(port, "GET", "/api/live").json()
        assert wait_for(lambda: request(port, "GET", "/api/live").json()["version"] > first["version"], 30)
        state = request(port, "GET", "/api/live").json()
        assert set(state["timings_ms"]) >= {"segment", "crop", "classify", "total"} and state["fps"] > 0
        frame = request(port, "GET", "/frame.jpg")
        assert frame.status == 200 and frame.body[:2] == b"\xff\xd8"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:  # MJPEG: parts keep coming
            sock.sendall(f"GET /stream.mjpg HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            received = b""
            while received.count(b"--frame") < 2:
                chunk = sock.recv(65536)
                assert chunk, "the stream ended"
                received += chunk
        assert b"multipart/x-mixed-replace" in received and b"Content-Type: image/jpeg" in received


class Stream:
    """``/stream.mjpg?viewer=...`` read part by part over a raw socket: (frame sequence, JPEG) per part."""

    def __init__(self, port: int, viewer: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(f"GET /stream.mjpg?viewer={viewer} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        self.buffer = b""
        self.parts: list[tuple[int, bytes]] = []

    def next_part(self) -> tuple[int, bytes]:
        while True:
            start = self.buffer.find(b"--frame\r\n")
            head_end = self.buffer.find(b"\r\n\r\n", start) if start >= 0 else -1
            if head_end >= 0:
                headers = dict(line.split(": ", 1) for line in self.buffer[start + 9:head_end].decode().split("\r\n"))
                body_start = head_end + 4
                length = int(headers["Content-Length"])
                if len(self.buffer) >= body_start + length:
                    part = (int(headers["X-Frame-Sequence"]), self.buffer[body_start:body_start + length])
                    self.buffer = self.buffer[body_start + length:]
                    self.parts.append(part)
                    return part
            chunk = self.sock.recv(65536)
            assert chunk, "the stream ended"
            self.buffer += chunk

    def sent(self, sequence: int, limit: int = 20) -> bool:
        """Whether the stream sent (or sends within ``limit`` more parts) the frame ``sequence``."""
        for _ in range(limit):
            if any(s == sequence for s, _ in self.parts):
                return True
            self.next_part()
        return any(s == sequence for s, _ in self.parts)


@pytest.mark.parametrize("kind", ["dark", "grey", "bright"])
def test_the_live_panel_says_when_frames_are_dark_colourless_or_overexposed(tmp_path, kind):
    """The lamp off, a monochrome camera, or the lamp turned up: no cells, and the panel says why (the agent's
    frame watch)."""
    import cv2
    import numpy as np

    folder = tmp_path / kind
    folder.mkdir()
    smear = cv2.imread(str(sorted(FRAMES.glob("*.jpg"))[0]))
    frame = {"dark": np.full((240, 320, 3), 6, np.uint8),
             "grey": cv2.cvtColor(cv2.cvtColor(smear, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR),
             "bright": np.clip(smear * 1.7, 0, 255).astype(np.uint8)}[kind]
    for i in range(2):
        cv2.imwrite(str(folder / f"{kind}_{i}.png"), frame)
    config = agent_config(tmp_path)
    config["source"]["path"] = str(folder)
    expected = {"dark": ("frames are dark", "lamp"), "grey": ("frames show no colour", "colour camera"),
                "bright": ("frames are overexposed", "exposure_us")}[kind]
    with RunningAgent(config) as running:
        port = running.port
        assert wait_for(lambda: request(port, "GET", "/api/live").json()["sequence"] is not None, 30)
        warnings = request(port, "GET", "/api/live").json()["warnings"]
        assert any(w.startswith(expected[0]) and expected[1] in w for w in warnings), warnings


def test_the_live_panel_names_the_frame_in_the_picture(tmp_path):
    """The picture (MJPEG) and the numbers (JSON) are fetched apart; with the page's viewer id, the JSON is
    the frame last streamed to that page, each part names its frame, and the number is drawn in the picture."""
    import cv2
    import numpy as np

    from tests.test_service import pending_results

    viewer = "0123abcd4567ef89"
    with RunningAgent(agent_config(tmp_path, fps=8.0, web={"stream_fps": 1.0})) as running:
        port = running.port
        stream = Stream(port, viewer)
        sequence, jpeg = stream.next_part()
        for _ in range(3):
            state = request(port, "GET", f"/api/live?viewer={viewer}").json()
            assert state["picture"] is True
            # the numbers are of a frame this page was sent (never a newer one it was not), and they are that frame's
            assert state["sequence"] >= sequence and stream.sent(state["sequence"])
            sequence = stream.parts[-1][0]
            result = next(r for r in pending_results(tmp_path / "outbox.sqlite3").values() if r["sequence"] == state["sequence"])
            assert state["counts"] == result["counts"] and state["source"] == result["source"]
        # frames are analysed faster than this viewer is sent pictures: the newest is often not its picture
        assert wait_for(lambda: (s := request(port, "GET", f"/api/live?viewer={viewer}").json())["latest_sequence"] > s["sequence"], 30)
        stream.sock.close()
        shown = stream.parts[-1][0]
        assert wait_for(lambda: request(port, "GET", "/api/live").json()["sequence"] > shown + 1, 30)
        state = request(port, "GET", f"/api/live?viewer={viewer}").json()
        assert state["picture"] and state["latest_sequence"] > state["sequence"] >= shown, (state, stream.parts)
        unknown = request(port, "GET", "/api/live?viewer=ffffffffffffffff").json()  # no picture sent: the newest
        assert unknown["picture"] is False and unknown["sequence"] == unknown["latest_sequence"]
    # the frame's number is drawn in the picture's top left corner: a black box with white text
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_GRAYSCALE)
    corner = image[2:20, 2:30]
    assert (corner < 40).mean() > 0.3 and (corner > 215).any()


def test_every_post_needs_the_pages_csrf_token_and_origin(tmp_path):
    with RunningAgent(agent_config(tmp_path)) as running:
        port = running.port
        token = csrf_of(request(port, "GET", "/sample"))
        start = {"sample_id": "S-42"}
        assert request(port, "POST", "/api/sample/start", body=start).status == 403
        assert request(port, "POST", "/api/sample/start", body=start, headers={"X-CSRF-Token": "0" * 64}).status == 403
        evil = request(port, "POST", "/api/sample/start", body=start,
                       headers={"X-CSRF-Token": token, "Origin": "http://evil.example"})
        assert evil.status == 403 and "cross-site" in evil.json()["error"]
        assert running.agent.tally.sample_id is None
        ok = request(port, "POST", "/api/sample/start", body=start,
                     headers={"X-CSRF-Token": token, "Origin": f"http://127.0.0.1:{port}"})
        assert ok.status == 200 and ok.json()["sample_id"] == "S-42"
        assert running.agent.tally.sample_id == "S-42"
        assert wait_for(lambda: request(port, "GET", "/api/sample").json()["summary"]["frames"] > 0, 30)
        # the same handler as MQTT's cmd/start_sample: its refusal, word for word
        refused = request(port, "POST", "/api/sample/start", body={"sample_id": "a/b"}, headers={"X-CSRF-Token": token})
        assert refused.status == 400
        assert refused.json()["error"] == answer(running.agent.commands, "start_sample", b'{"sample_id": "a/b"}')[1]["error"]
        stop = request(port, "POST", "/api/sample/stop", body={}, headers={"X-CSRF-Token": token})
        assert stop.status == 200 and stop.json()["summary"]["sample_id"] == "S-42" and stop.json()["summary"]["final"]
        assert running.agent.tally.sample_id is None
        again = request(port, "POST", "/api/sample/stop", body={}, headers={"X-CSRF-Token": token})
        assert again.status == 400 and "no sample is open" in again.json()["error"]


def test_names_and_paths_cannot_traverse(tmp_path):
    with RunningAgent(agent_config(tmp_path)) as running:
        port = running.port
        token = csrf_of(request(port, "GET", "/sample"))
        for path in ("/static/../../../../etc/passwd", "/static/%2e%2e/%2e%2e/etc/passwd", "/crop/../../outbox.sqlite3",
                     "/crop/1.jpg/../../../etc/passwd", "/..%2f..%2fetc%2fpasswd", "/static/app.js%00.png", "//etc/passwd"):
            response = request(port, "GET", path)
            assert response.status == 404, path
            assert b"root:" not in response.body and b"SQLite" not in response.body
        for bad in ("../../etc", "a/b", "", "x" * 65, "S 1"):
            response = request(port, "POST", "/api/sample/start", body={"sample_id": bad}, headers={"X-CSRF-Token": token})
            assert response.status == 400 and "sample_id" in response.json()["error"], bad
        response = request(port, "POST", "/api/review/1", body={"label": "blast", "reviewer": "../../x"},
                           headers={"X-CSRF-Token": token})
        assert response.status == 400 and "reviewer" in response.json()["error"]


def test_bodies_and_request_rates_are_bounded(tmp_path):
    with RunningAgent(agent_config(tmp_path, web={"max_body_bytes": 1024, "rate_per_s": 1.0, "rate_burst": 8})) as running:
        port = running.port
        token = csrf_of(request(port, "GET", "/sample"))
        big = request(port, "POST", "/api/sample/start", body=b"{" + b" " * 5000 + b"}",
                      headers={"X-CSRF-Token": token, "Content-Type": "application/json"})
        assert big.status == 413
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:  # no Content-Length
            sock.sendall(f"POST /api/sample/stop HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-CSRF-Token: {token}\r\n\r\n".encode())
            assert sock.recv(4096).startswith(b"HTTP/1.1 411")
        statuses = [request(port, "GET", "/api/live").status for _ in range(10)]
        assert statuses.count(429) >= 3 and statuses[0] == 200
        limited = request(port, "GET", "/api/live")
        assert limited.status == 429 and int(limited.headers["Retry-After"]) >= 1


def _certificate(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    key, cert, ext = folder / "web.key", folder / "web.crt", folder / "ext.cnf"
    ext.write_text("[req]\ndistinguished_name=dn\n[dn]\n[san]\nsubjectAltName=IP:127.0.0.1\n")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-extensions", "san", "-config", str(ext)],
                   check=True, capture_output=True)
    return key, cert


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the TLS test makes its certificate with openssl")
def test_off_loopback_a_token_is_required_over_tls(tmp_path, monkeypatch):
    key, cert = _certificate(tmp_path / "pki")
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "web-token").write_text("correct-horse-battery-staple\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))  # as systemd's LoadCredential= provides it
    tls = ssl.create_default_context(cafile=str(cert))
    web = {"host": "0.0.0.0", "token_file": "web-token", "tls": {"cert_file": str(cert), "key_file": str(key)}}
    with RunningAgent(agent_config(tmp_path, web=web)) as running:
        port = running.port
        with pytest.raises(Exception):  # plain HTTP on the TLS port gets nowhere
            request(port, "GET", "/api/live")
        assert request(port, "GET", "/api/live", tls=tls).status == 401
        page = request(port, "GET", "/review", tls=tls)
        assert page.status == 303 and page.headers["Location"] == "/login"
        login = request(port, "GET", "/login", tls=tls)
        csrf = csrf_of(login)
        form = {"Content-Type": "application/x-www-form-urlencoded", "Origin": f"https://127.0.0.1:{port}"}
        wrong = request(port, "POST", "/login", body=f"csrf={csrf}&token=guess".encode(), headers=form, tls=tls)
        assert wrong.status == 401
        right = request(port, "POST", "/login", body=f"csrf={csrf}&token=correct-horse-battery-staple".encode(),
                        headers=form, tls=tls)
        assert right.status == 303
        cookie = right.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" in cookie
        session = cookie.split(";")[0]
        assert request(port, "GET", "/api/live", headers={"Cookie": session}, tls=tls).status == 200
        assert request(port, "GET", "/api/live", headers={"Cookie": "leukoscope_session=forged"}, tls=tls).status == 401
        bearer = {"Authorization": "Bearer correct-horse-battery-staple"}
        assert request(port, "GET", "/api/sample", headers=bearer, tls=tls).status == 200
        assert request(port, "GET", "/api/sample", headers={"Authorization": "Bearer nope"}, tls=tls).status == 401
        # the session's CSRF token is needed for its POSTs; another session's is refused
        token = csrf_of(request(port, "GET", "/sample", headers={"Cookie": session}, tls=tls))
        assert token != csrf
        started = request(port, "POST", "/api/sample/start", body={"sample_id": "T1"},
                          headers={"Cookie": session, "X-CSRF-Token": csrf}, tls=tls)
        assert started.status == 403
        started = request(port, "POST", "/api/sample/start", body={"sample_id": "T1"},
                          headers={"Cookie": session, "X-CSRF-Token": token}, tls=tls)
        assert started.status == 200
        # guessing is slowed: 5 login attempts a minute per address, counted before the token is checked
        statuses = [request(port, "POST", "/login", body=f"csrf={csrf}&token=guess{i}".encode(), headers=form, tls=tls).status
                    for i in range(6)]
        assert statuses[-1] == 429 and 401 in statuses


def test_labels_are_durable_carry_provenance_and_reach_the_broker(tmp_path):
    broker = Broker(tmp_path / "broker").start()
    sub = Subscriber(broker.port, topic="leukoscope/w1/reviews", client_id="reviews")
    try:
        config = agent_config(tmp_path, mqtt_port=broker.port)
        with RunningAgent(config) as running:
            port = running.port
            assert wait_for(lambda: len(request(port, "GET", "/api/review").json()["pending"]) >= 2, 60)
            crop = request(port, "GET", "/api/review").json()["pending"][0]
            assert "model_label" not in crop and "p_all" not in crop  # the reviewer judges the cell, not the model
            image = request(port, "GET", f"/crop/{crop['id']}.jpg")
            assert image.status == 200 and image.body[:2] == b"\xff\xd8"
            token = csrf_of(request(port, "GET", "/review"))
            labelled = request(port, "POST", f"/api/review/{crop['id']}", body={"label": "normal", "reviewer": "A. Reviewer"},
                               headers={"X-CSRF-Token": token})
            assert labelled.status == 200 and labelled.json()["stored"]
            missing = request(port, "POST", "/api/review/999999", body={"label": "normal", "reviewer": "AR"},
                              headers={"X-CSRF-Token": token})
            assert missing.status == 404
            assert sub.wait_for(lambda: sub.payloads("/reviews"), 30)
        message = json.loads(sub.payloads("/reviews")[0])
        schema = json.loads((ROOT / "edge" / "schemas" / "review-label.schema.json").read_text())
        jsonschema.validate(message, schema, format_checker=jsonschema.FormatChecker())
        assert message["schema"] == "leukoscope/review-label" and message["label"] == "normal"
        assert message["crop_id"] == crop["id"] and message["reviewer"] == "A. Reviewer" and message["access"] == "loopback"
        assert message["device_id"] == "w1" and message["bundle"]["files"] and message["scale"]["um_per_px"] > 0
        assert message["contract"]["params"]["lab_mean"] and message["reviewed_at"].endswith("Z")
        assert message["cell"]["selected"] in ("flagged", "random") and len(message["cell"]["model_input_sha256"]) == 64
        # a label stored but not yet handed to the outbox (the agent died in between) goes out at the next start
        store = ReviewStore(tmp_path / "reviews.sqlite3")
        pending = store.pending(limit=1)[0]["id"]
        store.label(pending, "blast", "B. Reviewer", "loopback", "w1")
        store.close()
        with RunningAgent(config) as running:
            reviewed = request(running.port, "GET", "/api/review").json()["reviewed"]
            assert {(r["id"], r["label"]) for r in reviewed} >= {(crop["id"], "normal"), (pending, "blast")}
            assert sub.wait_for(lambda: len(sub.payloads("/reviews")) >= 2, 30)
        assert json.loads(sub.payloads("/reviews")[1])["crop_id"] == pending
        assert ReviewStore(tmp_path / "reviews.sqlite3").counts()["unpublished"] == 0
    finally:
        sub.close()
        broker.stop()


def test_reviewed_crops_export_as_a_training_source(tmp_path):
    from edge.cli import main
    from trainer.dataset import scan_sources

    with RunningAgent(agent_config(tmp_path)) as running:
        assert wait_for(lambda: len(running.agent.web.store.pending(limit=4)) >= 4, 60)
        web = running.agent.web
        crops = [c["id"] for c in web.store.pending(limit=4)]
        for crop, label in zip(crops, ("blast", "normal", "not_a_cell", "blast")):
            web.label(crop, label, "R1", "loopback")
    assert main(["export-reviews", "--db", str(tmp_path / "reviews.sqlite3"), "--out", str(tmp_path / "site")]) == 0
    samples, record = scan_sources([tmp_path / "site"])  # the trainer reads it as one source at its declared scale
    assert sorted(s.label for s in samples) == [0, 1, 1]
    assert record["site"]["um_per_px"] == 0.125 and record["site"]["scale_from"] == "leukoscope-scale.json"
    from trainer.dataset import load_arrays  # and the device's own segmentation finds the cell in each
    images, kept = load_arrays(samples, progress=False)
    assert images.shape == (3, 96, 96, 3) and len(kept) == 3
    lines = (tmp_path / "site" / "provenance.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["reviewer"] == "R1" for line in lines)
    assert main(["export-reviews", "--db", str(tmp_path / "reviews.sqlite3"), "--out", str(tmp_path / "site")]) == 2
    assert main(["export-reviews", "--db", str(tmp_path / "missing.sqlite3"), "--out", str(tmp_path / "x")]) == 2
