"""A real agent with its page, in-process, and plain HTTP requests to it (shared by the web tests)."""

from __future__ import annotations

import http.client
import json
import re
import ssl
import threading
from pathlib import Path

from edge.agent import Agent
from edge.calibration import read_scale_file
from edge.config import parse_config
from tests.conftest import ROOT, wait_for

FRAMES = ROOT / "samples" / "frames"



def agent_config(tmp_path: Path, *, web: dict | None = None, mqtt_port: int | None = None, fps: float = 4.0,
                 device: str = "w1") -> dict:
    return {
        "device": {"id": device},
        "source": {"type": "folder", "path": str(FRAMES), "loop": True, "fps": fps},
        "segmentation": {"um_per_px": read_scale_file(FRAMES)},
        "classifier": {"num_threads": 1},
        "mqtt": {"enabled": False} if mqtt_port is None else
                {"host": "127.0.0.1", "port": mqtt_port, "keepalive_s": 5, "reconnect_max_s": 2, "stats_interval_s": 5},
        "outbox": {"path": str(tmp_path / "outbox.sqlite3")},
        "web": {"enabled": True, "port": 0, "review_db": str(tmp_path / "reviews.sqlite3"), "unflagged_fraction": 0.5,
                **(web or {})},
    }


class RunningAgent:
    """``Agent._run`` on a thread (``run`` installs signal handlers, which only the main thread may)."""

    def __init__(self, config: dict) -> None:
        self.agent = Agent(parse_config(config))
        self.exit: int | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        self.exit = self.agent._run()

    def __enter__(self) -> "RunningAgent":
        self.thread.start()
        assert wait_for(lambda: self.agent.web.server is not None, 30), "the page did not start"
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.agent.stop_event.set()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()

    @property
    def port(self) -> int:
        return self.agent.web.port


class Response:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> dict:
        return json.loads(self.body)


def request(port: int, method: str, path: str, *, body: bytes | dict | None = None, headers: dict | None = None,
            tls: ssl.SSLContext | None = None) -> Response:
    """One real HTTP request; ``headers`` may override Host, and a dict body is sent as JSON."""
    connection = (http.client.HTTPSConnection("127.0.0.1", port, context=tls, timeout=10) if tls
                  else http.client.HTTPConnection("127.0.0.1", port, timeout=10))
    headers = dict(headers or {})
    if isinstance(body, dict):
        body = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    skip_host = "Host" in headers
    connection.putrequest(method, path, skip_host=skip_host, skip_accept_encoding=True)
    for name, value in headers.items():
        connection.putheader(name, value)
    if body is not None and "Content-Length" not in headers:
        connection.putheader("Content-Length", str(len(body)))
    connection.endheaders(body)
    response = connection.getresponse()
    data = response.read() if not response.getheader("Content-Type", "").startswith("multipart") else b""
    connection.close()
    return Response(response.status, response.headers, data)


def csrf_of(page: Response) -> str:
    match = re.search(rb'name="csrf" (?:content|value)="([0-9a-f]{64})"', page.body)
    assert match, page.body[:300]
    return match.group(1).decode()
