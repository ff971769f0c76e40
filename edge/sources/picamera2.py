"""Raspberry Pi cameras through picamera2 (libcamera), with colours held still for the model.

Auto exposure and auto white balance drift with the slide under the lens; a classifier
trained on stain-normalised crops wants stable colour, so both are fixed from the config.
picamera2 is imported only when this source is used (it exists only on Raspberry Pi OS).
"""

from __future__ import annotations

from typing import Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from edge.errors import UserError
from edge.sources import Frame, SourceLost


class Picamera2SourceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["picamera2"] = "picamera2"
    camera: int = 0
    width: int = 2028
    height: int = 1520
    exposure_us: int = Field(8000, gt=0, description="fixed exposure time (microseconds)")
    analogue_gain: float = Field(1.0, ge=1.0)
    colour_gains: tuple[float, float] = (1.8, 1.6)  # red, blue: fixed white balance
    timeout_s: float = 5.0


def _what_to_check(error: BaseException) -> str:
    """The fix for a camera that would not open. libcamera lets one process hold a camera: `edge calibrate`
    or `edge check` run beside the service get "Device or resource busy", where the cable is not the cause."""
    text = str(error).lower()
    if "busy" in text or "in use" in text:
        return "another process holds it (the leukoscope-edge service? sudo systemctl stop leukoscope-edge first)"
    return "is the ribbon cable seated and camera_auto_detect=1 (or the right dtoverlay) in config.txt?"


def open_source(settings: Picamera2SourceSettings) -> Iterator[Frame]:
    try:
        from picamera2 import Picamera2
    except ImportError:
        raise UserError("source type 'picamera2' needs the picamera2 package: sudo apt install python3-picamera2 "
                        "(and create the venv with --system-site-packages)") from None
    try:
        camera = Picamera2(settings.camera)
        config = camera.create_video_configuration(main={"size": (settings.width, settings.height), "format": "RGB888"})
        camera.configure(config)
        camera.set_controls({"AeEnable": False, "ExposureTime": settings.exposure_us, "AnalogueGain": settings.analogue_gain,
                             "AwbEnable": False, "ColourGains": settings.colour_gains})
        camera.start()
    except (RuntimeError, IndexError, OSError) as error:
        raise SourceLost(f"camera {settings.camera} could not be opened ({error}); {_what_to_check(error)}") from None
    number = 0
    try:
        while True:
            try:
                job = camera.capture_array("main", wait=False)
                bgr = camera.wait(job, timeout=settings.timeout_s)
            except (TimeoutError, RuntimeError) as error:
                raise SourceLost(f"camera {settings.camera} timed out ({error or 'no frame'})") from None
            number += 1
            # picamera2's "RGB888" is stored B, G, R in memory.
            yield Frame(image=bgr[..., ::-1].copy(), name=f"picamera2:{settings.camera}#{number}")
    finally:
        camera.close()
