"""Assembling each site's model at ``finish``, exporting it to ONNX, and refusing bad exports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn

from aggregator.config import OptimizerConfig
from edge_agent.data import datasets
from edge_agent.data.dicom import Preprocessing
from edge_agent.data.inputs import DataCard, FeatureInput, ImageInput
from edge_agent.local_model import LocalModel
from edge_agent.model_card import CardError, ModelCard
from edge_agent.segments import EdgeSegments
from edge_agent.site_model import (
    SITE_MODEL_FILE,
    SiteModelError,
    assemble,
    export_site_model,
    find_site_model,
    load_site_model,
    save_site_model,
)
from experiments.inprocess import run_job
from medsplit.protocol import FEDERATED_MODES, JobSpec, final_keys, topics
from medsplit.transport import MemoryBroker
from medsplit.wire import Decoder
from medsplit.wiring import memory_connector
from models import SplitPlan
from models.onnx_export import OPSET, ExportError, ParityError, export_onnx, weights_sha256
from tests.support.configs import job_config

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "mlp": {"name": "mlp", "args": {"in_features": 30}},
    "cnn": {"name": "cnn", "args": {"image_size": 32, "channels": [8, 16], "hidden": 32}},
    "resnet18": {
        "name": "resnet18",
        "args": {"image_size": 32, "width": 8, "stem": "compact"},
    },
}
CUTS = {  # (cut, tail_cut) per architecture
    "mlp": ("hidden1", "hidden2"),
    "cnn": ("conv1", "fc"),
    "resnet18": ("layer1", "pool"),
}
MODES = ("split", "split-u", "fedavg", "flop")


def _plan(arch: str, mode: str) -> SplitPlan:
    cut, tail_cut = CUTS[arch]
    plan: dict[str, Any] = {"model": ARCHITECTURES[arch], "cut": cut, "private": ["classifier"]}
    if mode == "split-u":
        plan["tail_cut"] = tail_cut
    return SplitPlan.from_mapping(plan)


def _spec(plan: SplitPlan, mode: str, release_trunk: bool = True) -> JobSpec:
    return JobSpec(
        job_id="job-x",
        mode=mode,
        orchestration="parallel",
        plan=plan,
        rounds=1,
        local_epochs=1,
        batch_size=8,
        optimizer=OptimizerConfig(),
        seed=1,
        wire_dtype="float32",
        release_trunk=release_trunk,
    )


def _card(plan: SplitPlan, mode: str) -> DataCard:
    shape = plan.model.input_shape
    if len(shape) == 1:
        encoding: FeatureInput | ImageInput = FeatureInput(
            numeric=[f"f{i}" for i in range(shape[0])], mean=[0.0] * shape[0], std=[1.0] * shape[0]
        )
    else:
        encoding = ImageInput(preprocessing=Preprocessing(size=shape[-1], mean=0.1, std=0.2))
    return DataCard(input=encoding, classes=["negative", "positive"])


def _site_layers(spec: JobSpec) -> EdgeSegments | LocalModel:
    device = torch.device("cpu")
    return LocalModel(spec, device) if spec.mode in FEDERATED_MODES else EdgeSegments(spec, device)


def _perturbed(model: nn.Module, scale: float) -> None:
    """Give a site's layers weights of their own, as training would."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(scale * torch.randn_like(tensor))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_architecture_and_mode_assembles_and_exports_with_parity(
    arch: str, mode: str, tmp_path: Path
) -> None:
    plan = _plan(arch, mode)
    spec = _spec(plan, mode)
    site = _site_layers(spec)
    for module in [site.model] if isinstance(site, LocalModel) else site.modules():
        _perturbed(module, 0.05)
    own = site.full_state()
    # The aggregator's final weights: another model entirely, cut down to what finish carries.
    global_model = plan.model.build(seed=99)
    _perturbed(global_model, 0.05)
    final = {
        k: v for k, v in global_model.state_dict().items() if k in final_keys(plan, mode, True)
    }

    state = assemble(site, final, spec)

    assert state is not None and list(state) == list(plan.model.state_keys)
    for key, tensor in state.items():
        from_site = mode == "flop" and key in plan.private_keys
        assert torch.equal(tensor, own[key] if from_site else final[key]), key
    card = ModelCard(job_id="job-x", site_id="site-a", mode=mode, plan=plan, data=_card(plan, mode))
    save_site_model(tmp_path, state, card)
    out = tmp_path / "model.onnx"

    result = export_site_model(tmp_path, out)

    assert result.max_abs_diff <= 1e-4 and result.opset == OPSET
    model, _ = load_site_model(tmp_path / SITE_MODEL_FILE)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # the batch axis is dynamic
        x = torch.randn(batch, *plan.model.input_shape)
        (onnx_out,) = session.run(["logits"], {"input": x.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(onnx_out, model(x).numpy(), atol=1e-4, rtol=0)
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["medsplit.weights_sha256"] == weights_sha256(state)
    assert json.loads(meta["medsplit.architecture"])["name"] == arch
    assert json.loads(meta["medsplit.input_shape"]) == list(plan.model.input_shape)
    assert json.loads(meta["medsplit.classes"]) == ["negative", "positive"]
    assert SplitPlan.model_validate_json(meta["medsplit.plan"]) == plan
    assert (meta["medsplit.job_id"], meta["medsplit.site_id"], meta["medsplit.mode"]) == (
        "job-x",
        "site-a",
        mode,
    )
    assert json.loads(meta["medsplit.preprocessing"]) == card.data.input.model_dump(mode="json")


def test_a_split_site_without_the_released_trunk_assembles_nothing() -> None:
    plan = _plan("mlp", "split-u")
    spec = _spec(plan, "split-u", release_trunk=False)
    site = _site_layers(spec)
    final = {
        k: v
        for k, v in plan.model.build().state_dict().items()
        if k in final_keys(plan, "split-u", False)
    }
    assert not any(k.startswith("hidden2.") for k in final)  # the trunk stays on the aggregator
    assert assemble(site, final, spec) is None


class _DifferentWhenExported(nn.Module):
    """A model whose exported graph computes something else than eager torch does."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(x)
        if torch.compiler.is_exporting():
            return out + 1e-2
        return out


class _ShiftWhenExported(nn.Module):
    """Appended to a whole model: the identity in eager torch, a shift once exported."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1e-2 if torch.compiler.is_exporting() else x


def test_export_refuses_a_model_whose_parity_fails_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ParityError, match=r"differ by up to 0\.01") as caught:
        export_onnx(_DifferentWhenExported(), torch.randn(3, 4))
    assert caught.value.max_abs_diff == pytest.approx(1e-2, rel=1e-3)
    # The same model within a looser tolerance exports: the check is what refused it.
    assert export_onnx(_DifferentWhenExported(), torch.randn(3, 4), tolerance=0.1).data
    # Through the site's export, a refused model leaves no file behind.
    plan = _plan("mlp", "fedavg")
    card = ModelCard(job_id="j", site_id="s", mode="fedavg", plan=plan, data=_card(plan, ""))
    save_site_model(tmp_path, plan.model.build(seed=0).state_dict(), card)
    real_build = type(plan.model).build

    def build_broken(self: Any, seed: int | None = None) -> nn.Module:
        model = real_build(self, seed)
        model.add_module("broken", _ShiftWhenExported())
        return model

    monkeypatch.setattr(type(plan.model), "build", build_broken)
    with pytest.raises(ParityError):
        export_site_model(tmp_path, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_export_reports_a_model_torch_cannot_export(tmp_path: Path) -> None:
    class NoOnnxOperator(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            eigenvalues = torch.linalg.eigvals(x @ x.T).real  # no ONNX operator computes this
            return eigenvalues[None].expand(len(x), -1)

    with pytest.raises(ExportError, match="could not export"):
        export_onnx(NoOnnxOperator(), torch.randn(3, 3))
    with pytest.raises(ExportError, match="must be a batch"):
        export_onnx(nn.Linear(3, 2), torch.randn(3))


def test_a_card_must_fit_its_model() -> None:
    plan = _plan("mlp", "fedavg")
    wrong = DataCard(
        input=FeatureInput(numeric=["a", "b"], mean=[0, 0], std=[1, 1]), classes=["x", "y"]
    )
    with pytest.raises(ValueError, match=r"input shape \[2\] differs from the model's \[30\]"):
        ModelCard(job_id="j", site_id="s", mode="fedavg", plan=plan, data=wrong)
    three = _card(plan, "fedavg").model_copy(update={"classes": ["a", "b", "c"]})
    with pytest.raises(ValueError, match="2 outputs but the data names 3 classes"):
        ModelCard(job_id="j", site_id="s", mode="fedavg", plan=plan, data=three)
    with pytest.raises(CardError, match=r"not a medsplit model \(metadata medsplit.job_id"):
        ModelCard.from_metadata({}, "x.onnx")


def test_site_models_are_found_and_checked(tmp_path: Path) -> None:
    plan = _plan("mlp", "fedavg")
    card = ModelCard(job_id="j", site_id="site-a", mode="fedavg", plan=plan, data=_card(plan, ""))
    state_dir = tmp_path / "state" / "site-a"
    path = save_site_model(state_dir, plan.model.build(seed=0).state_dict(), card)
    assert find_site_model(tmp_path, "site-a") == path
    assert find_site_model(state_dir) == path
    with pytest.raises(SiteModelError, match=r"no site model found.*give --site"):
        find_site_model(tmp_path)
    with pytest.raises(SiteModelError, match="holds the model of site 'site-a', not 'site-b'"):
        load_site_model(path, "site-b")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(SiteModelError, match="cannot read the site model"):
        load_site_model(tmp_path / "junk.safetensors")


@pytest.mark.parametrize("release_trunk", [True, False])
def test_finish_hands_each_site_the_trunk_only_when_the_job_releases_it(
    release_trunk: bool, tmp_path: Path
) -> None:
    sites = ["site-a", "site-b"]
    config = job_config(
        {"job_id": "job-t", "plan": "mlp-ehr-u", "mode": "split-u", "rounds": 1, "sites": sites}
        | {"release_trunk": release_trunk}
    )
    shares = datasets.all_sites(datasets.load("breast-cancer"), 2, "iid", seed=0)
    broker = MemoryBroker()
    result = run_job(
        config,
        dict(zip(sites, shares, strict=True)),
        memory_connector(broker),
        state_root=tmp_path,
    )
    decoder = Decoder(dedup_window=10**6)
    finishes = {}
    for client, topic, payload in broker.published:
        if topics.is_presence(topic):
            continue
        envelope = decoder.feed(payload)
        if client.startswith("aggregator") and envelope is not None and envelope.kind == "finish":
            finishes[topic] = envelope
    assert set(finishes) == {f"medsplit/v1/job-t/{s}/down/finish" for s in sites}  # own channels
    trunk = {k for k in config.plan.model.state_keys if k.startswith("hidden2.")}
    for envelope in finishes.values():
        assert (trunk <= set(envelope.tensors)) is release_trunk
    if release_trunk:
        aggregator_trunk = result.coordinator.final_state()
        model, card = load_site_model(tmp_path / "site-b" / SITE_MODEL_FILE)
        assert card.site_id == "site-b" and card.data.classes == ["malignant", "benign"]
        assert all(torch.equal(model.state_dict()[k], aggregator_trunk[k]) for k in trunk)
    else:
        assert not (tmp_path / "site-b" / SITE_MODEL_FILE).exists()
        with pytest.raises(SiteModelError, match="release_trunk: true"):
            export_site_model(tmp_path, tmp_path / "m.onnx", site="site-b")
