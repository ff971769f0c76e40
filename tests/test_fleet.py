"""A small fleet through a real mosquitto into the real collector (benchmarks/bench_fleet.py at test size):
the broker stopped while devices keep producing, the collector restarted mid-drain, and every result
stored exactly once, in order, with no gap, in SQLite and in PostgreSQL; and the bridged layout
(device broker -> site broker, as firmware_config/mosquitto-bridge.conf ships it) across a site broker
outage and a device broker restart."""

from __future__ import annotations

import pytest

from benchmarks.bench_fleet import fleet
from tests.broker import MOSQUITTO

pytestmark = [pytest.mark.slow, pytest.mark.skipif(MOSQUITTO is None, reason="the fleet test needs mosquitto (apt-get install mosquitto)")]


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_fleet_loses_and_doubles_nothing_across_a_broker_outage_and_a_collector_restart(request, tmp_path, database):
    url = request.getfixturevalue("postgres_server").new_database() if database == "postgresql" else None
    outcome = fleet(devices=20, live=5, backlog=10, ingest=5, processes=2, postgres_url=url, folder=tmp_path, timeout=120)
    assert outcome["collector_restarted_mid_drain"] and outcome["collector_exit"] == 0
    assert (outcome["stored"], outcome["lost"], outcome["duplicated"], outcome["gaps"]) == (20 * 20, 0, 0, 0), outcome
    assert outcome["devices_complete"] == 20 and outcome["undelivered_in_outboxes"] == 0
    assert outcome["out_of_order"] == 0, outcome


def test_a_bridged_fleet_loses_nothing_when_the_site_broker_is_down_and_the_device_broker_restarts(tmp_path):
    """The site-outage backlog is acknowledged by the device broker (the devices' outboxes empty), so it
    lives only in the bridge's queue across the device broker's restart: lost if the shipped bridge
    config used QoS 0, a clean session, or too short a queue."""
    outcome = fleet(devices=10, live=5, backlog=10, ingest=5, processes=2, folder=tmp_path, timeout=120, bridged=True)
    assert outcome["bridged"] and outcome["site_outage_drain_s"] is not None
    assert outcome["collector_restarted_mid_drain"] and outcome["collector_exit"] == 0
    assert (outcome["stored"], outcome["lost"], outcome["duplicated"], outcome["gaps"], outcome["out_of_order"]) == (10 * 30, 0, 0, 0, 0), outcome
    assert outcome["devices_complete"] == 10 and outcome["undelivered_in_outboxes"] == 0
