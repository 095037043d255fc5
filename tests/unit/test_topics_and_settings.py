from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from medsplit.protocol import topics
from medsplit.transport import MqttSettings, TlsSettings


def test_topics_are_built_and_parsed_back() -> None:
    assert topics.up("job1", "site-a", "activations") == "medsplit/v1/job1/site-a/up/activations"
    assert topics.parse(topics.up("job1", "site-a", "activations")) == topics.Route(
        "job1", "site-a", "up", "activations"
    )
    assert topics.parse(topics.down("job1", "site-a", "grads")).direction == "down"
    assert topics.parse(topics.broadcast("job1", "plan")) == topics.Route(
        "job1", None, "all", "plan"
    )
    assert topics.parse(topics.presence("job1", "s1")) == topics.Route(
        "job1", "s1", "presence", None
    )


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "a+b", "x" * 65, "-lead", "sp ace"])
def test_ids_that_would_break_topic_isolation_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="not a valid id"):
        topics.up("job1", bad, "activations")
    with pytest.raises(ValueError, match="not a valid id"):
        topics.up(bad, "site-a", "activations")


def test_reserved_site_id_and_foreign_topics_are_refused() -> None:
    with pytest.raises(ValueError, match="reserved"):
        topics.up("job1", "all", "x")
    for topic in ["other/v1/job/site/up/x", "medsplit/v1/job/site/sideways/x", "medsplit/v1/job"]:
        with pytest.raises(ValueError, match="topic"):
            topics.parse(topic)


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("medsplit/v1/j/+/up/+", "medsplit/v1/j/s1/up/act", True),
        ("medsplit/v1/j/+/up/+", "medsplit/v1/j/s1/down/act", False),
        ("medsplit/v1/j/#", "medsplit/v1/j/s1/up/act", True),
        ("medsplit/v1/j/s1/up/act", "medsplit/v1/j/s1/up/act", True),
        ("medsplit/v1/j/+", "medsplit/v1/j/s1/up", False),
    ],
)
def test_filter_matching(topic_filter: str, topic: str, expected: bool) -> None:
    assert topics.matches(topic_filter, topic) is expected


def test_settings_from_url() -> None:
    s = MqttSettings.from_url("mqtt://user:p%40ss@broker.local:1999", client_id="site-a")
    assert (s.host, s.port, s.username) == ("broker.local", 1999, "user")
    assert s.password is not None and s.password.get_secret_value() == "p@ss"
    assert "p@ss" not in repr(s)  # secrets stay out of logs
    assert MqttSettings.from_url("mqtt://h", client_id="c").port == 1883


def test_settings_refuse_bad_urls_and_tls_without_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="scheme must be"):
        MqttSettings.from_url("http://h", client_id="c")
    with pytest.raises(ValueError, match="no TLS files"):
        MqttSettings.from_url("mqtts://h", client_id="c")
    with pytest.raises(ValidationError, match="ca_file"):
        TlsSettings(ca_file=tmp_path / "missing.pem")
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    with pytest.raises(ValidationError, match="together"):
        TlsSettings(ca_file=ca, cert_file=ca)
    tls = TlsSettings(ca_file=ca)
    assert MqttSettings.from_url("mqtts://h", client_id="c", tls=tls).port == 8883


def test_settings_validate_ranges() -> None:
    with pytest.raises(ValidationError, match="port"):
        MqttSettings(client_id="c", port=70000)
    with pytest.raises(ValidationError, match="reconnect_max_s"):
        MqttSettings(client_id="c", reconnect_min_s=10, reconnect_max_s=2)
