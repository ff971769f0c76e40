"""A real MQTT broker for the tests: mosquitto on a free loopback port, or amqtt where mosquitto is absent;
and a relay in front of it whose network path can be cut."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
if os.environ.get("LEUKOSCOPE_TEST_BROKER") == "amqtt":  # exercise the fallback where mosquitto is installed
    MOSQUITTO = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"broker did not open port {port}")


class Broker:
    """Start, stop and restart a broker; state persists across restarts (like a real deployment)."""

    def __init__(self, folder: Path, *, password_file: Path | None = None, tls: dict | None = None,
                 extra: list[str] | None = None) -> None:
        self.folder = folder
        self.extra = extra or []  # more mosquitto.conf lines (e.g. a site broker's max_inflight_messages)
        self.port = free_port()
        self.password_file = password_file
        self.tls = tls
        self.process: subprocess.Popen | None = None
        self.cpu_s = 0.0  # CPU seconds its processes used, summed over restarts (what one broker thread costs)
        self.kind = "mosquitto" if MOSQUITTO else "amqtt"
        if self.kind == "amqtt" and (password_file or tls):
            raise RuntimeError("credentials and TLS tests need mosquitto (apt-get install mosquitto)")
        folder.mkdir(parents=True, exist_ok=True)

    def _mosquitto_config(self) -> Path:
        lines = [f"listener {self.port} 127.0.0.1", f"user {getpass.getuser()}", "persistence true", f"persistence_location {self.folder}/",
                 "autosave_interval 1", f"log_dest file {self.folder / 'broker.log'}", "max_queued_messages 100000"]
        if self.password_file:
            lines += ["allow_anonymous false", f"password_file {self.password_file}"]
        else:
            lines += ["allow_anonymous true"]
        if self.tls:
            lines += [f"cafile {self.tls['ca']}", f"certfile {self.tls['cert']}", f"keyfile {self.tls['key']}"]
        lines += self.extra
        path = self.folder / "mosquitto.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _amqtt_config(self) -> Path:
        path = self.folder / "amqtt.yaml"
        path.write_text(f"listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{self.port}\n"
                        "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n")
        return path

    def start(self) -> "Broker":
        if self.kind == "mosquitto":
            command = [MOSQUITTO, "-c", str(self._mosquitto_config())]
        else:
            command = [sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(self._amqtt_config())]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.cpu_s += _cpu_seconds(self.process.pid)
            self.process.terminate()  # mosquitto saves its persistence file on SIGTERM
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process from /proc (0 where there is no /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14 and 15 of stat


class Relay:
    """A TCP relay in front of a broker whose link can be cut silently, like a dead network path.

    While cut, bytes in both directions are swallowed: no FIN, no RST, so the client still believes
    it is connected and keeps sending into the void (``swallowed`` counts what it sent).
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.cut = threading.Event()
        self.swallowed = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, name="relay", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                return
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, outbound: bool) -> None:
        while True:
            try:
                data = source.recv(65536)
                if not data:
                    break
                if self.cut.is_set():
                    if outbound:
                        with self._lock:
                            self.swallowed += len(data)
                    continue
                target.sendall(data)
            except OSError:
                break
        for sock in (source, target):
            sock.close()

    def drop(self) -> None:
        """End every connection now, as a broker restart would; new ones are still relayed."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        _shut(sockets)

    def close(self) -> None:
        """Stop listening and drop every connection."""
        with self._lock:
            sockets, self._sockets = [self._listener, *self._sockets], []
        _shut(sockets)


def _shut(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes the threads blocked on it, which close() alone does not
        except OSError:
            pass
        sock.close()
