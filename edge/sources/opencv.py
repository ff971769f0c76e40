"""OpenCV capture: a V4L2 camera (/dev/videoN by index), a video file, or a stream URL."""

from __future__ import annotations

from typing import Iterator, Literal

import cv2
from pydantic import BaseModel, ConfigDict

from edge.sources import Frame, SourceLost


class OpenCVSourceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["opencv"] = "opencv"
    device: int | str = 0  # camera index, file path or URL
    width: int | None = None
    height: int | None = None


def open_source(settings: OpenCVSourceSettings) -> Iterator[Frame]:
    capture = cv2.VideoCapture(settings.device)
    if not capture.isOpened():
        raise SourceLost(f"OpenCV could not open {settings.device!r} (camera unplugged, busy, or wrong index/path?)")
    if settings.width and settings.height:
        capture.set(cv2.CAP_PROP_FRAME_WIDTH, settings.width)
        capture.set(cv2.CAP_PROP_FRAME_HEIGHT, settings.height)
    is_file = isinstance(settings.device, str) and "://" not in settings.device
    number = 0
    try:
        while True:
            ok, image = capture.read()
            if not ok or image is None or image.size == 0:
                if is_file:
                    return  # end of the video file
                raise SourceLost(f"OpenCV source {settings.device!r} stopped delivering frames")
            number += 1
            yield Frame(image=cv2.cvtColor(image, cv2.COLOR_BGR2RGB), name=f"{settings.device}#{number}")
    finally:
        capture.release()
