"""An agent's ``/metrics``: what it has done, computed from the agent when scraped.

The counters are the agent's own (``Agent.progress``) and its channel's, so serving them adds
nothing to the training path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from edge_agent.lifecycle import AgentPhase

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from edge_agent.agent import Agent


class AgentCollector:
    def __init__(self, agent: Callable[[], Agent | None]) -> None:
        self._agent = agent

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import (  # noqa: PLC0415 (only when metrics are served)
            CounterMetricFamily,
            GaugeMetricFamily,
        )

        agent = self._agent()
        if agent is None:
            return
        progress, stats = agent.progress, agent.endpoint.stats
        phase = GaugeMetricFamily(
            "medsplit_agent_phase", "1 for the agent's current phase", labels=["phase"]
        )
        for each in AgentPhase:
            phase.add_metric([str(each)], 1.0 if each == agent.phase else 0.0)
        yield phase
        yield CounterMetricFamily(
            "medsplit_agent_rounds_trained", "training turns done", value=progress.rounds_trained
        )
        yield CounterMetricFamily(
            "medsplit_agent_steps", "training batches done", value=progress.steps
        )
        yield CounterMetricFamily(
            "medsplit_agent_compute_seconds",
            "time spent training, waiting on the aggregator's answers included",
            value=progress.compute_seconds,
        )
        traffic = CounterMetricFamily(
            "medsplit_agent_bytes", "wire bytes, by direction", labels=["direction"]
        )
        traffic.add_metric(["up"], stats.sent_bytes)
        traffic.add_metric(["down"], stats.received_bytes)
        yield traffic
        rejected = CounterMetricFamily(
            "medsplit_agent_messages_rejected", "messages refused, by reason", labels=["reason"]
        )
        for reason, count in dict(stats.rejected).items():
            rejected.add_metric([reason], count)
        yield rejected
