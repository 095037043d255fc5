"""The ``medsplit demo`` command's options: light to import, since every ``--help`` builds them."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from edge_agent.data.names import DATASETS, SCHEMES, parse_scheme
from medsplit.modes import MODES, WIRE_DTYPES, Mode, Orchestration


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=[m.value for m in Mode], default="split-u")
    parser.add_argument(
        "--orchestration",
        choices=[o.value for o in Orchestration],
        help="default: sequential for split modes, parallel for fedavg/flop",
    )
    parser.add_argument("--sites", type=int, default=3, help="number of hospitals (default 3)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--dataset", choices=DATASETS, default="breast-cancer")
    parser.add_argument(
        "--plan",
        type=Path,
        help="a plan file (your own model: docs/bring-your-own-model.md); its input shape must "
        "be the dataset's. The demo's sites allow the plan's model factory",
    )
    parser.add_argument("--partition", default="iid", help=SCHEMES)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wire-dtype", choices=WIRE_DTYPES, default="float32")
    parser.add_argument(
        "--broker", help="use this broker (mqtt://host:port) instead of starting one"
    )
    parser.add_argument(
        "--embedded-broker",
        action="store_true",
        help="use the in-process Python broker (amqtt, MQTT 3.1.1) even if Mosquitto is installed",
    )
    parser.add_argument("--out", type=Path, help="run directory (default runs/demo-TIMESTAMP)")
    parser.add_argument(
        "--timeout", type=float, default=1800, help="give up after this many seconds"
    )
    parser.add_argument(
        "--http-port",
        type=int,
        help="serve the aggregator's /status, /metrics and probes here (default: a free port)",
    )


@dataclass(frozen=True)
class DemoOptions:
    mode: str
    orchestration: str
    sites: int
    rounds: int
    dataset: str
    partition: str
    batch_size: int
    lr: float
    seed: int
    wire_dtype: str
    broker: str | None
    embedded_broker: bool
    out: Path
    timeout: float
    http_port: int = 0  # 0: a free one, chosen when the configs are written
    plan: Path | None = None  # default: the built-in plan for the dataset and mode

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DemoOptions:
        if args.sites < 1:
            raise SystemExit("error: --sites must be at least 1")
        if args.rounds < 1:
            raise SystemExit("error: --rounds must be at least 1")
        try:
            parse_scheme(args.partition)
        except ValueError as exc:
            raise SystemExit(f"error: --partition: {exc}") from None
        from medsplit.brokers.mosquitto import free_port  # noqa: PLC0415 (--help stays light)

        out = args.out or Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
        return cls(
            mode=args.mode,
            orchestration=args.orchestration or MODES[Mode(args.mode)].default_orchestration.value,
            sites=args.sites,
            rounds=args.rounds,
            dataset=args.dataset,
            partition=args.partition,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            wire_dtype=args.wire_dtype,
            broker=args.broker,
            embedded_broker=args.embedded_broker,
            out=out,
            timeout=args.timeout,
            http_port=args.http_port or free_port(),
            plan=args.plan.resolve() if args.plan else None,
        )
