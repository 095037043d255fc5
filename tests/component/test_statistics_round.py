"""The statistics round: every site's sums combined into one normalisation, for every source."""

from __future__ import annotations

from pathlib import Path

import torch

from aggregator.config import JobConfig
from edge_agent.data import datasets
from edge_agent.data.dicom import read_image
from edge_agent.data.dicom_source import load_dicom_site
from edge_agent.data.dicom_synth import synthesize
from edge_agent.data.inputs import ImageInput
from edge_agent.data.settings import DicomData, Preprocessing
from experiments.inprocess import run_job
from medsplit.protocol import topics
from medsplit.transport import MemoryBroker
from medsplit.wire import Decoder
from medsplit.wiring import memory_connector
from tests.support.configs import job_config

CNN = {"name": "cnn", "args": {"image_size": 32, "channels": [8, 16], "hidden": 32}}


def _dicom_sites(tmp_path: Path) -> dict[str, datasets.SiteData]:
    folders = synthesize(tmp_path, 2, 30, seed=3, size=32)
    config = lambda f: DicomData(  # noqa: E731
        folder=f, classes=["normal", "lesion"], preprocessing=Preprocessing(size=32)
    )
    return {f"site-{i + 1}": load_dicom_site(config(f))[0] for i, f in enumerate(folders)}


def _job(sites: list[str], **extra: object) -> JobConfig:
    plan = {"model": CNN, "cut": "conv1", "tail_cut": "fc"}
    return job_config({"job_id": "job-s", "plan": plan, "rounds": 1, "sites": sites, **extra})


def test_dicom_sites_share_sums_and_train_on_one_federated_scale(tmp_path: Path) -> None:
    sites = _dicom_sites(tmp_path)
    raw = torch.cat([d.x_train for d in sites.values()])
    assert abs(float(raw.mean())) > 0.02  # decoded intensities are not centred ...
    broker = MemoryBroker()
    result = run_job(_job(list(sites)), sites, memory_connector(broker))
    trained = torch.cat([a.data.x_train for a in result.agents.values()])
    # ... the federation's statistics centre and scale them, pooled over every site.
    assert abs(float(trained.mean())) < 1e-3
    assert abs(float(trained.std()) - 1.0) < 1e-2
    # What each site sent: one count and two sums (one value per channel), never a pixel.
    decoder = Decoder()
    for site, data in sites.items():
        stats = [
            decoder.feed(p)
            for _, t, p in broker.published
            if t == topics.up("job-s", site, "stats")
        ]
        assert len(stats) == 1 and stats[0] is not None
        envelope = stats[0]
        assert set(envelope.tensors) == {"sum", "sum_sq", "classes"}
        assert envelope.tensors["sum"].shape == envelope.tensors["sum_sq"].shape == (1,)
        # ... and how many of its records are of each class: counts, never a record.
        counts = torch.bincount(data.y_train, minlength=2).double()
        assert torch.equal(envelope.tensors["classes"], counts)
        records = len(data.y_train)
        assert envelope.meta == {"count": data.x_train.numel(), "records": records}
    # Each site's card holds the folded normalisation: a file decoded as serving decodes it
    # is what training saw.
    agent = result.agents["site-1"]
    assert agent.data.card is not None and isinstance(agent.data.card.input, ImageInput)
    preprocessing = agent.data.card.input.preprocessing
    assert (preprocessing.mean, preprocessing.std) != (0.0, 1.0)
    first = sorted((tmp_path / "site-1").glob("*.dcm"))
    decoded = torch.stack([read_image(f, preprocessing) for f in first])
    seen = torch.cat([agent.data.x_train, agent.data.x_test])
    matches = [
        bool(torch.isclose(seen, image, atol=1e-5).flatten(1).all(1).any()) for image in decoded
    ]
    assert all(matches)


def test_a_fixed_normalisation_in_the_job_replaces_the_round(tmp_path: Path) -> None:
    sites = _dicom_sites(tmp_path)
    broker = MemoryBroker()
    job = _job(list(sites), normalization={"mean": [0.25], "std": [0.5]})
    result = run_job(job, sites, memory_connector(broker))
    assert not any(t.endswith("/down/stats-request") for _, t, _ in broker.published)
    for site, agent in result.agents.items():
        torch.testing.assert_close(agent.data.x_train, (sites[site].x_train - 0.25) / 0.5)


def test_none_leaves_the_sources_encoding_alone() -> None:
    shares = datasets.all_sites(datasets.load("breast-cancer"), 2, "iid")
    data = {"site-a": shares[0], "site-b": shares[1]}
    plain = job_config(
        {
            "job_id": "job-n",
            "plan": "mlp-ehr",
            "mode": "fedavg",
            "rounds": 1,
            "sites": list(data),
            "normalization": "none",
        }
    )
    result = run_job(plain, data, memory_connector(MemoryBroker()))
    for site, agent in result.agents.items():
        assert agent.data.x_train is data[site].x_train
