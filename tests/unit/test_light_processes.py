"""Light processes (issue 32): an agent loads only what its configuration needs, and the split
of records by patient that every data source uses is scikit-learn's, without scikit-learn."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.model_selection import GroupShuffleSplit

from edge_agent.data.site_data import DataError, split_by_patient

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ["sklearn", "scipy", "pandas", "pydicom", "PIL", "nibabel", "onnx", "onnxruntime",
         "matplotlib", "fastapi", "grpc"]  # fmt: skip


@pytest.mark.parametrize("patients", [2, 3, 7, 40, 333])
@pytest.mark.parametrize("test_fraction", [0.1, 0.2, 0.5])
@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_the_patient_split_is_scikit_learns(patients: int, test_fraction: float, seed: int) -> None:
    rng = np.random.default_rng(patients)
    ids = [f"p{int(i)}" for i in rng.integers(0, patients, size=patients * 3)]
    ids[:patients] = [f"p{i}" for i in range(patients)]  # every patient has a record
    if np.ceil(test_fraction * patients) >= patients:
        with pytest.raises(DataError, match="no patient would be left"):
            split_by_patient(ids, test_fraction, seed)
        return
    splitter = GroupShuffleSplit(n_splits=1, test_size=test_fraction, random_state=seed)
    want_train, want_test = next(splitter.split(np.zeros(len(ids)), groups=ids))
    train, test = split_by_patient(ids, test_fraction, seed)
    assert train.tolist() == sorted(want_train.tolist())
    assert test.tolist() == sorted(want_test.tolist())


PROBE = """
import json, sys
from edge_agent.config import SiteConfig
from edge_agent.main import load_data
config = SiteConfig.from_mapping({config!r}, "site.yaml")
data = load_data(config)
from edge_agent.segments import EdgeSegments  # what training builds next
print(json.dumps([m for m in {heavy!r} if m in sys.modules]))
"""


def _loaded_for(data: dict[str, object], tmp_path: Path) -> list[str]:
    config = {"site_id": "a", "job_id": "j", "broker": {"url": "mqtt://127.0.0.1:1", "insecure": True},
              "state": {"dir": str(tmp_path / "state")}, "data": data}  # fmt: skip
    completed = subprocess.run(
        [sys.executable, "-c", PROBE.format(config=config, heavy=HEAVY)],
        capture_output=True, text=True, cwd=ROOT, check=True,
    )  # fmt: skip
    loaded: list[str] = json.loads(completed.stdout.strip().splitlines()[-1])
    return loaded


def test_a_site_reading_a_table_loads_no_decoder_no_scikit_learn_no_serving(
    tmp_path: Path,
) -> None:
    table = tmp_path / "records.csv"
    rows = [f"{i % 7},{i * 0.5},{i % 2}" for i in range(60)]
    table.write_text("patient,age,label\n" + "\n".join(rows) + "\n")
    data = {"source": "csv", "path": str(table), "label_column": "label", "classes": ["0", "1"],
            "numeric": ["age"], "patient_column": "patient"}  # fmt: skip
    assert _loaded_for(data, tmp_path) == []


def test_a_built_in_dataset_loads_what_it_needs(tmp_path: Path) -> None:
    # The probe can fail: the built-in breast-cancer set is scikit-learn's.
    data = {"source": "builtin", "dataset": "breast-cancer", "num_sites": 2, "index": 0}
    assert "sklearn" in _loaded_for(data, tmp_path)
