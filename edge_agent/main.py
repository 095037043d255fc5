"""``medsplit agent --config site.yaml``: the hospital-side process.

SIGTERM stops it cleanly (exit status 0): the step in progress is abandoned, the agent says
offline and disconnects; started again, it restores its state and rejoins the job.
"""

from __future__ import annotations

import importlib
import logging
import signal
from collections.abc import Callable
from typing import Any

from edge_agent.agent import Agent, ForeignCode, NotInJob
from edge_agent.config import SiteConfig
from edge_agent.data.settings import (
    BuiltinData,
    CsvData,
    DicomData,
    DicomWebData,
    PictureData,
    VerticalBuiltinData,
    VolumeData,
)
from edge_agent.data.site_data import LoadSummary, SiteData
from edge_agent.data.vertical import PartyTable
from edge_agent.observability import AgentCollector
from edge_agent.sealing import SiteSealing
from medsplit.devices import pick_device
from medsplit.health import Check, certificate_valid, connected, start_health
from medsplit.security.seal import SealError
from medsplit.wiring import Connector, Party, mqtt_connector, open_site
from models import ConfigError

log = logging.getLogger(__name__)

EXIT_NOT_IN_JOB = 2
EXIT_FOREIGN_CODE = 3  # the job spec names a model factory site.yaml's models.allow does not

# Each source's loader (module, function), imported only when a site uses it: a CSV site never
# loads pydicom, a DICOM folder never loads scikit-learn (issue 32: light processes).
_LOADERS: dict[type, tuple[str, str]] = {
    DicomData: ("edge_agent.data.dicom_source", "load_dicom_site"),
    DicomWebData: ("edge_agent.data.pacs_source", "load_dicomweb_site"),
    PictureData: ("edge_agent.data.picture_source", "load_picture_site"),
    VolumeData: ("edge_agent.data.volume_source", "load_volume_site"),
    CsvData: ("edge_agent.data.csv_source", "load_csv_site"),
}


def _loader(spec: object) -> Callable[[Any], tuple[SiteData, LoadSummary]]:
    module, name = _LOADERS[type(spec)]
    loader: Callable[[Any], tuple[SiteData, LoadSummary]] = getattr(
        importlib.import_module(module), name
    )
    return loader


def load_data(config: SiteConfig) -> SiteData | PartyTable:
    """The site's training data: a DICOM folder or PACS, an EHR table, a built-in share, or
    (a vertical job's party) its own columns of patients it shares with other parties."""
    spec = config.data
    if isinstance(spec, VerticalBuiltinData):
        from edge_agent.data.vertical import builtin_party  # noqa: PLC0415 - scikit-learn

        return builtin_party(
            spec.dataset,
            spec.parties,
            spec.index,
            labels=spec.labels,
            coverage=spec.coverage,
            seed=spec.seed,
        )
    if isinstance(spec, CsvData) and spec.key_column is not None:  # a vertical party's
        from edge_agent.data.csv_source import load_csv_party  # noqa: PLC0415

        table, summary = load_csv_party(spec)
        log.info("%s: %s", config.site_id, summary.describe())
        return table
    if not isinstance(spec, BuiltinData):
        data, summary = _loader(spec)(spec)
        log.info("%s: %s", config.site_id, summary.describe())
        for problem in summary.problems:  # file names stay in this site's own log
            log.warning("%s: skipped %s", config.site_id, problem)
        return data
    from edge_agent.data import datasets  # noqa: PLC0415 - scikit-learn, only for built-ins

    return datasets.share(
        spec.dataset,
        spec.partition,
        spec.num_sites,
        spec.index,
        seed=spec.seed,
        test_fraction=spec.test_fraction,
    )


def run(config: SiteConfig, *, linger: bool = False) -> int:
    """Take part in the job until it ends; with ``linger``, then stay up serving health until
    SIGTERM (``--after-finish wait``: a pod is not restarted into a finished job)."""
    connector = mqtt_connector(
        config.broker, config.site_id, config.job_id
    )  # checks the certificate first
    parties: list[Party] = []
    loaded: list[SiteData | PartyTable] = []
    checks: dict[str, Check] = {
        "data": lambda: None if loaded else "loading the site's data",
        "broker": connected(lambda: parties[0].transport if parties else None),
        "certificate": certificate_valid(
            config.broker.tls.cert_file if config.broker.tls else None,
            config.http.ready_cert_days,
        ),
    }
    agents: list[Agent] = []
    health = start_health(
        config.http,
        checks,
        config.site_id,
        collectors=[AgentCollector(lambda: agents[0] if agents else None)],
    )
    try:
        code, finished = _run(config, connector, parties, loaded, agents)
        if linger and finished and health is not None:
            health.linger(f"{config.site_id}: the job is over; its model is in {config.state.dir}")
        return code
    finally:
        if health is not None:
            health.stop()


def site_sealing(config: SiteConfig) -> SiteSealing | None:
    """The site's sealing keys, or None when it has none (it then joins only unsealed jobs)."""
    key_file, ca = config.sealing.key_file, config.sealing_ca
    if key_file is None:
        return None
    if ca is None:
        raise ConfigError(
            "site.yaml",
            [("sealing.ca_file", "needed to check the roster when the broker has no TLS CA")],
        )
    try:
        return SiteSealing.from_files(config.site_id, key_file, ca)
    except SealError as exc:
        raise ConfigError("site.yaml", [("sealing.key_file", str(exc))]) from None


def _run(
    config: SiteConfig,
    connector: Connector,
    parties: list[Party],
    loaded: list[SiteData | PartyTable],
    agents: list[Agent],
) -> tuple[int, bool]:
    """The exit status, and whether the job finished (rather than this agent being stopped)."""
    sealing = site_sealing(config)  # before anything connects: a bad key is one clear line
    data = load_data(config)
    loaded.append(data)
    device = pick_device(config.device)
    if isinstance(data, SiteData):
        log.info(
            "%s: %d training and %d test samples on %s",
            config.site_id,
            data.train_samples,
            len(data.y_test),
            device,
        )
    else:
        log.info(
            "%s: %d patients (%s), to align with the other parties; on %s",
            config.site_id,
            len(data.keys),
            data.source,
            device,
        )
    party = open_site(config.job_id, config.site_id, connector, client_id=config.broker.client_id)
    parties.append(party)
    party.endpoint.set_reassembly_timeout(config.waits.reassembly_timeout_s)
    agent = Agent(
        config.site_id,
        config.job_id,
        party.endpoint,
        data,
        device=device,
        reply_timeout_s=config.waits.reply_timeout_s,
        hello_interval_s=config.waits.hello_interval_s,
        status_interval_s=config.waits.status_interval_s,
        retry_interval_s=config.waits.retry_interval_s,
        state_dir=config.state.dir,
        export_onnx=config.export_onnx,
        joint_export=config.joint_export,
        incarnation=party.incarnation,
        sealing=sealing,
        allow_factories=tuple(config.models.allow),
    )
    agents.append(agent)

    def stop(signum: int, frame: object) -> None:
        log.info("%s: SIGTERM: leaving the job; a restart rejoins it", config.site_id)
        agent.stop()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        agent.run()
    except NotInJob as exc:
        log.error("%s: refused by the aggregator: %s", config.site_id, exc)
        return EXIT_NOT_IN_JOB, False
    except ForeignCode as exc:
        log.error("%s: refused the job: %s", config.site_id, exc)
        return EXIT_FOREIGN_CODE, False
    finally:
        signal.signal(signal.SIGTERM, previous)
        party.close()
    return 0, agent.finished
