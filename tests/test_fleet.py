"""A small fleet through a real mosquitto into the real collector (benchmarks/bench_fleet.py at test size):
the broker stopped while devices keep producing, the collector restarted mid-drain, and every result
stored exactly once, in order, with no gap, in SQLite and in PostgreSQL."""

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
    if database == "sqlite":
        assert outcome["out_of_order"] == 0, outcome
