from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from experiments.orthanc import Orthanc
from medsplit.brokers.mosquitto import Mosquitto
from tests.support.image_build import ImageBuild

CONTAINER_TESTS = "tests/integration/test_containers.py"
IMAGE_BUILD = pytest.StashKey[ImageBuild]()


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected what will not run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """When a container test will run: it runs last, and its images start building now, in the
    background, while the other tests run (tests/support/image_build.py)."""
    containers = [item for item in items if item.nodeid.startswith(CONTAINER_TESTS)]
    if not containers or config.option.collectonly:
        return
    items[:] = [item for item in items if item not in containers] + containers
    config.stash[IMAGE_BUILD] = ImageBuild.start(Path(tempfile.mkdtemp(prefix="medsplit-images-")))


def pytest_unconfigure(config: pytest.Config) -> None:
    build = config.stash.get(IMAGE_BUILD, None)
    if build is not None:
        build.stop()  # only if the session ended before its container tests waited for it


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One real Mosquitto for the test session, on a free loopback port."""
    broker = Mosquitto(Path(tmp_path_factory.mktemp("mosquitto"))).start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """One real Orthanc PACS with its DICOMweb plugin for the session, on a free loopback port;
    tests upload studies of their own (fresh UIDs), so they never see each other's."""
    pacs = Orthanc(Path(tmp_path_factory.mktemp("orthanc"))).start()
    yield pacs
    pacs.stop()
