"""The agent's configuration: one validated schema, defaults in code, one TOML file on the device.

Unknown keys are errors (a typo must not silently fall back to a default), and every problem
is reported as one line naming the key and what would fix it. ``firmware_config/leukoscope.toml``
is the documented example; the tests load and validate it.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import Field, ValidationError, field_validator, model_validator

from edge.assets import DEFAULT_BUNDLE
from edge.config_files import read_password, read_toml
from edge.config_mqtt import MQTTConfig, Strict
from edge.errors import UserError
from edge.segmentation import SegmentationSettings
from edge.sources.folder import FolderSourceSettings
from edge.sources.opencv import OpenCVSourceSettings
from edge.sources.picamera2 import Picamera2SourceSettings


class DeviceConfig(Strict):
    id: str = Field(default_factory=lambda: socket.gethostname(), description="device id used in MQTT topics")

    @field_validator("id")
    @classmethod
    def _topic_safe(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value):
            raise ValueError("use 1-64 letters, digits, '.', '_' or '-' (it becomes part of MQTT topics)")
        return value


class ClassifierConfig(Strict):
    bundle: Path = Field(DEFAULT_BUNDLE, description="model bundle folder (`quantize export`); default: the shipped model")
    num_threads: int | None = Field(None, ge=1, le=16, description="interpreter threads per frame; unset: the "
                                    "cores each of pipeline.workers has (cores // workers, at least 1)")
    edgetpu: bool = False
    cpu_fallback: bool = Field(True, description="run on the CPU if the Edge TPU cannot be used")
    max_batch: int = Field(32, ge=1, le=256)


#: Keys of earlier versions, and what replaced them (a one-line hint instead of "unknown key").
RENAMED_KEYS = {
    "cell_diameter_px": "segmentation.cell_diameter_px was replaced by segmentation.um_per_px (the frame's scale, "
                        "measured by `edge calibrate`) and cell_diameter_um",
    "microns_per_pixel": "segmentation.microns_per_pixel is now segmentation.um_per_px",
}


class SegmentationConfig(Strict):
    um_per_px: float | None = Field(None, gt=0, le=5.0, description="frame scale, µm per pixel (`edge calibrate`)")
    calibrate_on_start: bool = Field(False, description="um_per_px unset: measure it on the first frames' red cells")
    watch_scale_every: int = Field(50, ge=0, description="re-measure red cells every N frames, warn on drift > 10%; 0: off")
    cell_diameter_um: float = Field(SegmentationSettings.cell_diameter_um, gt=0, le=100)
    detect_width: int = Field(SegmentationSettings.detect_width, ge=64)
    blue_threshold: int = Field(SegmentationSettings.blue_threshold, ge=0, le=255)
    dark_level: int = Field(SegmentationSettings.dark_level, ge=0, le=255)
    pale_nucleus_level: int = Field(SegmentationSettings.pale_nucleus_level, ge=0, le=255,
                                    description="or darker than this and violet: a lightly stained nucleus")
    pale_nucleus_blue: int = Field(SegmentationSettings.pale_nucleus_blue, ge=0, le=255,
                                   description="how much bluer than red such a nucleus must be")
    min_area_fraction: float = Field(SegmentationSettings.min_area_fraction, gt=0)
    max_area_fraction: float = Field(SegmentationSettings.max_area_fraction, gt=0)
    learned_split: bool = Field(SegmentationSettings.learned_split,
                                description="tell touching cells apart with the bundle's learned splitter, when it has one")

    def settings(self) -> SegmentationSettings:
        return SegmentationSettings(**self.model_dump(exclude={"calibrate_on_start", "watch_scale_every"}))


class OutboxConfig(Strict):
    path: Path = Field(Path(os.environ.get("STATE_DIRECTORY", "/var/lib/leukoscope")) / "outbox.sqlite3")
    max_messages: int = Field(500_000, ge=10, description="bound on stored results (about 1 KB each)")
    when_full: Literal["drop_oldest", "drop_newest"] = "drop_oldest"


class PipelineConfig(Strict):
    queue_size: int = Field(4, ge=1, le=256, description="frames waiting for inference; when full the oldest is dropped")
    workers: int = Field(2, ge=1, le=16, description="frames analysed at once, each on a core of its own "
                         "(results keep frame order); 1: one at a time")
    processes: bool = Field(False, description="analyse in one process per worker instead of threads: ~1.2x the frames/s "
                            "on 2 cores, ~50 MB more memory per worker (edge/workers.py); not with classifier.edgetpu")
    sample_id: str | None = Field(None, description="sample to start with; normally set by cmd/start_sample")
    watchdog_stall_s: float = Field(60.0, gt=0, description="no frame processed for this long: stop feeding the watchdog")
    log_results: bool = Field(False, description="log one line per frame (demo); the service publishes instead")


class ReviewConfig(Strict):
    folder: Path | None = Field(None, description="save annotated frames and flagged crops here; unset: off")
    max_files: int = Field(500, ge=1)
    all_frames: bool = Field(False, description="annotate every frame, not only those with a flagged cell")


LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


class WebTLSConfig(Strict):
    cert_file: Path = Field(description="server certificate chain (PEM)")
    key_file: Path = Field(description="its private key (PEM); keep it readable by the service only")


class WebConfig(Strict):
    """The local page (edge/web): off by default, loopback only unless configured otherwise."""

    enabled: bool = False
    host: str = Field("127.0.0.1", description="address to listen on; anything but loopback needs token_file")
    port: int = Field(8080, ge=0, le=65535, description="0: any free port (tests)")
    token_file: Path | None = Field(None, description="file holding the access token; a bare name is looked up in "
                                    "$CREDENTIALS_DIRECTORY; required off loopback")
    tls: WebTLSConfig | None = None
    allowed_hosts: list[str] = Field(default_factory=list, description="extra Host names the page answers to "
                                     "(e.g. the Pi's DNS name); loopback names are always allowed")
    review_db: Path = Field(Path(os.environ.get("STATE_DIRECTORY", "/var/lib/leukoscope")) / "reviews.sqlite3")
    review_max_crops: int = Field(2000, ge=10, description="unreviewed crops kept; the oldest go first")
    unflagged_fraction: float = Field(0.02, ge=0, le=1, description="share of unflagged cells offered for review, "
                                      "so that misses can be estimated too")
    review_crops_per_minute: float = Field(30.0, gt=0, le=6000, description="most crops kept for review per minute "
                                           "(bursts of 8): more than a person reviews, and the page's cost stays small")
    max_body_bytes: int = Field(16384, ge=256, le=1 << 20)
    rate_per_s: float = Field(20.0, gt=0, description="requests per second per client address (sustained)")
    rate_burst: int = Field(60, ge=1)
    max_connections: int = Field(16, ge=2, le=256)
    stream_fps: float = Field(4.0, gt=0, le=30, description="most frames per second sent to one live view")

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9.\-\[\]:]{1,253}", name):
                raise ValueError(f"{name!r} is not a host name; give names such as 'scope-01.lab.example'")
        return value

    @model_validator(mode="after")
    def _guarded_off_loopback(self) -> "WebConfig":
        if self.enabled and self.host not in LOOPBACK_HOSTS and not self.token_file:
            raise ValueError(f"host {self.host!r} is not loopback, so the page needs a token: set web.token_file "
                             "(a file, or a systemd credential name) or keep host = '127.0.0.1'")
        return self

    def token(self) -> str | None:
        """The access token (never logged); an empty file is refused, since it would let anyone in."""
        token = read_password(self.token_file, "web.token_file")
        if token is not None and len(token.strip()) < 12:
            raise UserError(f"web.token_file {self.token_file}: use a token of at least 12 characters "
                            "(e.g. `openssl rand -hex 16`)")
        return None if token is None else token.strip()

class UpdatesConfig(Strict):
    """Signed model updates over MQTT (``quantize publish``); off unless a public key is set."""

    enabled: bool = Field(False, description="accept bundles sent with `quantize publish`")
    public_key: str | None = Field(None, description="Ed25519 public key, base64 (`quantize keygen` prints it)")
    folder: Path = Field(Path(os.environ.get("STATE_DIRECTORY", "/var/lib/leukoscope")) / "bundles",
                         description="received bundles, the active and the previous one")
    reserve_mb: float = Field(50.0, ge=0, description="free disk space an update must leave; less: refused")

    @field_validator("public_key")
    @classmethod
    def _key(cls, value: str | None) -> str | None:
        import base64
        import binascii

        if value is None:
            return value
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 32:
            raise ValueError("must be a base64 Ed25519 public key (32 bytes); copy it from `quantize keygen`")
        return value

    @model_validator(mode="after")
    def _needs_key(self) -> "UpdatesConfig":
        if self.enabled and not self.public_key:
            raise ValueError("enabled without public_key; set updates.public_key (from `quantize keygen`)")
        return self


Source = Annotated[Union[FolderSourceSettings, OpenCVSourceSettings, Picamera2SourceSettings], Field(discriminator="type")]


class AgentConfig(Strict):
    device: DeviceConfig = Field(default_factory=DeviceConfig)
    source: Source
    segmentation: SegmentationConfig = Field(default_factory=SegmentationConfig)
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig)
    mqtt: MQTTConfig = Field(default_factory=MQTTConfig)
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    review: ReviewConfig = Field(default_factory=ReviewConfig)
    web: WebConfig = Field(default_factory=WebConfig)
    updates: UpdatesConfig = Field(default_factory=UpdatesConfig)

    @model_validator(mode="after")
    def _one_tpu_user(self) -> "AgentConfig":
        if self.pipeline.processes and self.classifier.edgetpu:
            raise ValueError("pipeline.processes: one Edge TPU cannot be opened by several processes; "
                             "set pipeline.processes = false (threads share it) or classifier.edgetpu = false")
        return self

    @property
    def interpreter_threads(self) -> int:
        return interpreter_threads(self.classifier.num_threads, self.pipeline.workers)


def interpreter_threads(configured: int | None, workers: int) -> int:
    """The model's threads per frame: as configured, or the cores each analysing worker has. Frames are
    analysed ``workers`` at a time, so an interpreter pool wider than its share only contends for the
    same cores (2 cores, 2 workers: 54 frames/s of 1080p with 1 interpreter thread, 51 with 2)."""
    return configured or max(1, (os.cpu_count() or 1) // max(1, workers))


def _describe(error: dict) -> str:
    key = ".".join(str(part) for part in error["loc"] if not str(part).startswith("function-after"))
    kind = error["type"]
    if kind == "extra_forbidden" and key.split(".")[-1] in RENAMED_KEYS and key.startswith("segmentation."):
        return RENAMED_KEYS[key.split(".")[-1]]
    if kind == "extra_forbidden":
        return f"{key}: unknown key; remove it or check its spelling (see firmware_config/leukoscope.toml)"
    if kind == "missing":
        return f"{key}: required; add it to the config"
    if kind == "union_tag_invalid":
        return f"{key}: unknown source type {error['input'].get('type')!r}; use 'folder', 'opencv' or 'picamera2'"
    if kind == "union_tag_not_found":
        return f"{key}: needs type = 'folder', 'opencv' or 'picamera2'"
    message = error["msg"].removeprefix("Value error, ")
    return f"{key}: {message} (got {error.get('input')!r})" if "input" in error and not isinstance(error["input"], dict) else f"{key}: {message}"


def parse_config(data: dict, origin: str = "config") -> AgentConfig:
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as error:
        problems = [_describe(e) for e in error.errors()]
        raise UserError(f"{origin}: " + "; ".join(problems)) from None


def load_config(path: Path) -> AgentConfig:
    data = read_toml(path, "firmware_config/leukoscope.toml")
    return parse_config(data, str(path))
