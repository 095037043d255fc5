"""An agent's ``/metrics``: what it has done, computed from the agent when scraped.

The counters are the agent's own (``Agent.progress``) and its channel's, so serving them adds
nothing to the training path.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from edge_agent.lifecycle import AgentPhase
from medsplit.metric_families import Scraped, counted_by, one_hot

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from edge_agent.agent import Agent


class AgentCollector(Scraped["Agent"]):
    def families(self, agent: Agent) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily  # noqa: PLC0415 (when served)

        progress, stats = agent.progress, agent.endpoint.stats
        phases = [str(p) for p in AgentPhase]
        yield one_hot(
            "medsplit_agent_phase", "1 for the agent's phase", "phase", phases, str(agent.phase)
        )
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
        yield counted_by(
            "medsplit_agent_messages_rejected",
            "messages refused, by reason",
            "reason",
            stats.rejected,
        )
        yield from gpu_families(agent.device)


def gpu_families(device: torch.device) -> Iterator[Metric]:
    """The GPU the site's layers run on: memory torch holds and the device's utilisation
    (NVML through torch, where the driver offers it). Nothing on a CPU-only site."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return
    from prometheus_client.core import GaugeMetricFamily  # noqa: PLC0415 (when served)

    label = [str(device)]
    allocated = GaugeMetricFamily(
        "medsplit_agent_gpu_memory_bytes",
        "GPU memory held by torch's caching allocator, by device and kind",
        labels=["device", "kind"],
    )
    allocated.add_metric([*label, "allocated"], torch.cuda.memory_allocated(device))
    allocated.add_metric([*label, "reserved"], torch.cuda.memory_reserved(device))
    allocated.add_metric([*label, "peak"], torch.cuda.max_memory_allocated(device))
    yield allocated
    try:
        utilisation = float(torch.cuda.utilization(device))
    except (RuntimeError, ModuleNotFoundError):  # no NVML (pynvml) on this box
        return
    gauge = GaugeMetricFamily(
        "medsplit_agent_gpu_utilization_percent",
        "share of the last sample period the GPU was busy",
        labels=["device"],
    )
    gauge.add_metric(label, utilisation)
    yield gauge
