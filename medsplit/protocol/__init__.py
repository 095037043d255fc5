"""Protocol version 1: message kinds, topics, presence, the job spec and tensor specs.

Both processes import this package and nothing of each other: it is the whole contract between
a site and the aggregator.
"""

from medsplit.modes import FEDERATED_MODES, SPLIT_MODES
from medsplit.protocol import topics
from medsplit.protocol.kinds import Kind
from medsplit.protocol.spec import (
    JobSpec,
    TensorSpecs,
    edge_keys,
    exchanged_keys,
    final_keys,
)

__all__ = [
    "FEDERATED_MODES",
    "SPLIT_MODES",
    "JobSpec",
    "Kind",
    "TensorSpecs",
    "edge_keys",
    "exchanged_keys",
    "final_keys",
    "topics",
]
