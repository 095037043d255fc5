"""The images built for real and the compose trial run to the end with mutual TLS.

The fixtures build what `make compose-demo` builds, the way it builds it: a Docker engine
(Debian's docker.io and a dockerd started with --bridge=none --iptables=false when none answers),
the base images from a debootstrapped Debian when absent, the wheelhouse, both images. No
registry is reachable here, every container uses host networking, so all traffic stays on
127.0.0.1. If Docker cannot start, the test fails saying why; it never skips itself.

The trial: Mosquitto from the provisioned config, the aggregator, two agents with DICOM folders,
hospital-a's through a broker of its own bridged to the central one (the compose option).
Mid-job the aggregator's container is killed with SIGKILL from the host, as a crash or the OOM
killer would; Docker restarts it, it resumes from its checkpoint, and the job completes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from experiments.compose_demo import (
    BRIDGED,
    SITES,
    ComposeRun,
    docker_inspect,
    down,
    prepare,
    state,
    up,
    wait_for_aggregator,
)
from tests.conftest import IMAGE_BUILD
from tests.support.image_build import ImageBuild

# A cold machine installs docker.io, debootstraps the base images, makes the wheelhouse and
# builds both images: more than the suite's 300 s per test, even started in the background at
# the beginning of the session. The build has its own limit (``ImageBuild.wait``), which says
# what it was waiting for.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]
ROUNDS = 5


@pytest.fixture(scope="module")
def images(request: pytest.FixtureRequest) -> Iterator[None]:
    """Both images built (in the background since the session began: tests/conftest.py); a
    dockerd the build started is stopped at the end."""
    build = request.config.stash.get(IMAGE_BUILD, None)
    if build is None:  # collected another way: build now
        build = ImageBuild.start(Path(tempfile.mkdtemp(prefix="medsplit-images-")))
    problem = build.wait(1500)
    engine = build.started_engine()
    try:
        if problem is not None:
            pytest.fail(problem, pytrace=False)
        yield
    finally:
        if engine is not None:
            os.kill(engine, signal.SIGTERM)
            _wait_gone(engine, 60)


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)  # polling a process that is not ours to wait() for
    raise AssertionError(f"dockerd {pid} still running {timeout:g} s after SIGTERM")


def _until(what: str, predicate: object, timeout: float) -> None:
    """Poll ``predicate`` (a callable) until true; fail naming ``what`` was awaited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.2)  # a file or a container state on the host: nothing to block on
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


@pytest.fixture
def trial(images: None, tmp_path: Path) -> Iterator[ComposeRun]:
    run = prepare(
        tmp_path / "trial",
        rounds=ROUNDS,
        per_site=32,
        project=f"medsplit-test-{os.getpid()}",
        hospital_broker=True,
    )
    try:
        yield run
    finally:
        down(run)
        left = subprocess.run(
            [
                "docker",
                "ps",
                "--all",
                "--quiet",
                "--filter",
                f"label=com.docker.compose.project={run.project}",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        assert left.stdout.strip() == "", "compose down left containers behind"


def test_the_compose_trial_survives_a_killed_aggregator_and_completes(trial: ComposeRun) -> None:
    up(trial)
    aggregator = trial.container("aggregator")

    # Hardened as the compose file says, and as the kernel sees it.
    for service in ("aggregator", *SITES):
        container = trial.container(service)
        assert docker_inspect(container, "{{.HostConfig.ReadonlyRootfs}}") == "true", service
        assert docker_inspect(container, "{{.HostConfig.NetworkMode}}") == "host", service
        written = subprocess.run(
            ["docker", "exec", container, "touch", "/opt/medsplit/x"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert written.returncode != 0
        assert "Read-only file system" in written.stderr, service
        uid = subprocess.run(
            ["docker", "exec", container, "id", "-u"], capture_output=True, text=True, check=True
        )
        assert uid.stdout.strip() != "0", service
    for broker in ("broker", "hospital-broker"):
        assert docker_inspect(trial.container(broker), "{{.Config.User}}").split(":")[0] != "0"
        assert docker_inspect(trial.container(broker), "{{.HostConfig.ReadonlyRootfs}}") == "true"
    # The health checks passed (compose started the agents only once the aggregator was ready).
    assert docker_inspect(aggregator, "{{.State.Health.Status}}") == "healthy"

    first = trial.checkpoints / "compose-demo" / "round-00001.safetensors"
    _until("the checkpoint of round 1", first.is_file, 300)
    assert not trial.report.exists(), "the job ended before the kill: make it longer"
    pid = int(docker_inspect(aggregator, "{{.State.Pid}}"))
    os.kill(pid, signal.SIGKILL)  # the container's init, from the host: a crash, not a stop
    _until(
        "Docker to restart the killed aggregator",
        lambda: (
            int(docker_inspect(aggregator, "{{.RestartCount}}")) >= 1
            and state(trial, "aggregator") == "running"
        ),
        120,
    )
    assert wait_for_aggregator(trial, 600) == 0

    report = json.loads(trial.report.read_text())
    assert report["status"] == "completed"
    assert len(report["history"]) == ROUNDS
    assert report["faults"]["resumed_from"] is not None  # it went on from a checkpoint
    assert set(report["final"]["sites"]) == set(SITES)
    for site in SITES:
        assert (trial.run / site / "state" / "model.onnx").is_file(), site
    logs = trial.compose("logs", "--no-color", "broker").stdout
    # Mutual TLS: the broker knew each by its CN; hospital-a only through its bridge.
    for identity in ("aggregator", "hospital-b", f"bridge:{BRIDGED}"):
        assert f"u'{identity}'" in logs, identity
    assert f"u'{BRIDGED}'" not in logs
    hospital = trial.compose("logs", "--no-color", "hospital-broker").stdout
    assert f"u'{BRIDGED}'" in hospital


def test_the_compose_file_is_valid_for_docker_compose(trial: ComposeRun) -> None:
    rendered = trial.compose("config", "--format", "json").stdout
    services = json.loads(rendered)["services"]
    assert set(services) == set(trial.services)
    assert "hospital-broker" in services
    for name, service in services.items():
        assert service["network_mode"] == "host", name
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name


def test_the_edge_image_can_align_a_vertical_party(images: None, tmp_path: Path) -> None:
    """The PSI library is in the edge image (installed without its protobuf pin) and runs: the
    image's own data-check aligns a real intersection through it, on a read-only root."""
    (tmp_path / "site.yaml").write_text(
        "site_id: imaging\njob_id: j\n"
        "data: {source: builtin-vertical, parties: 2, index: 1, coverage: 0.5}\n"
    )
    tmp_path.chmod(0o755)
    (tmp_path / "site.yaml").chmod(0o644)
    checked = subprocess.run(
        ["docker", "run", "--rm", "--network", "host", "--read-only", "--tmpfs", "/tmp",
         "-v", f"{tmp_path}:/etc/medsplit:ro", "medsplit-edge:latest",
         "data-check", "--config", "/etc/medsplit/site.yaml"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr[-2000:]
    assert "imaging: 284 patients (no labels), input [15]" in checked.stdout
    assert "alignment: openmined-psi 2." in checked.stdout
