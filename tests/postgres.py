"""A real PostgreSQL server for the tests: a private cluster in a temporary folder (initdb + pg_ctl),
on a free loopback port, trust authentication, removed afterwards.

PostgreSQL refuses to run as root, so as root the cluster runs as the ``postgres`` user that the
Debian package creates (``apt-get install postgresql``; .ci/run installs it). Where the binaries
or such a user are missing, ``why_unavailable`` says so and the tests skip with that reason.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from tests.broker import free_port, wait_port


def _bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(versions[-1]).parent if versions else None


def _run_as() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
        return "postgres"
    except KeyError:
        return None


def why_unavailable() -> str | None:
    if _bin() is None:
        return "PostgreSQL is not installed (apt-get install postgresql)"
    if os.geteuid() == 0 and _run_as() is None:
        return "PostgreSQL cannot run as root and there is no 'postgres' user (apt-get install postgresql creates it)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'leukoscope[collector]')"
    return None


def for_benchmark(program: str) -> "Postgres":
    """A started server for a benchmark's ``--postgres``; exits with one line naming what is missing."""
    import sys

    reason = why_unavailable()
    if reason:
        sys.exit(f"{program}: {reason}")
    return Postgres().start()


class Postgres:
    """``start()``, ``url(database)`` for a fresh database, ``stop()`` (the folder is removed)."""

    def __init__(self) -> None:
        self.bin = _bin()
        self.user = _run_as()
        self.folder = Path(tempfile.mkdtemp(prefix="leukoscope-pg-"))
        self.port = free_port()
        if self.user:
            shutil.chown(self.folder, self.user)

    def _run(self, *command: str) -> None:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        done = subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{command[0]} failed: {done.stderr.strip() or done.stdout.strip()}")

    def start(self) -> "Postgres":
        data = self.folder / "data"
        self._run(str(self.bin / "initdb"), "-D", str(data), "-A", "trust", "-U", "leukoscope", "-E", "UTF8", "--no-sync")
        self._run(str(self.bin / "pg_ctl"), "-D", str(data), "-l", str(self.folder / "server.log"), "-w", "-t", "60",
                  "-o", f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1", "start")
        wait_port(self.port)
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://leukoscope@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
