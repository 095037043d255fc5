"""A whole job in one process: the aggregator in the calling thread, one thread per agent.

Every party still joins through the one wiring (``medsplit.wiring``: Last Will, presence,
subscriptions) on its own transport -- a real broker in experiments and integration tests, the
in-memory twin in unit tests -- exactly as separate processes would.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aggregator.config import JobConfig
from aggregator.coordinator import Coordinator
from aggregator.state import RoundRecord
from aggregator.wire_tap import WireTap
from edge_agent.agent import Agent
from edge_agent.data.site_data import SiteData
from edge_agent.data.vertical import PartyTable
from edge_agent.sealing import SiteSealing
from medsplit.config import BrokerConfig
from medsplit.ids import AGGREGATOR_ID
from medsplit.protocol.spec import SEALS, segments_sealed
from medsplit.security.federation import Federation, Study
from medsplit.security.seal_kit import SealKit, throwaway_kit
from medsplit.wiring import Connector, Party, mqtt_connector, open_aggregator, open_site


@dataclass
class JobResult:
    history: list[RoundRecord]
    coordinator: Coordinator
    agents: dict[str, Agent]

    def final_model(self, site: str | None = None) -> dict[str, torch.Tensor]:
        """The whole model at the end of the job as ``site`` (default: the first) holds it:
        what the aggregator holds, with the head and tail of the site's segments (in a sealed
        job the aggregator holds only their seals)."""
        agent = self.agents[site or next(iter(self.agents))]
        state = {k: v for k, v in self.coordinator.final_state().items() if k != SEALS}
        if agent.segments is not None:
            state |= agent.segments.state()
        return state


@dataclass
class _Sites:
    """One agent per site, each on its own party and thread (not yet started)."""

    parties: list[Party]
    agents: dict[str, Agent]
    threads: list[threading.Thread]
    errors: list[BaseException]

    @classmethod
    def start(
        cls,
        job_id: str,
        data: Mapping[str, SiteData | PartyTable],
        connect: Connector,
        *,
        agent_type: type[Agent],
        timeout: float,
        state_root: Path | None,
        agent_kw: dict[str, Any],
        kit: SealKit | None,
        connect_as: Callable[[str], Connector] | None = None,
    ) -> _Sites:
        sites = cls([], {}, [], [])
        for site, site_data in data.items():
            party = open_site(job_id, site, connect_as(site) if connect_as else connect)
            sites.parties.append(party)
            if state_root is not None:
                agent_kw["state_dir"] = state_root / site
            if kit is not None and site in kit.keys:
                agent_kw["sealing"] = SiteSealing(kit.keys[site], trust=kit.trust)
            agent = agent_type(
                site,
                job_id,
                party.endpoint,
                site_data,
                hello_interval_s=0.5,
                incarnation=party.incarnation,
                **agent_kw,
            )
            sites.agents[site] = agent
            sites.threads.append(
                threading.Thread(
                    target=sites._serve, args=(agent, timeout), name=f"agent-{site}", daemon=True
                )
            )
        return sites

    def _serve(self, agent: Agent, timeout: float) -> None:
        try:
            agent.run(max_seconds=timeout)
        except BaseException as exc:  # surfaced to the caller of run_job
            self.errors.append(exc)


def _await_hellos(agents: dict[str, Agent], count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(agent.hellos_sent < count for agent in agents.values()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"agents did not say hello {count} times within {timeout:g} s")
        time.sleep(0.05)  # polling a counter the agent threads advance


def _stop_revoked(coordinator: Coordinator, agents: dict[str, Agent]) -> None:
    """A site the aggregator refused gets no finish: its agent is told to stop waiting."""
    for site, entry in coordinator.sites.items():
        if entry.revoked:
            agents[site].stop()


def run_job(
    config: JobConfig,
    data: Mapping[str, SiteData | PartyTable],
    connect: Connector,
    *,
    timeout: float = 300.0,
    before_run: Callable[[], None] | None = None,
    state_root: Path | None = None,
    agent_type: type[Agent] = Agent,
    agents_first: bool = False,
    tap: WireTap | None = None,
    connect_as: Callable[[str], Connector] | None = None,
    **agent_kw: Any,
) -> JobResult:
    """Aggregator in this thread, one thread per agent; every agent must finish.

    ``before_run`` is called once the aggregator is subscribed (before any agent starts, unless
    ``agents_first``). With
    ``state_root`` each site keeps its state in ``state_root/SITE``, as the demo lays it out.
    With ``agents_first`` the agents start first and the aggregator only once every one of
    them has said hello twice, as when a deployment's sites come up before its server.
    ``tap`` keeps what the aggregator receives (the privacy sweep). A job that seals segments
    gets sealing keys for every site and a roster made for this run. The sites allow the
    plan's own model factory, unless ``allow_factories`` says otherwise. ``connect_as(party)``
    gives each party (a site id or ``aggregator``) its own connector -- its own certificate on
    a broker whose ACL tells identities apart; default: ``connect`` for all.
    """
    sealed = segments_sealed(config.mode, config.seal_segments)
    kit = throwaway_kit(config.job_id, list(config.sites)) if sealed else None
    factory = config.plan.model.factory
    agent_kw.setdefault("allow_factories", (factory,) if factory else ())  # it owns its sites
    sites = _Sites.start(
        config.job_id,
        data,
        connect,
        agent_type=agent_type,
        timeout=timeout,
        state_root=state_root,
        agent_kw=agent_kw,
        kit=kit,
        connect_as=connect_as,
    )
    parties, agents, threads, errors = sites.parties, sites.agents, sites.threads, sites.errors
    if agents_first:
        for thread in threads:
            thread.start()
        _await_hellos(agents, 2, timeout)
    aggregator = open_aggregator(
        config.job_id, connect_as(AGGREGATOR_ID) if connect_as else connect
    )
    parties.insert(0, aggregator)
    if before_run is not None:
        before_run()
    if not agents_first:
        for thread in threads:
            thread.start()
    coordinator = Coordinator(
        config,
        aggregator.endpoint,
        presence=aggregator.presence,
        tap=tap,
        roster=None if kit is None else kit.roster,
    )
    try:
        history = coordinator.run()
        _stop_revoked(coordinator, agents)
    except BaseException:
        for agent in agents.values():  # no finish will come: do not wait for their timeouts
            agent.stop()
        raise
    finally:
        for thread in threads:
            thread.join(timeout)
        for party in parties:
            party.close()
    if errors:
        raise errors[0]
    revoked = {site for site, entry in coordinator.sites.items() if entry.revoked}
    unfinished = sorted(s for s, agent in agents.items() if not agent.finished and s not in revoked)
    if unfinished:
        raise RuntimeError(f"agents {unfinished} did not finish the job")
    return JobResult(history, coordinator, agents)


def kit_connectors(out: Path, federation: Federation, study: Study) -> Callable[[str], Connector]:
    """``connect_as`` for ``run_job``: each party of ``study`` connects as its kit of the
    federation provisioned in ``out`` says -- its own certificate (checked first), and the
    broker its kit names (a site with a hospital broker connects to that one)."""

    def connect_as(party: str) -> Connector:
        folder = study.kit(out, party)
        tls = {
            "ca_file": folder / "ca.pem",
            "cert_file": folder / "cert.pem",
            "key_file": folder / "key.pem",
        }
        url = federation.broker_url if party == AGGREGATOR_ID else federation.site_broker_url(party)
        broker = BrokerConfig.model_validate({"url": url, "tls": tls})
        return mqtt_connector(broker, party, study.job_id)

    return connect_as
