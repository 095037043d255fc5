"""``make compose-demo``: a 2-site split-u job in containers on this host, with mutual TLS.

What hospital IT does by hand (docs/deployment.md), in one command:

1. ``medsplit provision`` of a federation for ``hospital-a`` and ``hospital-b`` into RUN/pki, the
   broker's files addressed as the container sees them (``/mosquitto/config``);
2. each hospital's DICOM folder (``medsplit dicom-synth``) in RUN/data/SITE, mounted read-only;
3. the job's and each site's YAML: the provisioned fragment plus the job, data and state
   sections, with every path as the container sees it;
4. RUN/.env for docker/compose.yaml (run folder, ports, users), then ``docker compose up``, a wait
   for the aggregator to finish, the results table, and ``docker compose down``.

With ``--hospital-broker`` hospital-a has a broker of its own (the compose profile
``hospital-broker``): its agent connects to that Mosquitto, which is bridged to the central one
over one connection (``medsplit.security.bridge_files``), as behind a hospital's firewall.

The images come from ``make images`` (run first by ``make compose-demo``). The same functions
prepare the container test (tests/integration/test_containers.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from medsplit.brokers.mosquitto import free_port
from medsplit.security.provision import Federation, Provisioner
from medsplit.storage import atomic_write

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker" / "compose.yaml"
SITES = ("hospital-a", "hospital-b")  # the compose file has one service each
BRIDGED = "hospital-a"  # the site with a hospital broker, with --hospital-broker
APP_UID, BROKER_UID = 10001, 1883  # the images' users (docker/Dockerfile; eclipse-mosquitto)
STATE = Path("/var/lib/medsplit")  # what the containers see (docker/compose.yaml)


@dataclass(frozen=True)
class ComposeRun:
    """One prepared trial: its folder, compose project and the ports it uses."""

    run: Path
    project: str
    broker_port: int
    http_ports: dict[str, int]
    hospital_broker_port: int | None = None  # with a hospital broker for BRIDGED

    @property
    def services(self) -> tuple[str, ...]:
        bridged = ("hospital-broker",) if self.hospital_broker_port else ()
        return ("broker", *bridged, "aggregator", *SITES)

    @property
    def env_file(self) -> Path:
        return self.run / ".env"

    @property
    def report(self) -> Path:
        return self.run / "aggregator" / "run" / "report.json"

    @property
    def checkpoints(self) -> Path:
        return self.run / "aggregator" / "checkpoints"

    def compose(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [*compose_command(), "--env-file", str(self.env_file), "-f", str(COMPOSE_FILE)]
        return subprocess.run(
            [*command, *args], capture_output=True, text=True, check=check, timeout=900
        )

    def container(self, service: str) -> str:
        """The container id of ``service`` (running or not)."""
        ids = self.compose("ps", "--all", "--quiet", service).stdout.split()
        if not ids:
            raise RuntimeError(f"compose project {self.project} has no {service} container")
        return ids[0]


def compose_command() -> list[str]:
    """``docker compose`` (the plugin) where it is installed, else the standalone binary (the
    dev extra installs one in the virtual environment)."""
    plugin = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    if plugin.returncode == 0:
        return ["docker", "compose"]
    for candidate in (Path(sys.prefix) / "bin" / "docker-compose", shutil.which("docker-compose")):
        if candidate and Path(candidate).is_file():
            return [str(candidate)]
    raise RuntimeError("neither `docker compose` nor docker-compose is installed (make setup)")


def prepare(
    run: Path,
    *,
    rounds: int = 3,
    per_site: int = 40,
    seed: int = 0,
    project: str = "medsplit",
    hospital_broker: bool = False,
) -> ComposeRun:
    """Provision, write the data and configs, and RUN/.env; RUN must not exist yet. With
    ``hospital_broker`` hospital-a connects through a broker of its own, bridged."""
    if run.exists():
        raise FileExistsError(f"{run} exists: choose a new --out (its CA is another job's)")
    run = run.resolve()
    trial = ComposeRun(
        run,
        project,
        free_port(),
        {name: free_port() for name in ("aggregator", *SITES)},
        free_port() if hospital_broker else None,
    )
    bridges = {}
    if trial.hospital_broker_port is not None:
        bridges[BRIDGED] = {
            "hosts": ["127.0.0.1", "localhost"],
            "port": trial.hospital_broker_port,
            "bind_address": "127.0.0.1",
            "broker_dir": "/mosquitto/config",  # as docker/compose.yaml mounts them
            "broker_data_dir": "/mosquitto/data",
        }
    federation = Federation(
        job_id="compose-demo",
        sites=list(SITES),
        broker_hosts=["127.0.0.1", "localhost"],
        port=trial.broker_port,
        bind_address="127.0.0.1",
        broker_dir=Path("/mosquitto/config"),  # as docker/compose.yaml mounts them
        broker_data_dir=Path("/mosquitto/data"),
        hospital_brokers=bridges,
    )
    pki = run / "pki"
    Provisioner.create(federation, pki)
    from edge_agent.data.dicom_synth import synthesize_site  # noqa: PLC0415 (pydicom)

    for index, site in enumerate(SITES):
        folder = synthesize_site(run / "data", index, per_site, seed=seed)
        folder.rename(run / "data" / site)
        _extend(pki / site / "site.yaml", _site_sections())
        (run / site).mkdir()
    _extend(pki / "aggregator" / "job.yaml", _job_sections(rounds, seed))
    (run / "aggregator").mkdir()
    (run / "broker-data").mkdir()
    (run / "hospital-broker-data").mkdir()
    uid, broker_uid = _owners(run)
    lines = {
        "COMPOSE_PROJECT_NAME": project,
        "MEDSPLIT_RUN": str(run),
        "BROKER_PORT": trial.broker_port,
        "MEDSPLIT_UID": uid,
        "MEDSPLIT_GID": uid,
        "BROKER_UID": broker_uid,
        "BROKER_GID": broker_uid,
        "AGGREGATOR_HTTP_PORT": trial.http_ports["aggregator"],
        **{f"{s.upper().replace('-', '_')}_HTTP_PORT": trial.http_ports[s] for s in SITES},
    }
    if trial.hospital_broker_port is not None:
        lines["COMPOSE_PROFILES"] = "hospital-broker"
        lines["HOSPITAL_BROKER_PORT"] = trial.hospital_broker_port
    text = "".join(f"{key}={value}\n" for key, value in lines.items())
    atomic_write(trial.env_file, text.encode())
    return trial


def _site_sections() -> dict[str, Any]:
    return {
        "data": {"source": "dicom", "folder": "/data", "classes": ["normal", "lesion"]},
        "device": "cpu",
        "state": {"dir": str(STATE / "state")},
    }


def _job_sections(rounds: int, seed: int) -> dict[str, Any]:
    return {
        "plan": "cnn-cxr-u",
        "mode": "split-u",
        "orchestration": "sequential",
        "seed": seed,
        "dataset": "synthetic-cxr",
        "rounds": {"count": rounds},
        "training": {"batch_size": 16, "optimizer": {"name": "adam", "lr": 1e-3}},
        "state": {"run_dir": str(STATE / "run")},
        "checkpoint": {"dir": str(STATE / "checkpoints")},
    }


def _extend(path: Path, sections: dict[str, Any]) -> None:
    """The provisioned fragment (broker, certificates) plus the sections a deployment adds."""
    data = yaml.safe_load(path.read_text()) | sections
    atomic_write(path, yaml.safe_dump(data, sort_keys=False).encode())


def _owners(run: Path) -> tuple[int, int]:
    """Who the containers run as, and the files they must read (keys are 0600) made theirs.

    As root, the images' own users: the medsplit images' uid 10001 and Mosquitto's 1883. As
    anyone else (who cannot give files away), every container runs as that user."""
    if os.geteuid() != 0:
        return os.getuid(), os.getuid()
    for folder in (run / "pki" / "aggregator", run / "aggregator"):
        _chown(folder, APP_UID)
    for site in SITES:
        _chown(run / "pki" / site, APP_UID)
        _chown(run / site, APP_UID)
    _chown(run / "pki" / "mosquitto", BROKER_UID)
    _chown(run / "broker-data", BROKER_UID)
    if (run / "pki" / "bridges").exists():
        _chown(run / "pki" / "bridges", BROKER_UID)
    _chown(run / "hospital-broker-data", BROKER_UID)
    return APP_UID, BROKER_UID


def _chown(folder: Path, uid: int) -> None:
    for path in (folder, *folder.rglob("*")):
        os.chown(path, uid, uid)


# -- running it ---------------------------------------------------------------------------------


def up(trial: ComposeRun) -> None:
    """Start every service in order; raises naming the services that did not start."""
    started = trial.compose("up", "--detach", "--quiet-pull", check=False)
    states = {service: state(trial, service) for service in trial.services}
    stuck = {service: s for service, s in states.items() if s not in {"running", "exited"}}
    if started.returncode != 0 or stuck:
        said = (started.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"docker compose up: {said}; not started: {stuck or 'none'}")


def state(trial: ComposeRun, service: str) -> str:
    """created, running, restarting, exited…: what Docker says of the service's container."""
    return docker_inspect(trial.container(service), "{{.State.Status}}")


def docker_inspect(container: str, template: str) -> str:
    out = subprocess.run(
        ["docker", "inspect", "--format", template, container],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return out.stdout.strip()


def wait_for_aggregator(trial: ComposeRun, timeout_s: float) -> int:
    """Block until the aggregator container exits; its exit status."""
    done = subprocess.run(
        ["docker", "wait", trial.container("aggregator")],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=True,
    )
    return int(done.stdout.strip())


def down(trial: ComposeRun) -> None:
    """Stop and remove the containers (the run folder keeps every file they wrote)."""
    logs = trial.compose("logs", "--no-color", "--timestamps", check=False)
    atomic_write(trial.run / "compose.log", (logs.stdout + logs.stderr).encode())
    trial.compose("down", "--timeout", "20", check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compose-demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/compose-demo"), help="run folder")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-site", type=int, default=100, help="DICOM images per hospital")
    parser.add_argument("--timeout", type=float, default=900, help="seconds for the whole job")
    parser.add_argument(
        "--hospital-broker",
        action="store_true",
        help=f"{BRIDGED} connects through a broker of its own, bridged to the central one",
    )
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    if args.out.exists():
        shutil.rmtree(args.out)  # a previous trial's: its CA is not this one's
    trial = prepare(
        args.out,
        rounds=args.rounds,
        per_site=args.per_site,
        hospital_broker=args.hospital_broker,
    )
    console.print(f"run folder {trial.run}; broker on 127.0.0.1:{trial.broker_port} (mutual TLS)")
    console.print(f"starting {', '.join(trial.services)} (health checks gate each)")
    try:
        up(trial)
        console.print(
            f"aggregator status: http://127.0.0.1:{trial.http_ports['aggregator']}/readyz; "
            "waiting for the job to finish"
        )
        code = wait_for_aggregator(trial, args.timeout)
    finally:
        down(trial)
    if code != 0 or not trial.report.is_file():
        console.print(
            f"[red]the aggregator exited with {code}[/red]; logs: {trial.run / 'compose.log'}"
        )
        return code or 1
    from experiments.demo import print_results  # noqa: PLC0415

    print_results(json.loads(trial.report.read_text()), console)
    console.print(
        f"models: {', '.join(str(trial.run / s / 'state' / 'model.onnx') for s in SITES)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
