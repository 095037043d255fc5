"""Process entry point of the ``medsplit`` command: settings that must precede importing torch.

The aggregator and the agents alternate computing with waiting for the network, and in the demo
(and any small deployment) they share a machine. OpenMP threads that keep spinning after each
parallel region then steal the cores the other process is about to compute on. Waiting
passively costs a single process a little and saves the federation more: see the "spinning"
row of ``bench/split_overhead.py`` in docs/benchmarks.md.
``OMP_WAIT_POLICY`` is read once, when the OpenMP runtime loads with torch, so it is set here,
before anything imports torch; an explicit setting in the environment wins.
"""

from __future__ import annotations

import os


def main() -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from medsplit.cli import main as cli_main  # noqa: PLC0415 - must follow the setting above

    return cli_main()
