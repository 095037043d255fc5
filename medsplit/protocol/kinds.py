"""Message kinds: the last level of every topic and the ``kind`` of every envelope header.

Uplink (site -> aggregator): ``hello``, ``stats``, ``activations``, ``trunk-grad``, ``done``,
``eval-activations``, ``metrics``, ``finished`` (the site has its final model), ``error``,
``aligned`` (vertical jobs).
Downlink (aggregator -> site): ``setup``, ``stats-request``, ``normalization``, ``train``,
``gradients``, ``trunk-out``, ``act-grad``, ``evaluate``, ``eval-out``, ``finish``, ``refused``,
``error``, ``align`` (vertical jobs).
Presence is not a kind: it travels on its own retained topic, as JSON (``presence``).
"""

from __future__ import annotations

from medsplit.modes import TextEnum


class Kind(TextEnum):
    HELLO = "hello"
    SETUP = "setup"
    REFUSED = "refused"  # the aggregator will not take this site (not in the job)
    STATS_REQUEST = "stats-request"  # before training: send your counts and sums
    STATS = "stats"
    NORMALIZATION = "normalization"  # the combined statistics every site applies
    TRAIN = "train"
    EVALUATE = "evaluate"
    FINISH = "finish"
    FINISHED = "finished"  # the answer to finish: this site has its final model
    ERROR = "error"
    ACTIVATIONS = "activations"
    GRADIENTS = "gradients"
    TRUNK_OUT = "trunk-out"
    TRUNK_GRAD = "trunk-grad"
    ACT_GRAD = "act-grad"
    DONE = "done"
    METRICS = "metrics"
    EVAL_ACTIVATIONS = "eval-activations"
    EVAL_OUT = "eval-out"
    ALIGN = "align"  # vertical jobs: a stage of the private set intersection, relayed
    ALIGNED = "aligned"  # a party's answer to it
