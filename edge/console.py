"""What every leukoscope command shares: logging that fits journald, one-line errors, output folders
that appear only when complete."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TextIO, TypeVar

from edge.errors import UserError

T = TypeVar("T")
#: Python loggers of the frameworks, kept to warnings unless ``-v``.
FRAMEWORK_LOGGERS = ("tensorflow", "absl", "keras", "h5py", "matplotlib", "PIL")


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
    for framework in FRAMEWORK_LOGGERS:  # their INFO lines ("Assets written to /tmp/...") mean nothing to a user
        logging.getLogger(framework).setLevel(logging.DEBUG if verbose else logging.WARNING)
    # Native TensorFlow logging (oneDNN and absl banners) is read once, when TensorFlow loads.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "2")


@contextmanager
def stdout_to_debug_log(what: str) -> Iterator[None]:
    """Send what is written to stdout, by Python or by native code (file descriptor 1), to the debug
    log while the block runs: the TFLite converter prints a ``TensorSpec`` dump, some 70 lines, that
    buries the few lines a person needs. ``-v`` shows it. Stderr is left alone: warnings and the
    progress bar of the same block must still reach the user."""
    sys.stdout.flush()
    with tempfile.TemporaryFile(mode="w+b") as sink:
        try:
            saved: int | None = os.dup(1)
            os.dup2(sink.fileno(), 1)
        except OSError:  # no real descriptor 1 (some embedders): native output stays where it is
            saved = None
        try:
            with contextlib.redirect_stdout(io.StringIO()) as python_stdout:
                yield
        finally:
            if saved is not None:
                os.dup2(saved, 1)
                os.close(saved)
            sink.seek(0)
            text = (python_stdout.getvalue() + sink.read().decode(errors="replace")).rstrip()
            if text:
                logging.getLogger(__name__).debug("%s:\n%s", what, text)


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


@contextmanager
def staged_folder(out: Path, overwrite: bool = False, flag: str = "--out") -> Iterator[Path]:
    """A folder to write ``out``'s content into, renamed into place only when the block completes.

    Runs and bundles are judged by what is in their folder: a half-written one (Ctrl-C, a crash, a
    refused export) must never look like a finished one, and a finished one is never mixed with the
    leftovers of another. The staging folder is a hidden sibling of ``out`` (same file system, so the
    final rename is atomic); a non-empty ``out`` is refused unless ``overwrite``, then replaced whole.
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} is a file, not a folder; choose another {flag}")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{flag} {out} exists and is not empty; choose a new {flag} or pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
        staging.chmod(0o755)  # mkdtemp makes it private; a service user must be able to read it
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / out.name)
            staging.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def interactive(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default stdout) is a terminal. Progress bars redraw a line with ``\\r`` and
    colour it with ANSI codes: a joy on a terminal, hundreds of garbage lines in a file or journald."""
    stream = stream or sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)())


def progress(iterable: Iterable[T], **kwargs: Any) -> Iterable[T]:
    """A tqdm bar on stderr when it is a terminal; nothing at all when it is a file, a pipe or the journal."""
    from tqdm import tqdm

    return tqdm(iterable, disable=None, **kwargs)
