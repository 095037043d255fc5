"""A hospital's own network, from a package the test writes, trained by real processes over a
real Mosquitto: cut by module name, recomposed exactly, exported to ONNX at every site; and a
site that does not allow the job's model refuses it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest
import torch
import yaml

from edge_agent.data import datasets
from edge_agent.main import EXIT_FOREIGN_CODE
from edge_agent.site_model import load_site_model
from experiments.federation import Federation, small_job
from medsplit.brokers.mosquitto import Mosquitto
from models import split_model
from tests.support import own_package

pytestmark = pytest.mark.integration
TIMEOUT = 240


@pytest.fixture
def package_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The package where the child processes find it: on their PYTHONPATH."""
    root = own_package.write_package(tmp_path / "site-packages")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    return root


def _federation(
    tmp_path: Path, broker: Mosquitto, mode: str, orchestration: str, allow: list[str]
) -> Federation:
    job = small_job(mode, orchestration, rounds=2)
    job["plan"] = own_package.plan()
    if mode == "split-u":
        job["defenses"] = {"gradient_noise": 0}
    workdir = tmp_path / mode
    workdir.mkdir()
    sites = {site: {"export_onnx": True, "models": {"allow": allow}} for site in job["sites"]}
    return Federation(workdir, broker.url, job, site_settings=sites)


def _held_out(fed: Federation, site: str) -> torch.Tensor:
    index = fed.sites.index(site)
    return datasets.share("breast-cancer", "iid", len(fed.sites), index).x_test


@pytest.mark.parametrize(("mode", "orchestration"), [("split-u", "parallel"), ("flop", "parallel")])
def test_an_own_network_trains_over_mosquitto_and_every_site_exports_it(
    mosquitto: Mosquitto,
    tmp_path: Path,
    package_on_path: Path,
    mode: str,
    orchestration: str,
) -> None:
    fed = _federation(tmp_path, mosquitto, mode, orchestration, allow=["clinic_nets:*"])
    try:
        fed.start_all()
        codes = fed.wait_all(TIMEOUT)
    finally:
        fed.stop_all()
    assert all(code == 0 for code in codes.values()), "\n".join(map(fed.tail, codes))
    report: dict[str, Any] = fed.report()
    assert report["status"] == "completed"
    assert all(r["trained"] == fed.sites for r in report["history"])
    with own_package.on_path(package_on_path):  # this process reads the models too
        for site in fed.sites:
            model, card = load_site_model(fed.state_dir(site) / "site-model.safetensors", site)
            x = _held_out(fed, site)
            parts = split_model(model, card.plan)
            with torch.no_grad():
                expected = model(x)
                recomposed = x
                for segment in parts.segments():
                    recomposed = segment(recomposed)
            assert torch.equal(recomposed, expected)  # the segments are the model, exactly
            session = onnxruntime.InferenceSession(str(fed.state_dir(site) / "model.onnx"))
            (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
            np.testing.assert_allclose(onnx_out, expected.numpy(), atol=1e-4)


def test_a_site_that_does_not_allow_the_job_s_model_refuses_it(
    mosquitto: Mosquitto, tmp_path: Path, package_on_path: Path
) -> None:
    fed = _federation(tmp_path, mosquitto, "split-u", "sequential", allow=["other_pkg.nets:*"])
    try:
        fed.start_all()
        site = fed.sites[0]
        assert fed.wait(site, TIMEOUT) == EXIT_FOREIGN_CODE
    finally:
        fed.stop_all()
    log = fed.log(site).read_text()
    line = (
        f"{site}: refused the job: factory 'clinic_nets:build' is not allowed on this site "
        "(models.allow in site.yaml: other_pkg.nets:*)"
    )
    assert line in log
    assert "Traceback" not in log


def _demo(out: Path, plan: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "medsplit", "demo", "--plan", str(plan), "--out", str(out)]
    return subprocess.run(
        [*command, "--sites", "2", "--rounds", "1", "--timeout", "240", *extra],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_demo_trains_a_plan_file_of_the_user_s_own(
    tmp_path: Path, package_on_path: Path
) -> None:
    plan = tmp_path / "clinic.yaml"
    plan.write_text(yaml.safe_dump(own_package.plan()))
    completed = _demo(tmp_path / "run", plan)
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = tmp_path / "run"
    assert json.loads((out / "report.json").read_text())["status"] == "completed"
    for site in ("hospital-1", "hospital-2"):  # the demo owns its sites: it allowed the factory
        config = yaml.safe_load((out / f"{site}.yaml").read_text())
        assert config["models"] == {"allow": [own_package.FACTORY]}
        assert (out / "state" / site / "model.onnx").stat().st_size > 0


def test_the_demo_refuses_a_plan_whose_inputs_are_not_the_dataset_s(
    tmp_path: Path, package_on_path: Path
) -> None:
    plan = tmp_path / "clinic.yaml"
    data = own_package.plan()
    data["model"] = {"factory": own_package.FACTORY, "input_shape": [30]}
    plan.write_text(yaml.safe_dump(data))
    completed = _demo(tmp_path / "run", plan, "--dataset", "synthetic-cxr")
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines()[-1] == (
        f"error: {plan}: model.input_shape: [30], but synthetic-cxr samples are [1, 64, 64]"
    )
