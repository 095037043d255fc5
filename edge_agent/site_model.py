"""A site's own whole model at the end of a job: assembled, kept, found again, exported.

At ``finish`` the aggregator sends the final global state and, in split modes when the job
releases it, the trunk. The site puts its model together locally -- FLOP: the averaged shared
layers with its own private ones; split modes: its head (and tail) with the trunk -- and keeps
it in ``state_dir/site-model.safetensors`` with its ``ModelCard`` as metadata. Export reads that
file; nothing about a site's model is ever assembled on the aggregator.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from edge_agent.data.inputs import DataCard
from edge_agent.local_model import LocalModel
from edge_agent.model_card import CardError, ModelCard
from edge_agent.segments import EdgeSegments
from medsplit.protocol import JobSpec
from medsplit.storage import atomic_write
from models.onnx_export import ExportResult, export_onnx, weights_sha256

log = logging.getLogger(__name__)

SITE_MODEL_FILE = "site-model.safetensors"
ONNX_FILE = "model.onnx"


class SiteModelError(ValueError):
    """No usable site model where one was looked for; the message says where and why."""


def assemble(
    segments: EdgeSegments | LocalModel, final: Mapping[str, torch.Tensor], spec: JobSpec
) -> dict[str, torch.Tensor] | None:
    """The site's whole state dict from its layers and ``finish``'s tensors.

    None in split modes when the trunk was not released: the site then holds only its segments.
    """
    if isinstance(segments, LocalModel):
        segments.load({k: final[k] for k in segments.keys})  # private layers stay the site's
        return segments.full_state()
    segments.load(final)  # the site's head/tail become the final ones
    keys = spec.plan.model.state_keys
    if any(k not in final for k in keys):
        return None
    return {k: final[k].detach().cpu() for k in keys}


def save_site_model(state_dir: Path, state: Mapping[str, torch.Tensor], card: ModelCard) -> Path:
    """Write the assembled model and its card atomically; returns the file."""
    target = state_dir / SITE_MODEL_FILE
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    card = card.model_copy(update={"weights_sha256": weights_sha256(tensors)})
    atomic_write(target, save(tensors, metadata=card.to_metadata()))
    return target


def find_site_model(run: Path, site: str | None = None) -> Path:
    """The site model in ``RUN/state/SITE`` (the demo's layout), ``RUN/SITE``, or ``RUN`` itself.

    ``run`` may also be the model file. ``SiteModelError`` lists the places looked at.
    """
    if run.is_file():
        return run
    per_site = (
        [run / "state" / site / SITE_MODEL_FILE, run / site / SITE_MODEL_FILE] if site else []
    )
    candidates = [*per_site, run / SITE_MODEL_FILE]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    hint = "" if site else " (give --site for a run directory with several sites)"
    looked = ", ".join(str(c) for c in candidates)
    raise SiteModelError(
        f"no site model found{hint}; looked for {looked}. A site writes it when a job finishes "
        f"(in split modes only if the job releases the trunk: release_trunk: true)"
    )


def load_site_model(path: Path, site: str | None = None) -> tuple[nn.Module, ModelCard]:
    """The model (eval mode, CPU) and its card from a site model file."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            card = ModelCard.from_metadata(handle.metadata() or {}, str(path))
            state = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise SiteModelError(f"{path}: cannot read the site model ({exc})") from None
    except CardError as exc:
        raise SiteModelError(str(exc)) from None
    if site is not None and card.site_id != site:
        raise SiteModelError(f"{path}: holds the model of site {card.site_id!r}, not {site!r}")
    model = card.plan.model.build()
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise SiteModelError(f"{path}: weights do not fit the plan's model ({exc})") from None
    return model.eval(), card


def export_site_model(
    source: Path,
    out: Path,
    *,
    site: str | None = None,
    sample: torch.Tensor | None = None,
) -> ExportResult:
    """Export a site's assembled model (found as in ``find_site_model``) to ONNX at ``out``.

    ``sample`` is a batch for the parity check; without one, a seeded random batch of the
    model's input shape is used (parity holds for any input, not only for real ones).
    """
    model, card = load_site_model(find_site_model(source, site), site)
    if sample is None:
        generator = torch.Generator().manual_seed(0)
        sample = torch.randn((8, *card.input_shape), generator=generator)
    card = card.model_copy(update={"weights_sha256": weights_sha256(model.state_dict())})
    result = export_onnx(model, sample, metadata=card.to_metadata())
    atomic_write(out, result.data)  # only a model that passed the checks is ever written
    return dataclasses.replace(result, path=out)


def site_card(spec: JobSpec, site_id: str, data: DataCard | None) -> ModelCard | None:
    """The card of this site's model; None when the data source cannot describe its inputs."""
    if data is None:
        return None
    return ModelCard(job_id=spec.job_id, site_id=site_id, mode=spec.mode, plan=spec.plan, data=data)
