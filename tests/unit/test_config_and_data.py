from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aggregator.config import JobConfig
from edge_agent.config import SiteConfig
from edge_agent.data import datasets
from medsplit.cli import main
from models import ConfigError

JOB_YAML = """
job_id: job-1
plan: mlp-ehr-u
mode: split-u
orchestration: parallel
sites: [hospital-a, hospital-b]
rounds: {count: 4, min_sites: 1}
training:
  optimizer: {name: sgd, lr: 0.05, momentum: 0.9}
broker: {url: "mqtt://broker.example:1883", insecure: true, keepalive_s: 20, inbox_max_bytes: 1048576}
"""


def test_job_yaml_loads_with_every_field(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(JOB_YAML)
    config = JobConfig.from_yaml(path)
    assert (config.mode, config.orchestration, config.rounds.count, config.quorum) == (
        "split-u",
        "parallel",
        4,
        1,
    )
    assert config.plan.tail == ("classifier",)
    assert config.training.optimizer.momentum == 0.9
    settings = config.broker.settings("agg")
    assert settings.host == "broker.example"
    # The transport's knobs are reachable from the file, defaults included.
    assert (settings.keepalive_s, settings.inbox_max_bytes) == (20, 1048576)
    assert settings.publish_timeout_s == 30.0 and settings.retry_for_s is None
    assert config.output_dir == Path("runs/job-1")


@pytest.mark.parametrize(
    ("flat", "place"),
    [
        ("rounds: 4", "rounds.count"),
        ("round_deadline_s: 60", "rounds.deadline_s"),
        ("min_sites: 1", "rounds.min_sites"),
        ("sample_fraction: 0.5", "rounds.sample_fraction"),
        ("batch_size: 8", "training.batch_size"),
        ("optimizer: {lr: 0.1}", "training.optimizer"),
        ("wire_dtype: float16", "training.wire_dtype"),
        ("run_dir: /tmp/x", "state.run_dir"),
    ],
)
def test_a_flat_field_of_the_old_layout_names_its_new_place(
    tmp_path: Path, flat: str, place: str
) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(f"job_id: j\nplan: mlp-ehr-u\nsites: [a]\n{flat}\n")
    with pytest.raises(ConfigError) as info:
        JobConfig.from_yaml(path)
    field, message = info.value.problems[0]
    assert field == flat.split(":", maxsplit=1)[0] and place in message


@pytest.mark.parametrize(
    ("flat", "place"),
    [
        ("state_dir: /tmp/s", "state.dir"),
        ("reply_timeout_s: 5", "waits.reply_timeout_s"),
        ("hello_interval_s: 1", "waits.hello_interval_s"),
    ],
)
def test_a_flat_site_field_names_its_new_place(tmp_path: Path, flat: str, place: str) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(f"site_id: a\njob_id: j\n{flat}\n")
    with pytest.raises(ConfigError, match=place.replace(".", r"\.")):
        SiteConfig.from_yaml(path)


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(JOB_YAML)
    monkeypatch.setenv("MEDSPLIT_ROUNDS__COUNT", "9")
    monkeypatch.setenv("MEDSPLIT_TRAINING__OPTIMIZER__LR", "0.5")
    monkeypatch.setenv("MEDSPLIT_BROKER__URL", "mqtts://other:8883")
    monkeypatch.setenv("MEDSPLIT_BROKER__INSECURE", "false")
    config = JobConfig.from_yaml(path)
    optimizer = config.training.optimizer
    assert (config.rounds.count, optimizer.lr, optimizer.name) == (9, 0.5, "sgd")
    assert config.broker.url == "mqtts://other:8883"
    assert config.rounds.min_sites == 1  # the rest of the group stays as the file says
    monkeypatch.setenv("MEDSPLIT_ROUNDS__COUNT", "zero")
    with pytest.raises(ConfigError, match="rounds"):
        JobConfig.from_yaml(path)


def test_plan_path_is_resolved_next_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "my-plan.yaml").write_text("model: {name: mlp}\ncut: hidden1\n")
    (tmp_path / "job.yaml").write_text("job_id: j\nplan: my-plan.yaml\nmode: split\nsites: [a]\n")
    assert JobConfig.from_yaml(tmp_path / "job.yaml").plan.head == ("hidden1",)


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"rounds": {"count": 0}}, "rounds.count", "greater than or equal to 1"),
        ({"mode": "federated"}, "mode", "split"),
        ({"plan": "nope"}, "plan", "not a built-in plan"),
        ({"sites": ["a", "a"]}, "sites", "repeated: a"),
        ({"sites": ["a/b"]}, "sites.0", "pattern"),
        ({"rounds": {"min_sites": 5}}, "", "min_sites: 5 is more than"),
        ({"mode": "split"}, "", "needs a plan without a tail"),
        ({"broker": {"url": "http://x"}}, "broker.url", "mqtt://"),
        ({"training": {"wire_dtype": "int4"}}, "training.wire_dtype", "int8"),
        ({"roundz": 3}, "roundz", "unknown field"),
        ({"sites": ["a", "aggregator"]}, "sites", "reserved"),
        ({"broker": {"keepalive_s": 1}}, "broker.keepalive_s", "greater than or equal to 5"),
    ],
)
def test_bad_job_configs_name_the_field(
    change: dict[str, object], field: str, message: str
) -> None:
    data = {"job_id": "j", "plan": "mlp-ehr-u", "sites": ["a", "b"], **change}
    with pytest.raises(ConfigError) as info:
        JobConfig.from_mapping(data, "job.yaml")
    problems = info.value.problems
    assert any(f == field and message in m for f, m in problems), problems


def test_site_config_validates_data_and_device() -> None:
    site = SiteConfig.from_mapping(
        {
            "site_id": "a",
            "job_id": "j",
            "data": {"dataset": "synthetic-cxr", "num_sites": 3, "index": 2},
        }
    )
    assert site.data.index == 2 and site.device == "auto"
    for data, field in [
        # The data section's kind (its `source`, builtin by default) is part of the path.
        ({"dataset": "mnist"}, "data.builtin.dataset"),
        ({"num_sites": 2, "index": 2}, "data.builtin"),
        ({"partition": "shards"}, "data.builtin.partition"),
        ({"partition": "dirichlet:0"}, "data.builtin.partition"),
        ({"source": "dicom", "folder": "x"}, "data.dicom.classes"),
    ]:
        with pytest.raises(ConfigError) as info:
            SiteConfig.from_mapping({"site_id": "a", "job_id": "j", "data": data})
        assert info.value.problems[0][0] == field
    with pytest.raises(ConfigError, match="device"):
        SiteConfig.from_mapping({"site_id": "a", "job_id": "j", "device": "tpu"})


def test_cli_refuses_a_bad_config_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("job_id: j\nplan: mlp-ehr-u\nsites: []\n")
    assert main(["aggregator", "--config", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {path}: sites:")
    assert main(["agent", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_partitions_cover_every_sample_once() -> None:
    labels = datasets.load("breast-cancer").y
    for scheme in ("iid", "dirichlet:0.3", "dirichlet:100"):
        parts = datasets.partition(labels, 4, scheme, seed=1)
        joined = torch.tensor(sorted(i for part in parts for i in part.tolist()))
        assert torch.equal(joined, torch.arange(len(labels))), scheme
        assert min(len(p) for p in parts) >= 10


def test_dirichlet_skews_labels_more_than_iid() -> None:
    labels = datasets.load("breast-cancer").y

    def spread(scheme: str) -> float:
        shares = [
            labels[p].float().mean().item() for p in datasets.partition(labels, 5, scheme, seed=2)
        ]
        return max(shares) - min(shares)

    assert spread("dirichlet:0.3") > spread("iid") + 0.2


def test_bad_partitions_are_refused() -> None:
    labels = datasets.load("breast-cancer").y
    for scheme, message in [
        ("dirichlet:x", "ALPHA must be a number"),
        ("dirichlet:-1", "positive"),
        ("shards:x", "K must be a whole number"),
        ("stripes", "unknown partition"),
    ]:
        with pytest.raises(ValueError, match=message):
            datasets.partition(labels, 3, scheme)


def test_sites_are_standardised_with_statistics_combined_from_their_sums() -> None:
    shares = datasets.all_sites(datasets.load("breast-cancer"), 3, "dirichlet:0.3", seed=0)
    together = torch.cat([s.x_train for s in shares])
    # Exactly the pooled statistics, though no site handed over a raw value...
    assert torch.allclose(together.mean(0), torch.zeros(30), atol=1e-5)
    assert torch.allclose(together.std(0), torch.ones(30), atol=1e-4)
    # ...and sites keep what tells them apart (here: their label mix), unlike local statistics.
    assert max(float(s.x_train[:, 0].mean().abs()) for s in shares) > 0.2
    share = datasets.share("breast-cancer", "dirichlet:0.3", 3, 1, seed=0)
    assert torch.equal(share.x_test, shares[1].x_test)
    assert len(share.y_test) > 0


def test_synthetic_cxr_is_deterministic_and_labelled_by_lesions() -> None:
    a, labels = datasets.synthetic_cxr(40, seed=5)
    b, _ = datasets.synthetic_cxr(40, seed=5)
    assert torch.equal(a, b) and a.shape == (40, 1, 64, 64)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    # Lesions add brightness: positives are brighter on average.
    assert a[labels == 1].mean() > a[labels == 0].mean()
