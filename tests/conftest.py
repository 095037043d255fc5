from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from medsplit.brokers.mosquitto import Mosquitto


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One real Mosquitto for the test session, on a free loopback port."""
    broker = Mosquitto(Path(tmp_path_factory.mktemp("mosquitto"))).start()
    yield broker
    broker.stop()
