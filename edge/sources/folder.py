"""Replay image files from a folder (or one file): the demo, tests, and re-analysis of saved frames."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator, Literal

from pydantic import BaseModel, ConfigDict

from edge.errors import DataError, UserError
from edge.preprocessing import read_rgb
from edge.sources import Frame

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


class FolderSourceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["folder"] = "folder"
    path: Path
    loop: bool = False
    fps: float | None = None  # pace frames like a camera; None = as fast as processed


def image_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"frame source {path} does not exist; give a folder of images or one image file")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"frame source {path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def open_source(settings: FolderSourceSettings) -> Iterator[Frame]:
    files = image_files(settings.path)
    interval = 1.0 / settings.fps if settings.fps else 0.0
    while True:
        for path in files:
            started = time.monotonic()
            try:
                yield Frame(image=read_rgb(path), name=path.name)
            except DataError as error:
                yield Frame(image=None, name=path.name, error=str(error))
            if interval:
                time.sleep(max(0.0, interval - (time.monotonic() - started)))
        if not settings.loop:
            return
