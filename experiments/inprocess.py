"""A whole job in one process: the aggregator in the calling thread, one thread per agent.

Every party still joins through the one wiring (``medsplit.wiring``: Last Will, presence,
subscriptions) on its own transport -- a real broker in experiments and integration tests, the
in-memory twin in unit tests -- exactly as separate processes would.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aggregator.config import JobConfig
from aggregator.coordinator import Coordinator
from aggregator.state import RoundRecord
from edge_agent.agent import Agent
from edge_agent.data.datasets import SiteData
from medsplit.wiring import Connector, Party, open_aggregator, open_site


@dataclass
class JobResult:
    history: list[RoundRecord]
    coordinator: Coordinator
    agents: dict[str, Agent]


def run_job(
    config: JobConfig,
    data: dict[str, SiteData],
    connect: Connector,
    *,
    timeout: float = 300.0,
    before_run: Callable[[], None] | None = None,
    state_root: Path | None = None,
    agent_type: type[Agent] = Agent,
    **agent_kw: Any,
) -> JobResult:
    """Aggregator in this thread, one thread per agent; every agent must finish.

    ``before_run`` is called once the aggregator is subscribed, before any agent starts. With
    ``state_root`` each site keeps its state in ``state_root/SITE``, as the demo lays it out.
    """
    aggregator = open_aggregator(config.job_id, connect)
    parties: list[Party] = [aggregator]
    if before_run is not None:
        before_run()
    coordinator = Coordinator(config, aggregator.endpoint, presence=aggregator.presence)

    agents: dict[str, Agent] = {}
    errors: list[BaseException] = []
    threads = []
    for site, site_data in data.items():
        party = open_site(config.job_id, site, connect)
        parties.append(party)
        if state_root is not None:
            agent_kw["state_dir"] = state_root / site
        agent = agent_type(
            site,
            config.job_id,
            party.endpoint,
            site_data,
            hello_interval_s=0.5,
            incarnation=party.incarnation,
            **agent_kw,
        )
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
        for party in parties:
            party.close()
    if errors:
        raise errors[0]
    unfinished = sorted(site for site, agent in agents.items() if not agent.finished)
    if unfinished:
        raise RuntimeError(f"agents {unfinished} did not finish the job")
    return JobResult(history, coordinator, agents)
