"""A PACS data section: its validation, and the session its credentials become."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from edge_agent.config import SiteConfig
from edge_agent.data.pacs import PacsError, open_session
from edge_agent.data.settings import DicomWebData, PacsAuth

SITE = {"site_id": "h1", "job_id": "j"}
DATA = {
    "source": "dicomweb",
    "url": "https://pacs.example.org/dicom-web",
    "labels": "/data/labels.csv",
    "cache_dir": "/var/lib/medsplit/pacs",
    "classes": ["normal", "lesion"],
}


def test_a_site_yaml_names_its_pacs() -> None:
    config = SiteConfig.from_mapping({**SITE, "data": DATA})
    assert isinstance(config.data, DicomWebData)
    assert config.data.key == "sop_instance_uid" and config.data.retries == 3


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"url": "pacs.example.org"}, "url"),
        ({"cache_dir": None}, "cache_dir"),
        ({"auth": {"username": "medsplit"}}, "username and password_file go together"),
        (
            {"auth": {"token_file": "/t", "username": "u", "password_file": "/p"}},
            "token_file or username/password_file, not both",
        ),
        ({"auth": {"key_file": "/k.pem"}}, "key_file needs cert_file"),
        ({"auth": {"password": "inline"}}, "password"),
    ],
)
def test_a_pacs_section_with_a_mistake_is_refused_naming_it(
    change: dict[str, object], message: str
) -> None:
    data = {key: value for key, value in {**DATA, **change}.items() if value is not None}
    with pytest.raises((ValidationError, ValueError), match=message):
        SiteConfig.from_mapping({**SITE, "data": data})


def test_credentials_become_the_session_s_headers_auth_and_certificates(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("abc.def\n")
    session = open_session(PacsAuth(token_file=token), retries=2)
    assert session.headers["Authorization"] == "Bearer abc.def"
    password = tmp_path / "password"
    password.write_text("s3cret")
    session = open_session(
        PacsAuth(
            username="medsplit",
            password_file=password,
            cert_file=tmp_path / "c.pem",
            key_file=tmp_path / "k.pem",
            ca_file=tmp_path / "ca.pem",
        ),
        retries=2,
    )
    assert session.auth == ("medsplit", "s3cret")
    assert session.cert == (str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))
    assert session.verify == str(tmp_path / "ca.pem")
    assert session.get_adapter("https://pacs").max_retries.total == 2


def test_an_unreadable_or_empty_secret_names_the_field_and_file(tmp_path: Path) -> None:
    with pytest.raises(PacsError, match=r"data.auth.token_file: cannot read .*/absent"):
        open_session(PacsAuth(token_file=tmp_path / "absent"), retries=0)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(PacsError, match=r"data.auth.password_file: .*/empty is empty"):
        open_session(PacsAuth(username="u", password_file=tmp_path / "empty"), retries=0)
