"""The agent's broker settings, in a module without OpenCV: the publisher (and anything else that only
talks MQTT) imports these, not ``edge.config``, whose segmentation and source settings pull in OpenCV
and the camera backends."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edge.config_files import check_topic_prefix, read_password


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TLSConfig(Strict):
    ca_file: Path | None = Field(None, description="CA certificate (PEM); unset: the system's CAs")
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure_skip_verify: bool = False


#: systemd/leukoscope-edge.service's TimeoutStopSec: after it, systemd SIGKILLs the agent.
UNIT_TIMEOUT_STOP_S = 30.0
#: What a stop needs besides delivering the backlog: the frame in hand, the final summary, the
#: ``offline`` status (up to 2 s) and the publisher's threads. mqtt.stop_timeout_s gets the rest.
STOP_OVERHEAD_S = 10.0


class MQTTConfig(Strict):
    enabled: bool = True
    host: str = "localhost"
    port: int = Field(1883, ge=1, le=65535)
    topic_prefix: str = "leukoscope"
    username: str | None = None
    password_file: Path | None = Field(None, description="file holding the password; a bare name is looked up in $CREDENTIALS_DIRECTORY")
    tls: TLSConfig | None = None
    keepalive_s: int = Field(30, ge=5)
    client_id: str | None = None
    max_inflight: int = Field(100, ge=1, le=65535)
    reconnect_max_s: float = Field(30.0, gt=0)
    stats_interval_s: float = Field(30.0, gt=0)
    stop_timeout_s: float = Field(10.0, ge=0, description="on stop, how long to keep delivering the outbox before "
                                  "exiting; what is left waits there for the next start")

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        return check_topic_prefix(value)

    @field_validator("stop_timeout_s")
    @classmethod
    def _stop_within_the_unit(cls, value: float) -> float:
        limit = UNIT_TIMEOUT_STOP_S - STOP_OVERHEAD_S
        if value > limit:
            raise ValueError(f"use at most {limit:g} s: the whole stop must end within the unit's "
                             f"TimeoutStopSec={UNIT_TIMEOUT_STOP_S:g}, or systemd kills the agent")
        return value

    @model_validator(mode="after")
    def _credentials(self) -> "MQTTConfig":
        if self.password_file and not self.username:
            raise ValueError("password_file is set but username is not; set mqtt.username")
        return self

    def password(self) -> str | None:
        """Read the password (never logged); see ``edge.config_files.read_password``."""
        return read_password(self.password_file)
