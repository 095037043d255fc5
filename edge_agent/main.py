"""``medsplit agent --config site.yaml``: the hospital-side process."""

from __future__ import annotations

import logging

import torch

from edge_agent.agent import Agent
from medsplit import datasets, topics
from medsplit.config import SiteConfig
from medsplit.csv_source import CsvData, load_csv_site
from medsplit.datasets import SiteData
from medsplit.dicom_source import DicomData, load_dicom_site
from medsplit.transport import Endpoint, MqttTransport, Will

log = logging.getLogger(__name__)


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was requested but no CUDA device is available")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def load_data(config: SiteConfig) -> SiteData:
    """The site's training data: a DICOM folder, an EHR table, or a built-in dataset's share."""
    spec = config.data
    if isinstance(spec, DicomData | CsvData):
        data, summary = (
            load_dicom_site(spec) if isinstance(spec, DicomData) else load_csv_site(spec)
        )
        log.info("%s: %s", config.site_id, summary.describe())
        for problem in summary.problems:  # file names stay in this site's own log
            log.warning("%s: skipped %s", config.site_id, problem)
        return data
    return datasets.share(
        spec.dataset,
        spec.partition,
        spec.num_sites,
        spec.index,
        seed=spec.seed,
        test_fraction=spec.test_fraction,
    )


def run(config: SiteConfig) -> int:
    data = load_data(config)
    presence = topics.presence(config.job_id, config.site_id)
    transport = MqttTransport(
        config.broker.settings(f"{config.job_id}-{config.site_id}"),
        will=Will(presence, b"offline"),
        birth=Will(presence, b"online"),
    )
    transport.connect()
    for topic_filter in topics.site_subscriptions(config.job_id, config.site_id):
        transport.subscribe(topic_filter)
    device = pick_device(config.device)
    log.info(
        "%s: %d training and %d test samples on %s",
        config.site_id,
        data.train_samples,
        len(data.y_test),
        device,
    )
    agent = Agent(
        config.site_id,
        config.job_id,
        Endpoint(transport),
        data,
        device=device,
        reply_timeout_s=config.reply_timeout_s,
        hello_interval_s=config.hello_interval_s,
        state_dir=config.state_dir,
        export_onnx=config.export_onnx,
    )
    try:
        agent.run()
    finally:
        transport.close()
    return 0
