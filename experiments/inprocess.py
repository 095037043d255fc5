"""A whole job in one process: the aggregator in the calling thread, one thread per agent.

Every party still talks only through its own transport (a real broker in experiments and
integration tests, the in-memory twin in unit tests), exactly as separate processes would.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aggregator.coordinator import Coordinator, RoundRecord
from edge_agent.agent import Agent
from medsplit import topics
from medsplit.config import JobConfig
from medsplit.datasets import SiteData
from medsplit.transport import Endpoint, Transport


@dataclass
class JobResult:
    history: list[RoundRecord]
    coordinator: Coordinator
    agents: dict[str, Agent]


def run_job(
    config: JobConfig,
    data: dict[str, SiteData],
    make_transport: Callable[[str], Transport],
    *,
    timeout: float = 300.0,
    before_run: Callable[[], None] | None = None,
    state_root: Path | None = None,
    **agent_kw: Any,
) -> JobResult:
    """Aggregator in this thread, one thread per agent; every agent must finish.

    ``before_run`` is called once the aggregator is subscribed, before any agent starts. With
    ``state_root`` each site keeps its state in ``state_root/SITE``, as the demo lays it out.
    """
    agg_transport = make_transport("aggregator")
    agg_transport.connect()
    for topic_filter in topics.aggregator_subscriptions(config.job_id):
        agg_transport.subscribe(topic_filter)
    if before_run is not None:
        before_run()
    coordinator = Coordinator(config, Endpoint(agg_transport))

    agents: dict[str, Agent] = {}
    errors: list[BaseException] = []
    threads = []
    transports = [agg_transport]
    for site, site_data in data.items():
        transport = make_transport(site)
        transports.append(transport)
        if state_root is not None:
            agent_kw["state_dir"] = state_root / site
        agent = _agent(config.job_id, site, site_data, transport, agent_kw)
        agents[site] = agent

        def serve(agent: Agent = agent) -> None:
            try:
                agent.run(max_seconds=timeout)
            except BaseException as exc:  # surfaced to the caller below
                errors.append(exc)

        threads.append(threading.Thread(target=serve, name=f"agent-{site}", daemon=True))
    for thread in threads:
        thread.start()
    try:
        history = coordinator.run()
    except BaseException:
        for agent in agents.values():  # no finish will come: do not wait for their timeouts
            agent.stop()
        raise
    finally:
        for thread in threads:
            thread.join(timeout)
        for transport in transports:
            transport.close()
    if errors:
        raise errors[0]
    unfinished = sorted(site for site, agent in agents.items() if not agent.finished)
    if unfinished:
        raise RuntimeError(f"agents {unfinished} did not finish the job")
    return JobResult(history, coordinator, agents)


def _agent(
    job_id: str, site: str, data: SiteData, transport: Transport, agent_kw: dict[str, Any]
) -> Agent:
    """A site's agent on its own connected, subscribed transport."""
    transport.connect()
    for topic_filter in topics.site_subscriptions(job_id, site):
        transport.subscribe(topic_filter)
    return Agent(site, job_id, Endpoint(transport), data, hello_interval_s=0.5, **agent_kw)
