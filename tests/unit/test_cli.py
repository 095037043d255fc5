from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from medsplit import __version__
from medsplit.cli import main


def test_version_and_help_from_the_installed_entry_point() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "medsplit", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"medsplit {__version__}"
    out = subprocess.run(
        [sys.executable, "-m", "medsplit", "--help"], capture_output=True, text=True, check=True
    )
    assert "usage: medsplit" in out.stdout and "plan" in out.stdout


def test_plan_command_describes_the_cut(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "cnn-cxr-u", "--batch-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "head_out   [32, 16, 32, 32]" in out and "classifier.weight" in out


def test_plan_command_reports_a_bad_plan_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "plan.yaml"
    bad.write_text("model: {name: cnn}\ncut: conv7\n")
    assert main(["plan", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: cut: unknown layer 'conv7'")


def test_models_command_lists_architectures(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("mlp", "cnn", "resnet18"))
