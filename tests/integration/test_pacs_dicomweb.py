"""A site reads its studies from a real PACS over DICOMweb: Orthanc with its DICOMweb plugin,
started by the test session on a loopback port and filled with ``medsplit dicom-synth`` studies.

Retrieval gives what reading the same files from disk gives; an agent killed mid-download
fetches, started again, only what it lacks; an instance the PACS cannot serve, a labels row
naming an instance the PACS does not hold, and a wrong password each end as docs/data.md says.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from edge_agent.data.dicom_source import load_dicom_site
from edge_agent.data.dicom_synth import synthesize_site
from edge_agent.data.pacs_source import load_dicomweb_site
from edge_agent.data.settings import DicomData, DicomWebData, VolumeData
from edge_agent.data.site_data import DataError, SiteData
from edge_agent.data.volume_source import load_volume_site
from edge_agent.data.volume_synth import synthesize_volumes
from experiments.orthanc import Orthanc, OrthancTls
from tests.support.certs import CertificateAuthority

CLASSES = ["normal", "lesion"]


def _site(orthanc: Orthanc, out: Path, count: int, *, seed: int, size: int = 64) -> Path:
    """A dicom-synth site folder, every file of it stored in the PACS."""
    folder = synthesize_site(out, 0, count, seed=seed, size=size)
    orthanc.upload(sorted(folder.glob("*.dcm")))
    return folder


def _rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "labels.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _config(orthanc: Orthanc, folder: Path, tmp_path: Path, **overrides: Any) -> DicomWebData:
    password = tmp_path / "pacs-password"
    password.write_text(orthanc.password)
    fields: dict[str, Any] = {
        "url": orthanc.url,
        "labels": folder / "labels.csv",
        "classes": CLASSES,
        "cache_dir": tmp_path / "cache",
        "auth": {"username": orthanc.user, "password_file": password},
        **overrides,
    }
    return DicomWebData.model_validate(fields)


def _by_image(data: SiteData) -> dict[bytes, int]:
    """Every decoded image (as bytes) with its label: the same data whatever the file order."""
    x, y = torch.cat([data.x_train, data.x_test]), torch.cat([data.y_train, data.y_test])
    return {image.numpy().tobytes(): int(label) for image, label in zip(x, y, strict=True)}


@pytest.fixture(scope="module")
def study_site(orthanc: Orthanc, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _site(orthanc, tmp_path_factory.mktemp("pacs-site"), 30, seed=11)


def test_a_site_retrieves_its_labelled_instances_and_decodes_them_as_from_disk(
    orthanc: Orthanc, study_site: Path, tmp_path: Path
) -> None:
    config = _config(orthanc, study_site, tmp_path)
    from_pacs, summary = load_dicomweb_site(config)
    assert summary.retrieval == "30 instances from the PACS (30 retrieved, 0 already on disk)"
    from_disk, _ = load_dicom_site(
        DicomData(folder=study_site, key="sop_instance_uid", classes=CLASSES)
    )
    assert _by_image(from_pacs) == _by_image(from_disk)
    assert from_pacs.card == from_disk.card  # the same site range, so serving shows it alike
    again, summary = load_dicomweb_site(config)
    assert summary.retrieval == "30 instances from the PACS (0 retrieved, 30 already on disk)"
    assert torch.equal(again.x_train, from_pacs.x_train)
    # Decoded once: the second load read every image from the decoded cache.
    assert len(list((tmp_path / "cache" / "decoded").glob("*.safetensors"))) == 30


def test_an_instance_the_pacs_cannot_serve_is_skipped_or_fatal_naming_its_uid(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    folder = _site(orthanc, tmp_path / "site", 12, seed=12)
    broken = _rows(folder)[3]["sop_instance_uid"]
    _delete_stored_file(orthanc, broken)
    with pytest.raises(DataError, match=f"instance {re.escape(broken)}: the PACS failed"):
        load_dicomweb_site(_config(orthanc, folder, tmp_path))
    data, summary = load_dicomweb_site(_config(orthanc, folder, tmp_path, on_bad_input="skip"))
    assert summary.skipped == {"retrieval failed": 1} and summary.loaded == 11
    assert len(data.y_train) + len(data.y_test) == 11
    assert broken in summary.problems[0]


def test_a_labels_row_whose_instance_is_not_in_the_pacs(orthanc: Orthanc, tmp_path: Path) -> None:
    folder = _site(orthanc, tmp_path / "site", 10, seed=13)
    rows = _rows(folder)
    absent = "1.2.826.0.1.3680043.8.498.1"  # a well-formed UID that no study here carries
    rows.append({**rows[0], "file": "gone.dcm", "sop_instance_uid": absent})
    with (folder / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(DataError, match=f"sop_instance_uid {re.escape(absent)} has a label but"):
        load_dicomweb_site(_config(orthanc, folder, tmp_path))
    _, summary = load_dicomweb_site(_config(orthanc, folder, tmp_path, on_bad_input="skip"))
    assert summary.skipped == {"not in the PACS": 1} and summary.loaded == 10


def test_a_wrong_password_stops_the_agent_with_one_line(
    orthanc: Orthanc, study_site: Path, tmp_path: Path
) -> None:
    config = _config(orthanc, study_site, tmp_path, on_bad_input="skip")
    (tmp_path / "pacs-password").write_text("not-the-password")
    with pytest.raises(DataError, match=r"refused medsplit's credentials \(HTTP 401"):
        load_dicomweb_site(config)
    site_yaml = _site_yaml(tmp_path, config)
    done = _data_check(site_yaml)
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"error: data.auth: the PACS at {orthanc.url} refused medsplit's credentials (HTTP 401"
        )
    )
    assert "Traceback" not in done.stderr


def test_an_agent_killed_mid_download_fetches_only_what_it_lacks(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    folder = _site(orthanc, tmp_path / "site", 240, seed=14, size=256)
    site_yaml = _site_yaml(tmp_path, _config(orthanc, folder, tmp_path))
    mirror = tmp_path / "cache" / "instances"
    first = subprocess.Popen(
        _medsplit("data-check", "--config", str(site_yaml)), stderr=subprocess.PIPE
    )
    _wait_for_files(mirror, 20, first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    kept = {p.name: p.stat().st_mtime_ns for p in mirror.glob("*.dcm")}
    assert 20 <= len(kept) < 240, "the agent was to be killed mid-download"
    done = _data_check(site_yaml)
    assert done.returncode == 0, done.stderr
    assert f"({240 - len(kept)} retrieved, {len(kept)} already on disk)" in done.stderr
    assert {p.name: p.stat().st_mtime_ns for p in mirror.glob("*.dcm") if p.name in kept} == kept
    assert len(list(mirror.glob("*.dcm"))) == 240 and not list(mirror.glob(".*"))


def test_a_site_retrieves_whole_series_as_volumes_as_from_disk(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    """Labels keyed by Series Instance UID: each series is retrieved whole (WADO-RS), kept in
    one folder, and decoded into the volume reading the same files from disk gives."""
    (folder,) = synthesize_volumes(tmp_path / "ct", 1, 6, size=16)
    orthanc.upload(sorted(folder.rglob("*.dcm")))
    grid = {"spacing": [10, 10, 10], "size": [16, 16, 16], "window": [40, 400]}
    config = _config(orthanc, folder, tmp_path, key="series_instance_uid", preprocessing=grid)
    from_pacs, summary = load_dicomweb_site(config)
    assert summary.retrieval == "6 series from the PACS (6 retrieved, 0 already on disk)"
    assert summary.loaded == 6 and summary.unit == "volumes"
    from_disk, _ = load_volume_site(
        VolumeData.model_validate({"folder": folder, "classes": CLASSES, "preprocessing": grid})
    )
    assert _by_image(from_pacs) == _by_image(from_disk)
    mirror = tmp_path / "cache" / "series"
    slices = sorted(len(list(p.glob("*.dcm"))) for p in mirror.iterdir())
    assert slices == sorted(len(list((folder / r["folder"]).glob("*.dcm"))) for r in _rows(folder))
    # A killed agent leaves a series half-written in its hidden folder, never in place.
    lost = next(mirror.iterdir())
    lost.rename(mirror / f".{lost.name}.partial")
    (mirror / f".{lost.name}.partial" / "extra.dcm").write_bytes(b"half a file")
    again, summary = load_dicomweb_site(config)
    assert summary.retrieval == "6 series from the PACS (1 retrieved, 5 already on disk)"
    assert not list(mirror.glob(".*")) and torch.equal(again.x_train, from_pacs.x_train)


def test_a_pacs_that_asks_for_a_client_certificate(tmp_path: Path) -> None:
    """HTTPS with mutual TLS, as a hospital's archive behind its own CA: the site's certificate
    and the password let it in; without the certificate the agent stops, naming the PACS."""
    authority = CertificateAuthority(tmp_path / "pki")
    server = authority.issue("pacs", server=True, hosts=("localhost", "127.0.0.1"))
    site = authority.issue("site-h1")
    tls = OrthancTls(server.cert, server.key, authority.ca_file, site.cert, site.key)
    with Orthanc(tmp_path / "orthanc", tls=tls) as pacs:
        folder = _site(pacs, tmp_path / "site", 8, seed=15)
        auth = {"cert_file": site.cert, "key_file": site.key, "ca_file": authority.ca_file}
        config = _config(pacs, folder, tmp_path)
        with_cert = config.model_copy(update={"auth": config.auth.model_copy(update=auth)})
        _, summary = load_dicomweb_site(with_cert)
        assert summary.loaded == 8
        no_cert = config.model_copy(
            update={
                "auth": config.auth.model_copy(update={"ca_file": authority.ca_file}),
                "cache_dir": tmp_path / "other-cache",
            }
        )
        with pytest.raises(
            DataError, match=f"data.url: cannot reach the PACS at {re.escape(pacs.url)}"
        ):
            load_dicomweb_site(no_cert)


def _wait_for_files(folder: Path, count: int, process: subprocess.Popen[bytes]) -> None:
    """Until ``count`` instances are in the mirror (the download is under way)."""
    deadline = time.monotonic() + 120
    while not folder.is_dir() or len(list(folder.glob("*.dcm"))) < count:
        assert process.poll() is None, "data-check ended before it was killed"
        assert time.monotonic() < deadline, f"no {count} retrieved instances in {folder}"
        time.sleep(0.005)  # polling the mirror for the files that say the download is running


def _delete_stored_file(orthanc: Orthanc, uid: str) -> None:
    """Remove one instance's file from Orthanc's storage behind its back: Orthanc still indexes
    the instance but fails every request that reads it (a QIDO-RS answer that includes it
    answers 500, so does WADO-RS)."""
    with orthanc.client() as client:
        found = client.post(f"{orthanc.rest_url}/tools/lookup", content=uid).json()
        instance = next(item["ID"] for item in found if item["Type"] == "Instance")
        info = client.get(f"{orthanc.rest_url}/instances/{instance}/attachments/dicom/info").json()
    stored = next((orthanc.workdir / "storage").rglob(info["Uuid"]))
    stored.unlink()


def _site_yaml(tmp_path: Path, data: DicomWebData) -> Path:
    path = tmp_path / "site.yaml"
    site = {
        "site_id": "h1",
        "job_id": "j",
        "data": data.model_dump(mode="json", exclude_none=True),
    }
    path.write_text(yaml.safe_dump(site))
    return path


def _medsplit(*args: str) -> list[str]:
    return [sys.executable, "-m", "medsplit", *args]


def _data_check(site_yaml: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        _medsplit("data-check", "--config", str(site_yaml)),
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
