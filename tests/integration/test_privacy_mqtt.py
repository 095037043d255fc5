"""``medsplit privacy`` end to end: real jobs through a real Mosquitto, attacks on the tap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from medsplit.brokers.mosquitto import Mosquitto
from medsplit.cli import main

pytestmark = pytest.mark.integration


def test_privacy_attacks_what_the_aggregator_received(
    mosquitto: Mosquitto, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    config = {
        "name": "pv",
        "dataset": "breast-cancer",
        "modes": ["fedavg", "split-u"],
        "sites": [2],
        "seeds": [0],
        "rounds": 2,
        "optimizer": {"lr": 0.005},
        "privacy": {"attack_epochs": 20, "defenses": [{"gradient_noise": 3.0}]},
        "broker": {"url": mosquitto.url, "insecure": True},
        "out": str(out),
    }
    path = tmp_path / "privacy.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["privacy", "--config", str(path)]) == 0
    printed = capsys.readouterr().out.split()
    assert {str(out / n) for n in ("privacy.md", "privacy.json", "privacy.png")} <= set(printed)

    cells = {
        (c["cell"]["mode"], c["cell"]["defense"]["gradient_noise"]): c
        for c in json.loads((out / "privacy.json").read_text())
    }
    # Split-u gets its default row (label noise on the returned gradients) besides "none".
    assert set(cells) == {("fedavg", 0.0), ("split-u", 0.0), ("split-u", None), ("split-u", 3.0)}
    assert all(c["status"] == "completed" for c in cells.values())
    fedavg, undefended, default, defended = (
        cells["fedavg", 0.0],
        cells["split-u", 0.0],
        cells["split-u", None],
        cells["split-u", 3.0],
    )
    # Federated: the whole model travels, and its first layer was attacked.
    assert fedavg["exposed_weights"] == 1.0
    assert fedavg["update_gain"] is not None and fedavg["update_baseline"] is not None
    # Split-u: activations are inverted better than guessing the mean, labels leak through
    # the returned gradients, and noise on those gradients blurs the cosine attack.
    assert 0 < undefended["exposed_weights"] < 1  # the segments a site sends ...
    assert undefended["sealed"] is True  # ... which the aggregator only relayed, sealed
    assert undefended["reconstruction_gain"] > 0
    assert undefended["reconstruction_mse"] < undefended["baseline_mse"]
    assert 0 < undefended["input_dcor"] <= 1
    assert undefended["label_leak"]["cosine"] > 0.9
    assert default["label_leak"]["cosine"] < undefended["label_leak"]["cosine"]
    assert defended["label_leak"]["cosine"] < undefended["label_leak"]["cosine"]
    table = (out / "privacy.md").read_text()
    for row in ("| split-u (sequential) | grad-noise 3 |", "| split-u (sequential) | default |"):
        assert row in table
    assert "| fedavg | none |" in table
