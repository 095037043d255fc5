"""Project-wide rules that a code review could miss: never pickle, and module boundaries."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ["models", "medsplit", "edge_agent", "aggregator", "experiments"]


def _python_files(*folders: str) -> list[Path]:
    return [p for folder in folders for p in (ROOT / folder).rglob("*.py")]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_nothing_pickles() -> None:
    offenders = []
    for path in _python_files(*PACKAGES, "tests", "bench"):
        if _imports(path) & {"pickle", "cloudpickle", "dill", "joblib"}:
            offenders.append(f"{path}: imports a pickle library")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                keywords = {k.arg: k.value for k in node.keywords}
                func = ast.unparse(node.func)
                allow = keywords.get("allow_pickle")
                if isinstance(allow, ast.Constant) and allow.value is True:
                    offenders.append(f"{path}:{node.lineno}: allow_pickle set to True")
                if func.endswith("torch.load"):
                    weights_only = keywords.get("weights_only")
                    if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                        offenders.append(
                            f"{path}:{node.lineno}: torch.load without weights_only=True"
                        )
    assert offenders == []


def test_only_the_transport_imports_paho() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for p in _python_files(*PACKAGES, "bench")
        if "paho" in _imports(p) and "medsplit/transport" not in p.as_posix()
    ]
    assert set(offenders) <= {"bench/transport.py"}  # the benchmark compares with plain paho


def test_models_never_import_the_processes_or_mqtt() -> None:
    for path in _python_files("models"):
        assert not _imports(path) & {"medsplit", "edge_agent", "aggregator", "paho"}, path


def test_agent_and_aggregator_never_import_each_other() -> None:
    for path in _python_files("edge_agent"):
        assert "aggregator" not in _imports(path), path
    for path in _python_files("aggregator"):
        assert "edge_agent" not in _imports(path), path


def test_shared_kernel_reaches_the_processes_only_through_the_command_line() -> None:
    for path in _python_files("medsplit"):
        if path.name == "cli.py":
            continue  # the composition root: it loads `medsplit aggregator` / `agent` lazily
        assert not _imports(path) & {"edge_agent", "aggregator"}, path


def _loaded_by(modules: list[str], heavy: set[str]) -> dict[str, list[str]]:
    """Which of ``heavy`` each of ``modules`` brings into one fresh interpreter, importing them
    in turn: ``{module: [heavy ones it loaded first]}``, empty when none does.

    One interpreter for a whole rule, not one per module: ``sys.modules`` only grows, so the
    union is clean exactly when every module is, and the first module after which a heavy
    library appears is the one that imports it."""
    probe = f"""
import importlib, json, sys
heavy, found, seen = {sorted(heavy)!r}, {{}}, set()
for module in {modules!r}:
    importlib.import_module(module)
    new = [m for m in heavy if m in sys.modules and m not in seen]
    if new:
        found[module] = new
        seen.update(new)
print(json.dumps(found))
"""
    completed = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True
    )
    found: dict[str, list[str]] = json.loads(completed.stdout)
    return found


def _modules(*folders: str) -> list[str]:
    return sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in _python_files(*folders)
    )


EDGE_ONLY = {"pydicom", "sklearn", "fastapi", "onnxruntime", "matplotlib"}


def test_the_wire_and_the_transport_load_no_edge_or_report_library() -> None:
    modules = _modules("medsplit/wire", "medsplit/transport")
    assert len(modules) > 5 and _loaded_by(modules, EDGE_ONLY) == {}


def test_the_aggregator_loads_no_dicom_stack_and_no_inference_server() -> None:
    # ...and matplotlib only when it draws a report: not on the way to being ready.
    modules = _modules("aggregator")
    assert "aggregator.main" in modules
    heavy = {"pydicom", "sklearn", "onnxruntime", "fastapi", "matplotlib"}
    assert _loaded_by(modules, heavy) == {}


# What neither process needs to join a job and wait: data decoders, scikit-learn, plotting,
# ONNX, the serving stack (issue 32: light processes). Loaded when a configuration needs them.
PROCESS_HEAVY = EDGE_ONLY | {"onnx", "grpc", "PIL", "nibabel", "pandas", "scipy", "torchvision"}


def test_the_entry_points_load_nothing_the_job_has_not_asked_for() -> None:
    modules = ["edge_agent.main", "edge_agent.agent", "edge_agent.site_store", "aggregator.main"]
    assert _loaded_by(modules, PROCESS_HEAVY) == {}


def test_reading_a_config_loads_no_torch() -> None:
    modules = ["medsplit.cli", "medsplit.config", "aggregator.config", "edge_agent.config"]
    assert _loaded_by(modules, {"torch", "pydicom", "sklearn"}) == {}


def test_the_import_probe_names_the_module_that_loads_a_heavy_library() -> None:
    # The probe itself can fail, and names the culprit: here the standard library's csv.
    found = _loaded_by(["medsplit.ids", "csv", "medsplit.modes"], {"csv", "tomllib"})
    assert found == {"csv": ["csv"]}


def test_pyproject_extras_keep_each_image_small() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = lambda reqs: {re.split(r"[<>=;\[ ]", r, maxsplit=1)[0].lower() for r in reqs}  # noqa: E731
    core = names(project["dependencies"])
    extras = {k: names(v) for k, v in project["optional-dependencies"].items()}
    assert not core & {"pydicom", "scikit-learn", "onnxruntime", "fastapi", "uvicorn", "amqtt"}
    assert {"pydicom", "onnxruntime", "fastapi"} <= extras["edge"]
    assert not extras["aggregator"] & {"pydicom", "scikit-learn", "onnxruntime", "fastapi"}
    assert "amqtt" in extras["demo"]
