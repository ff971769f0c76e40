"""The unit passes systemd's own checks where systemd-analyze is available."""

import re
import shutil
import subprocess

import pytest

from tests.conftest import ROOT

UNIT = ROOT / "systemd" / "leukoscope-edge.service"
#: Every unit the project ships: each must pass systemd's own checks.
UNITS = [UNIT, ROOT / "systemd" / "leukoscope-collector.service"]
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")


@needs_analyze
@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.stem)
def test_unit_security_exposure_is_low(unit):
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)], capture_output=True, text=True)
    level = float(re.search(r"Overall exposure level for .*: ([0-9.]+)", out.stdout).group(1))
    print(f"\nsystemd-analyze security exposure: {level}")
    assert level <= 2.0


@needs_analyze
@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.stem)
def test_unit_has_no_unknown_keys(unit):
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert "Unknown key" not in out.stderr and "Unknown section" not in out.stderr, out.stderr


def test_unit_is_a_notify_service_with_watchdog_and_credentials():
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "StateDirectory=leukoscope", "LoadCredential=mqtt-password:", "LoadCredential=web-token:", "User=leukoscope",
                 "RestartPreventExitStatus=2"):
        assert line in text


def test_the_longest_allowed_stop_fits_in_timeout_stop_sec():
    from edge.config import parse_config
    from edge.config_mqtt import STOP_OVERHEAD_S, UNIT_TIMEOUT_STOP_S
    from edge.errors import UserError

    assert float(re.search(r"^TimeoutStopSec=(\d+)$", UNIT.read_text(), re.M).group(1)) == UNIT_TIMEOUT_STOP_S
    longest = UNIT_TIMEOUT_STOP_S - STOP_OVERHEAD_S
    assert parse_config({"source": {"type": "folder", "path": "/f"}, "mqtt": {"stop_timeout_s": longest}})
    with pytest.raises(UserError, match="mqtt.stop_timeout_s: use at most 20 s: the whole stop must end within"):
        parse_config({"source": {"type": "folder", "path": "/f"}, "mqtt": {"stop_timeout_s": longest + 1}})


def test_install_script_parses_and_names_both_roles():
    script = ROOT / "systemd" / "install.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    done = subprocess.run(["bash", str(script), "lab-server"], capture_output=True, text=True)  # refused before anything runs
    assert done.returncode == 2 and done.stderr.strip() == "install.sh: unknown role 'lab-server'; use 'edge' (default) or 'collector'"
    text = script.read_text()
    for unit in UNITS:
        assert f"unit={unit.stem}" in text
    assert '"$prefix[$role]"' in text and "collector-db-password" in (ROOT / "systemd" / "leukoscope-collector.service").read_text()
