"""Prometheus metric families computed when scraped, for both processes' ``/metrics``.

A process's metrics are read from what it already keeps (the aggregator's ``JobState``, the
agent's progress and channel counters) at scrape time, instead of being updated on the training
path. ``Scraped`` is the collector shape both use; the helpers build the two families they share.
prometheus_client loads only when metrics are served.
"""

from __future__ import annotations

import bisect
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

Source = TypeVar("Source")


class Scraped(ABC, Generic[Source]):
    """A collector of what ``source()`` returns; nothing while it returns None (not started)."""

    def __init__(self, source: Callable[[], Source | None]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        current = self._source()
        if current is not None:
            yield from self.families(current)

    @abstractmethod
    def families(self, source: Source) -> Iterator[Metric]: ...


def one_hot(
    name: str, documentation: str, label: str, values: Iterable[str], current: str
) -> Metric:
    """A gauge that is 1 for the current value (a phase) and 0 for the others."""
    from prometheus_client.core import GaugeMetricFamily  # noqa: PLC0415

    family = GaugeMetricFamily(name, documentation, labels=[label])
    for value in values:
        family.add_metric([value], 1.0 if value == current else 0.0)
    return family


def counted_by(name: str, documentation: str, label: str, counts: Mapping[str, int]) -> Metric:
    """A counter with one sample per key of ``counts`` (messages rejected, by reason)."""
    from prometheus_client.core import CounterMetricFamily  # noqa: PLC0415

    family = CounterMetricFamily(name, documentation, labels=[label])
    for key, count in dict(counts).items():  # a copy: the process may add a key meanwhile
        family.add_metric([key], count)
    return family


class Durations:
    """Durations counted into fixed buckets, per label value: a histogram for ``/metrics``.

    For what happens too often to keep (every split-learning step) and is not in the job's
    state. One lock, taken for a few list operations: the training thread observes, the HTTP
    thread reads, and a scrape must not see a count without its sum.
    """

    def __init__(self, buckets: Iterable[float]) -> None:
        self.buckets = tuple(sorted(buckets))
        self._counts: dict[str, list[int]] = {}  # per bucket, the last one for +Inf
        self._sums: dict[str, float] = {}
        self._lock = threading.Lock()

    def observe(self, label: str, seconds: float) -> None:
        slot = bisect.bisect_left(self.buckets, seconds)
        with self._lock:
            counts = self._counts.setdefault(label, [0] * (len(self.buckets) + 1))
            counts[slot] += 1
            self._sums[label] = self._sums.get(label, 0.0) + seconds

    def totals(self) -> dict[str, tuple[int, float]]:
        """Per label: how many durations were observed, and their sum."""
        with self._lock:
            return {key: (sum(c), self._sums[key]) for key, c in self._counts.items()}

    def family(self, name: str, documentation: str, label: str) -> Metric:
        from prometheus_client.core import HistogramMetricFamily  # noqa: PLC0415

        family = HistogramMetricFamily(name, documentation, labels=[label])
        with self._lock:
            observed = {key: (list(c), self._sums[key]) for key, c in self._counts.items()}
        for key, (counts, total) in observed.items():
            cumulative, running = [], 0
            for bound, count in zip((*map(str, self.buckets), "+Inf"), counts, strict=True):
                running += count
                cumulative.append((bound, running))
            family.add_metric([key], cumulative, sum_value=total)
        return family
