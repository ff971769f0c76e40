"""What every leukoscope command shares: logging that fits journald, and one-line errors."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from edge.errors import UserError


def setup_logging(verbose: bool = False) -> None:
    """Plain ``level name: message`` lines; under systemd the journal adds its own timestamps.

    SIGUSR1 dumps every thread's stack to stderr (the journal), for a device that seems stuck.
    """
    import faulthandler
    import signal

    if hasattr(signal, "SIGUSR1"):
        try:
            faulthandler.register(signal.SIGUSR1, all_threads=True)
        except (ValueError, OSError, AttributeError):  # stderr without a file descriptor (captured in tests)
            pass
    under_journal = bool(os.environ.get("JOURNAL_STREAM"))
    fmt = "%(levelname)s %(name)s: %(message)s" if under_journal else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=fmt, stream=sys.stderr, force=True)


def run_command(command: Callable[[], int | None], program: str) -> int:
    """Run a command; a ``UserError`` becomes one line on stderr and exit status 2."""
    try:
        return int(command() or 0)
    except UserError as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        return 130
