"""The collector's configuration: one validated schema, defaults in code, one TOML file.

Follows ``edge/config.py``: unknown keys are errors (a typo must not fall back to a default silently)
and every problem is one line naming the key. ``firmware_config/collector.toml`` is the documented
example; the tests load and validate it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edge.config_files import check_topic_prefix, read_password, read_toml
from edge.errors import UserError

DEFAULT_CONFIG = Path("/etc/leukoscope/collector.toml")
EXAMPLE = "firmware_config/collector.toml"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BrokerConfig(Strict):
    host: str = "localhost"
    port: int = Field(1883, ge=1, le=65535)
    topic_prefix: str = "leukoscope"
    username: str | None = None
    password_file: Path | None = Field(None, description="file holding the password; a bare name is looked up in $CREDENTIALS_DIRECTORY")
    #: Fixed, so that the broker keeps this session (and queues for it) while the collector is down.
    client_id: str = "leukoscope-collector"
    keepalive_s: int = Field(30, ge=5)
    reconnect_max_s: float = Field(30.0, gt=0)
    connect_timeout_s: float = Field(10.0, gt=0, description="how long to wait for the broker's answer at start")

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        return check_topic_prefix(value)

    @field_validator("client_id")
    @classmethod
    def _client_id(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value):
            raise ValueError("use 1-64 letters, digits, '.', '_' or '-'")
        return value

    @model_validator(mode="after")
    def _credentials(self) -> "BrokerConfig":
        if self.password_file and not self.username:
            raise ValueError("password_file is set but username is not; set mqtt.username")
        return self

    def password(self) -> str | None:
        """Read the password (never logged); see ``edge.config_files.read_password``."""
        return read_password(self.password_file)


class DatabaseConfig(Strict):
    """SQLite by default (a file, nothing to set up); ``url`` for a PostgreSQL server on a lab network."""

    path: Path = Field(Path(os.environ.get("STATE_DIRECTORY", "/var/lib/leukoscope-collector")) / "results.sqlite3",
                       description="SQLite database file; created with its folder's permissions")
    url: str | None = Field(None, description="PostgreSQL instead of SQLite: postgresql://USER@HOST:PORT/DATABASE")
    password_file: Path | None = Field(None, description="PostgreSQL password, read from this file (a bare name: "
                                       "$CREDENTIALS_DIRECTORY); never put it in the url")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError as error:
            raise ValueError(f"is not a URL ({error}); use postgresql://USER@HOST:PORT/DATABASE") from None
        if parts.scheme not in ("postgresql", "postgres") or not parts.path.strip("/"):
            raise ValueError("use postgresql://USER@HOST:PORT/DATABASE (SQLite: set database.path instead)")
        if parts.password is not None:
            raise ValueError("holds a password; put it in a file named by database.password_file instead")
        return value

    @model_validator(mode="after")
    def _one_database(self) -> "DatabaseConfig":
        if self.url and "path" in self.model_fields_set:
            raise ValueError("set database.path (SQLite) or database.url (PostgreSQL), not both")
        if self.password_file and not self.url:
            raise ValueError("password_file is for PostgreSQL; set database.url too, or remove it")
        return self

    def password(self) -> str | None:
        """Read the password (never logged); see ``edge.config_files.read_password``."""
        return read_password(self.password_file)


class BatchConfig(Strict):
    """Writes are committed in batches: one transaction per batch, and the broker is acknowledged
    (PUBACK) only after the commit, so a crash between the two redelivers instead of losing."""

    max_messages: int = Field(500, ge=1, le=100_000, description="commit after this many messages")
    max_delay_ms: int = Field(200, ge=1, le=60_000, description="commit at most this long after a batch's first message")


class CollectorConfig(Strict):
    mqtt: BrokerConfig = Field(default_factory=BrokerConfig)
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)


def _describe(error: dict) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key; remove it or check its spelling (see {EXAMPLE})"
    message = error["msg"].removeprefix("Value error, ")
    if "input" in error and not isinstance(error["input"], dict):
        return f"{key}: {message} (got {error['input']!r})"
    return f"{key}: {message}"


def parse_config(data: dict, origin: str = "config") -> CollectorConfig:
    try:
        return CollectorConfig.model_validate(data)
    except ValidationError as error:
        raise UserError(f"{origin}: " + "; ".join(_describe(e) for e in error.errors())) from None


def load_config(path: Path) -> CollectorConfig:
    data = read_toml(path, EXAMPLE)
    return parse_config(data, str(path))
