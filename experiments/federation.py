"""A federation of real processes, for fault-injection tests and ``bench/chaos.py``.

``Federation`` writes one job.yaml and one site.yaml per site (a share of a built-in dataset),
starts ``medsplit aggregator`` and ``medsplit agent`` as child processes against a given broker,
and lets a test kill, stop and restart any of them. Every process logs to its own file under
the work directory, which the failure messages quote.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

from medsplit.brokers.embedded import LocalBroker
from medsplit.ids import AGGREGATOR_ID
from medsplit.modes import SPLIT_MODES
from medsplit.security.seal_kit import sealing_files

MEDSPLIT = [sys.executable, "-m", "medsplit"]


def small_job(
    mode: str,
    orchestration: str,
    *,
    sites: int = 2,
    rounds: int = 4,
    deadline_s: float = 600,
    **round_settings: Any,
) -> dict[str, Any]:
    """A job.yaml of the tabular plan for ``mode`` (sites ``site-a``, ``site-b``, ...), seed 0,
    with a fresh id: what the fault-injection tests and benchmarks run. Deadlines are long, so
    a job that completes did not wait one out."""
    return {
        "job_id": f"job-{uuid.uuid4().hex[:8]}",
        "plan": "mlp-ehr-u" if mode == "split-u" else "mlp-ehr",
        "mode": mode,
        "orchestration": orchestration,
        "sites": [f"site-{chr(ord('a') + i)}" for i in range(sites)],
        "seed": 0,
        "rounds": {
            "count": rounds,
            "deadline_s": deadline_s,
            "join_deadline_s": deadline_s,
            **round_settings,
        },
    }


class Federation:
    def __init__(
        self,
        workdir: Path,
        broker_url: str,
        job: dict[str, Any],
        *,
        dataset: str = "breast-cancer",
        site_waits: dict[str, Any] | None = None,
        site_settings: dict[str, dict[str, Any]] | None = None,
        kits: LocalBroker | None = None,
    ) -> None:
        """``site_settings``: more of a site's site.yaml, by site (its ``http`` port).
        ``kits``: a provisioned broker; each process then connects with its own certificate
        (mutual TLS) instead of in plaintext."""
        self.workdir = workdir
        self.job_id = str(job["job_id"])
        self.sites = list(job["sites"])
        self.run_dir = workdir / "run"
        reconnect = {"reconnect_min_s": 1, "reconnect_max_s": 2}

        def broker_of(identity: str) -> dict[str, Any]:
            if kits is None:
                return {"url": broker_url, "insecure": True, **reconnect}
            return {**kits.broker_section(identity), **reconnect}

        job = {
            "broker": broker_of(AGGREGATOR_ID),
            "state": {"run_dir": str(self.run_dir)},
            "waits": {"status_interval_s": 2, "retry_interval_s": 1},
            **job,
        }
        sealing = self._sealing(job, kits)
        self.job_yaml = self._write("job.yaml", job)
        self.site_yaml: dict[str, Path] = {}
        for index, site in enumerate(self.sites):
            self.site_yaml[site] = self._write(
                f"{site}.yaml",
                {
                    "site_id": site,
                    "job_id": self.job_id,
                    "broker": broker_of(site),
                    "device": "cpu",
                    "export_onnx": False,
                    "data": {
                        "source": "builtin",
                        "dataset": dataset,
                        "num_sites": len(self.sites),
                        "index": index,
                    },
                    "waits": {"status_interval_s": 2, "retry_interval_s": 1, **(site_waits or {})},
                    "state": {"dir": str(self.state_dir(site))},
                    **({"sealing": sealing(site)} if sealing else {}),
                    **(site_settings or {}).get(site, {}),
                },
            )
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.starts: dict[str, int] = {}

    def _sealing(
        self, job: dict[str, Any], kits: LocalBroker | None
    ) -> Callable[[str], dict[str, str]] | None:
        """A split job seals its segments by default: the aggregator's roster goes into
        ``job`` and each site's keys into its site.yaml -- from the provisioned kits, or from a
        kit made for this run when the broker is plaintext."""
        mode = str(job.get("mode", "split-u"))
        if not job.get("seal_segments", True) or mode not in SPLIT_MODES:
            return None
        files = sealing_files(kits.kits if kits else None, self.workdir, self.job_id, self.sites)
        job["security"] = {"roster_file": str(files.roster_file), **job.get("security", {})}
        return files.site_section

    def _write(self, name: str, data: dict[str, Any]) -> Path:
        path = self.workdir / name
        path.write_text(yaml.safe_dump(data))
        return path

    def state_dir(self, site: str) -> Path:
        return self.workdir / "state" / site

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints" / self.job_id

    def log(self, name: str) -> Path:
        return self.workdir / f"{name}.{self.starts.get(name, 0)}.log"

    # -- processes -----------------------------------------------------------------------------------

    def start(self, name: str, *extra: str) -> subprocess.Popen[bytes]:
        """Start ``aggregator`` or a site's agent (again)."""
        self.starts[name] = self.starts.get(name, 0) + 1
        if name == "aggregator":
            command = [*MEDSPLIT, "aggregator", "--config", str(self.job_yaml), *extra]
        else:
            command = [*MEDSPLIT, "agent", "--config", str(self.site_yaml[name]), *extra]
        with self.log(name).open("wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self.processes[name] = process
        return process

    def start_all(self) -> None:
        self.start("aggregator")
        for site in self.sites:
            self.start(site)

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> int:
        process = self.processes[name]
        process.send_signal(sig)
        return process.wait(60)

    def wait(self, name: str, timeout: float) -> int:
        try:
            return self.processes[name].wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{name} still running after {timeout:g} s\n{self.tail(name)}"
            ) from None

    def wait_all(self, timeout: float) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        return {
            name: self.wait(name, max(1.0, deadline - time.monotonic())) for name in self.processes
        }

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(30)

    def tail(self, name: str, lines: int = 40) -> str:
        text = self.log(name).read_text(errors="replace") if self.log(name).exists() else ""
        return f"--- {self.log(name).name}\n" + "\n".join(text.splitlines()[-lines:])

    # -- waiting for something to happen --------------------------------------------------------------

    def await_file(self, path: Path, timeout: float = 120) -> None:
        """Block until ``path`` exists (the processes write it); polls the file system."""
        deadline = time.monotonic() + timeout
        while not path.exists():
            for name, process in self.processes.items():
                if process.poll() is not None and name == "aggregator":
                    raise AssertionError(
                        f"aggregator exited while waiting for {path}\n{self.tail(name)}"
                    )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{path} did not appear within {timeout:g} s\n{self.tail('aggregator')}"
                )
            # Polled often: a fault injected "after this checkpoint" must land before a fast
            # round (tens of ms for the tabular jobs) writes the next one.
            time.sleep(0.002)

    def await_log(self, name: str, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while text not in (
            self.log(name).read_text(errors="replace") if self.log(name).exists() else ""
        ):
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} never logged {text!r}\n{self.tail(name)}")
            time.sleep(0.05)

    def checkpoint(self, round: int) -> Path:
        return self.checkpoints / f"round-{round:05d}.safetensors"

    # -- results -----------------------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        return dict(json.loads((self.run_dir / "report.json").read_text()))

    def weights(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.run_dir / "model.safetensors"))

    def site_weights(self, site: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.state_dir(site) / "edge.safetensors"))
