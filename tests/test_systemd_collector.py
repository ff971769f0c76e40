"""The collector's unit passes systemd's own checks, and is as hardened as the edge agent's."""

import re
import subprocess

from tests.conftest import ROOT
from tests.test_systemd import needs_analyze

UNIT = ROOT / "systemd" / "leukoscope-collector.service"


@needs_analyze
def test_collector_unit_security_exposure_is_low():
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", str(UNIT)], capture_output=True, text=True)
    level = float(re.search(r"Overall exposure level for .*: ([0-9.]+)", out.stdout).group(1))
    assert level <= 1.5, out.stdout  # stricter than the agent's 2.0: no devices, no netlink, W^X memory


@needs_analyze
def test_collector_unit_has_no_unknown_keys():
    out = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True)
    assert "Unknown key" not in out.stderr and "Unknown section" not in out.stderr, out.stderr


def test_collector_unit_runs_the_service_with_watchdog_state_and_credentials():
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "StateDirectory=leukoscope-collector", "LoadCredential=mqtt-password:",
                 "User=leukoscope", "RestartPreventExitStatus=2", "PrivateDevices=yes",
                 "ExecStart=/opt/leukoscope/venv/bin/collect run --config /etc/leukoscope/collector.toml"):
        assert line in text
