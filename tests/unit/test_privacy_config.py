"""The privacy sweep's grid: each defense only where it can act, bad settings refused early."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from experiments.config import ExperimentConfig
from experiments.privacy.sweep import privacy_cells
from medsplit.cli import main


def _config(**privacy: object) -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {
            "name": "pv",
            "modes": ["centralized", "fedavg", "split", "split-u"],
            "seeds": [0],
            "privacy": privacy,
        }
    )


def test_each_defense_runs_only_where_it_can_act() -> None:
    config = _config(
        defenses=[{"activation_noise": 1.0, "activation_clip": 2.0}, {"gradient_noise": 1.0}]
    )
    cells = {(c.mode, c.defense.label()) for c in privacy_cells(config)}
    assert cells == {
        ("fedavg", "none"),  # weights travel, not activations: undefended only
        ("split", "none"),
        ("split", "noise 1 + clip 2"),  # labels travel in split: gradient noise hides nothing
        ("split-u", "none"),
        ("split-u", "default"),  # the job's defaults: noise on the returned gradients
        ("split-u", "noise 1 + clip 2"),
        ("split-u", "grad-noise 1"),
    }  # and the centralized baseline sends nothing at all
    jobs = {c.job_id("pv") for c in privacy_cells(config)}
    assert len(jobs) == len(cells)  # every cell its own job id and run folder


def test_the_undefended_row_comes_first_and_once() -> None:
    settings = _config(defenses=[{}, {"nopeek_alpha": 2.0}, {"nopeek_alpha": 2.0}]).privacy
    assert settings is not None
    assert [d.label() for d in settings.settings()] == ["none", "default", "nopeek 2"]


def test_a_bad_privacy_section_is_one_line_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "pv", "privacy": {"defenses": [{"nopeek": 1}]}}))
    assert main(["privacy", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nopeek" in err[0] and "Traceback" not in err[0]
