"""What the agent's and the collector's configs share, in a module light enough for both (no OpenCV):
reading the TOML file, the topic prefix rule and the password file, each with its one-line error."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from edge.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def check_topic_prefix(value: str) -> str:
    """A pydantic validator's body: the prefix is a plain topic path (it is put in front of every topic)."""
    if not value or any(c in value for c in "+#") or value.startswith("/") or value.endswith("/"):
        raise ValueError("use a plain topic path such as 'lab1/leukoscope' (no +, #, or leading/trailing /)")
    return value


def read_password(password_file: Path | None, key: str = "mqtt.password_file") -> str | None:
    """Read a secret (a broker password, the web page's token; never logged). A relative name is looked up in
    systemd's credentials directory. ``key`` names the config key in the one-line error."""
    if not password_file:
        return None
    path = password_file
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if not path.is_absolute() and credentials and (Path(credentials) / path).is_file():
        path = Path(credentials) / path
    try:
        return path.read_text().rstrip("\r\n")
    except OSError as error:
        raise UserError(f"{key} {password_file} cannot be read ({error.strerror}); "
                        "check the path or the LoadCredential= line of the unit") from None


def read_toml(path: Path, example: str) -> dict:
    """The config file's table; one-line errors for a missing, unreadable or malformed file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist; copy {example} there and edit it") from None
    except OSError as error:
        raise UserError(f"config file {path} cannot be read ({error.strerror})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"{path}: not valid TOML ({error})") from None
