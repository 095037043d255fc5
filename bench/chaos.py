"""A federation under fire: random faults injected into real processes, and what survived.

One split-u job (3 sites, parallel rounds, breast-cancer) runs as real processes
(``medsplit aggregator`` and ``medsplit agent``) against a real Mosquitto behind a TCP relay.
Once a round is under way (its predecessor's checkpoint appears) one fault, drawn at random
(seeded), hits it; the next fault waits for a whole round after the parties it took down are
back, so that each fault's effect shows in the round it hit:

* ``aggregator-kill``: SIGKILL the aggregator, start it again (it resumes from its checkpoint);
* ``agent-kill``: SIGKILL one agent, start it again (it rejoins with its state directory);
* ``broker-restart``: SIGKILL Mosquitto (no persistence: sessions and queued messages are
  gone), start it again on the same port;
* ``network-stall``: the relay holds every byte for a few seconds, then lets them through.

Per fault kind the table shows how many were injected, after how many the job still completed
with every process exiting 0, how many rounds were redone (an aggregator resumed into the round
it was killed in), and how many messages were lost: a site that was *not* the one killed but
still missed a round between this fault and the next (its request or answer never arrived, so
the round closed without it).
The same job without faults, run in the same session, is the baseline for accuracy and time.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from _report import bench_main, machine

from experiments.federation import Federation
from experiments.relay import TcpProxy
from medsplit.brokers.mosquitto import Mosquitto

KINDS = ("aggregator-kill", "agent-kill", "broker-restart", "network-stall")
SITES = ["site-a", "site-b", "site-c"]
STALL_S = 4.0


def _job(rounds: int) -> dict[str, Any]:
    return {
        "job_id": f"chaos-{uuid.uuid4().hex[:6]}",
        "plan": "mlp-ehr-u",
        "mode": "split-u",
        "orchestration": "parallel",
        "sites": SITES,
        "seed": 0,
        "rounds": {"count": rounds, "deadline_s": 120, "join_deadline_s": 120, "min_sites": 2},
        # Rounds of a second or two, so that a restart spans a few rounds, not dozens.
        "training": {"local_epochs": 10},
        "checkpoint": {"keep": 3},
    }


def _finish(fed: Federation) -> tuple[dict[str, Any], dict[str, int]]:
    codes = fed.wait_all(900)
    return fed.report(), codes


def _clean(root: Path, rounds: int) -> tuple[dict[str, Any], float]:
    with Mosquitto(root / "clean-broker") as broker:
        (root / "clean").mkdir()
        fed = Federation(root / "clean", broker.url, _job(rounds))
        started = time.monotonic()
        fed.start_all()
        report, _ = _finish(fed)
        return report, time.monotonic() - started


def _inject(
    kind: str, fed: Federation, broker: Mosquitto, relay: TcpProxy, rng: random.Random
) -> str:
    """Inject one fault; returns the site it took down, if any."""
    if kind == "aggregator-kill":
        fed.kill("aggregator")
        fed.start("aggregator")
    elif kind == "agent-kill":
        site = rng.choice(SITES)
        fed.kill(site)
        fed.start(site)
        return site
    elif kind == "broker-restart":
        broker.kill()
        broker.start()
    else:
        relay.stall()
        time.sleep(STALL_S)  # the fault itself: a link that holds everything for a while
        relay.resume()
    return ""


def _rounds(plan: list[str]) -> int:
    """Enough rounds for every fault and a clean round after each: a round of this small
    model takes well under a second, a restarted Python process several."""
    return 6 * len(plan) + 4


def _newest_round(fed: Federation) -> int:
    names = [p.name for p in fed.checkpoints.glob("round-*.safetensors")]
    return max((int(n[6:11]) for n in names), default=0)


def _chaos(
    root: Path, plan: list[str], seed: int
) -> tuple[dict[str, Any], float, list[dict[str, Any]], bool]:
    """Run the job with ``plan``'s faults, one per round, each after a clean round."""
    rng = random.Random(seed)
    broker = Mosquitto(root / "chaos-broker").start()
    relay = TcpProxy(broker.port)
    (root / "chaos").mkdir()
    fed = Federation(root / "chaos", f"mqtt://127.0.0.1:{relay.port}", _job(_rounds(plan)))
    faults: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        fed.start_all()
        target = 1
        for kind in plan:
            if target >= _rounds(plan):
                raise RuntimeError(
                    f"the job ended before fault {len(faults) + 1} could be injected"
                )
            fed.await_file(fed.checkpoint(target), timeout=600)
            site = _inject(kind, fed, broker, relay, rng)
            faults.append({"kind": kind, "round": target, "site": site})
            if site:  # the restarted agent is back before the next fault is injected
                fed.await_log(site, "joined job", timeout=600)
            target = max(target, _newest_round(fed)) + 2  # one whole round in between
        report, codes = _finish(fed)
        survived = report["status"] == "completed" and all(c == 0 for c in codes.values())
    finally:
        fed.stop_all()
        relay.close()
        broker.stop()
    return report, time.monotonic() - started, faults, survived


def _table(
    plan: list[str], report: dict[str, Any], faults: list[dict[str, Any]], survived: bool
) -> list[str]:
    history = report["history"]
    resumed = Counter(report["faults"]["resumed_at"])
    # A fault's window: the rounds from the one it hit to the next fault's.
    ends = [f["round"] for f in faults[1:]] + [len(history)]
    lost_by_fault = [
        sum(
            len([s for s in h["missed"] if s != fault["site"]])
            for h in history[fault["round"] : end]
        )
        for fault, end in zip(faults, ends, strict=True)
    ]
    rows = []
    for kind in KINDS:
        mine = [f for f in faults if f["kind"] == kind]
        redone = sum(resumed[f["round"]] for f in mine) if kind == "aggregator-kill" else 0
        lost = sum(n for f, n in zip(faults, lost_by_fault, strict=True) if f["kind"] == kind)
        ok = len(mine) if survived else 0
        rows.append(f"| {kind} | {len(mine)} | {ok} | {redone} | {lost} |")
    return rows


def run(quick: bool) -> str:
    faults = 4 if quick else 8
    rng = random.Random(13)
    plan = [KINDS[i % len(KINDS)] for i in range(faults)]
    rng.shuffle(plan)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        reference, clean_s = _clean(root, _rounds(plan))
        report, chaos_s, injected, survived = _chaos(root, plan, seed=13)
    accuracy = report["final"]["mean"]["accuracy"]
    baseline = reference["final"]["mean"]["accuracy"]
    lines = [
        "| fault | injected | survived | rounds redone | messages lost |",
        "| --- | ---: | ---: | ---: | ---: |",
        *_table(plan, report, injected, survived),
        "",
        f"Job {'completed' if survived else 'FAILED'}: final mean accuracy {accuracy:.4f} with "
        f"faults vs {baseline:.4f} without; wall time {chaos_s:.0f} s vs {clean_s:.0f} s "
        f"({chaos_s / clean_s:.1f}x, restarts of Python processes included); requests re-sent: "
        f"{report['faults']['requests_resent']}; sites missing a round in all: "
        f"{statistics.fsum(len(h['missed']) for h in report['history']):.0f}.",
    ]
    return "\n".join(lines)


def intro() -> str:
    return (
        "## Chaos: faults injected into a running federation\n\n"
        "`python bench/chaos.py --write-docs` (8 faults, each kind twice, in a seeded random "
        "order, one round apart; split-u, 3 sites, parallel rounds, min_sites 2; see "
        "docs/operations.md).\n"
        f"Machine: {machine()}."
    )


if __name__ == "__main__":
    bench_main("chaos", __doc__, intro, run)
