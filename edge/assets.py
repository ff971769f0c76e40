"""Where the files that ship with leukoscope are: the default model bundle and the sample frames.

They are data, not Python packages, so they cannot live inside ``edge/`` as package data without
moving the repository's ``models/`` and ``samples/``. A checkout (and an editable install) finds
them at the top of the repository; a regular install (``pip install .``, as ``systemd/install.sh``
does) puts them under ``<prefix>/share/leukoscope/`` through pyproject's ``data-files``. Looked up in
that order, so a device never depends on the checkout it was installed from.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
INSTALLED = Path(sys.prefix) / "share" / "leukoscope"


def shipped(relative: str) -> Path:
    """The shipped folder ``relative`` (e.g. ``models/default``): the checkout's, else the installed
    copy; when neither exists, the checkout's path, so that an error names where it was looked for."""
    for root in (REPOSITORY, INSTALLED):
        if (root / relative).is_dir():
            return root / relative
    return REPOSITORY / relative


DEFAULT_BUNDLE = shipped("models/default")
SAMPLE_FRAMES = shipped("samples/frames")
